"""
Fine-tune a pre-trained DiT with any method of peft.py (or train one from scratch), on a CPU or many GPUs.

    torchrun --nproc_per_node=8 train.py --method finediffusion --data inat --data-path /data/inat2021 \\
        --ckpt pretrained/DiT-XL-2-256x256.pt --vae pretrained/sd-vae-ft-ema
    python train.py --toy            # the README's two-stage toy experiment on a CPU, in one command (7 min, 2 cores)

torch.distributed DDP directly (nccl on GPUs, gloo on CPU); frozen parameters get no gradients, no optimizer
state and no all-reduce. Checkpoints (peft.py's format) hold only what the method trains, plus EMA, optimizer, step
and every rank's RNG state, and are written atomically; --resume continues bit-exactly. Each run folder holds
log.txt and metrics.jsonl (one JSON line per logged step: what bench.py's Table 2 reads).
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from diffusion import create_diffusion, run_sampler
from model import DIT_CONFIGS, DiT, dit_name, load_vae
from peft import (METHODS, METRICS_FILE, SAMPLES_DIR, Checkpoint, base_problem, checkpoint_file, checkpoint_path,
                  count_parameters, create_run_folder, interrupted_saves, load_base, named_runs, prepare,
                  read_checkpoint, run_folder, save_checkpoint, trainable_state_dict)


def parse_args(argv=None):
    p = data.Parser(description=__doc__)
    p.add_argument("--method", default="finediffusion", choices=list(METHODS), help="what trains (peft.METHODS)")
    p.add_argument("--ckpt", default=None,
                   help="base DiT: a checkpoint (.pt/.safetensors), a run folder or a run's name; none: from scratch")
    p.add_argument("--model", default=None, choices=list(DIT_CONFIGS),
                   help="with --ckpt: checked against the file (any DiT shape loads); without: DiT-XL/2 if not given")
    p.add_argument("--num-heads", type=data.POSITIVE, default=None,
                   help="heads of a --ckpt that does not record them (none: model.heads_for_width)")
    p.add_argument("--image-size", type=data.POSITIVE, default=256, help="pixels; a multiple of the VAE's 8")
    p.add_argument("--vae", default=None, help="SD VAE folder or file (sd-vae-ft-ema); 'none': pixel space")
    p.add_argument("--data", default="inat", choices=["inat", "vegfru", "folder", "toy"], help="dataset layout")
    p.add_argument("--data-path", default=None, help="dataset root (toy: where to generate it)")
    p.add_argument("--split", default=None, help="inat: train_mini/train/val; toy: source/target")
    p.add_argument("--latent-cache", default=None, help="encode the data once into this folder and train from it")
    p.add_argument("--no-hflip", action="store_true",
                   help="no mirrored copies: for data where left and right differ (text, symbols, some markings)")
    p.add_argument("--global-batch-size", type=data.POSITIVE, default=256, help="images per step over all processes")
    p.add_argument("--max-steps", type=data.POSITIVE, default=200_000, help="optimizer steps in all")
    p.add_argument("--lr", type=data.number(float, 0.0, low_open=True), default=None,
                   help="learning rate (none: the method's suggested one, peft.METHODS)")
    p.add_argument("--ema-decay", type=data.FRACTION, default=0.9999, help="EMA of the trained weights")
    p.add_argument("--p-parent", type=data.FRACTION, default=0.1, help="P(fine label -> its parent) while training")
    for method, spec in METHODS.items():  # each method's own options, e.g. --lora-rank
        for option, default in spec.options.items():
            p.add_argument(data.flag(option), type=data.number(type(default), 1), default=default,
                           help=f"{method} only")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="none: bf16 on CUDA, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--num-workers", type=data.NON_NEGATIVE, default=data.WORKERS, help="data loaders per rank")
    p.add_argument("--seed", type=int, default=0, help="weights of new parameters, data order, noise")
    p.add_argument("--results-dir", default="results", help="where run folders are made")
    p.add_argument("--run-name", default=None,
                   help="the run folder is results-dir/NNN-<run-name> (none: model-method); --ckpt, --resume and the "
                        "other scripts take the name for the newest such run")
    p.add_argument("--log-every", type=data.POSITIVE, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=data.POSITIVE, default=10_000, help="steps between checkpoints")
    p.add_argument("--sample-every", type=data.NON_NEGATIVE, default=0,
                   help="steps between grids of the EMA model's samples in the run folder's samples/ (0: none)")
    p.add_argument("--resume", default=None,
                   help="a checkpoint of this script to continue from (a run folder or name: its newest)")
    p.add_argument("--toy", action="store_true",
                   help="the toy experiment: pre-train a toy base for 2x --max-steps (once: a finished one in "
                        "--results-dir is reused), fine-tune it with --method on the toy target split, then draw "
                        "its samples and t-SNE into the run folder; the flags given override " + ", ".join(
                            f"{data.flag(k)} {v}" for k, v in TOY_FINE_TUNE.items()) + ", --lr 1e-2 (full: "
                        "1e-3) and --run-name toy-<method>")
    args = p.parse_args(argv)
    for action in p._actions:  # parsed again without defaults: which flags the command line itself set
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    if args.toy:
        if args.resume or "RANK" in os.environ:
            p.error("--toy starts a new experiment in one process: give it without --resume and without torchrun")
        toy_settings = dict(TOY_FINE_TUNE, lr=1e-3 if args.method == "full" else 1e-2, run_name=f"toy-{args.method}")
        vars(args).update({k: v for k, v in toy_settings.items() if k not in args.given})
    return args


# --toy: the settings of the README's toy experiment (a flag given on the command line overrides them). The base
# trains from scratch on the source split; the fine-tune learns the target split's new classes.
TOY_FINE_TUNE = dict(data="toy", split="target", model="DiT-T/2", image_size=16, vae="none", global_batch_size=64,
                     max_steps=600, ema_decay=0.99, num_workers=0, sample_every=100)
TOY_BASE = dict(TOY_FINE_TUNE, split="source", method="full", lr=1e-3, sample_every=0, run_name="toy-base")
TOY_SHARED = ("data_path", "results_dir", "model", "image_size", "num_workers", "precision", "seed")  # flags: both


# What a --resume may change: it continues the saved run, so anything else would be silently not what was asked.
# The data may move (another machine, another mount): a resume checks that it holds the classes the run trained on.
RESUMABLE = ("max_steps", "lr", "ckpt_every", "log_every", "sample_every", "num_workers", "precision", "compile",
             "grad_checkpointing", "ckpt", "results_dir", "run_name", "data_path", "latent_cache")


def resumed_args(args, resume):
    """The saved settings with the flags given now that a resume may change -> (args, {flag: (old, new)})."""
    refused = [name for name in args.given if name not in RESUMABLE + ("resume",)]
    if refused:
        flags = lambda names: ", ".join(map(data.flag, names))
        raise SystemExit(f"--resume continues the run with its saved settings and cannot change {flags(refused)}; "
                         f"it can change {flags(RESUMABLE)}")
    settings = dict(vars(parse_args([])), **resume.settings, resume=args.resume, given=args.given)  # new flags: default
    changed = {name: (settings[name], getattr(args, name)) for name in args.given
               if name != "resume" and settings[name] != getattr(args, name)}
    settings.update({name: new for name, (_, new) in changed.items()})
    return argparse.Namespace(**settings), changed


# -----------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is one process


def setup_distributed():
    """(rank, world size, device); each process drives the GPU of its LOCAL_RANK (sample.py uses this too)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def finish_distributed(world_size):
    """Leave the process group together: no rank exits (closing its connections) while another still works."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


MAX_WEIGHT = 1e4  # no weight of a trained DiT comes near; an lr far too high gets past it in one step


def step_health(loss, params, stop, world_size):
    """After an update: (mean loss over ranks, did it diverge, was a stop requested), agreed by every rank through
    one all-reduce of three scalars per step; with one read of the trained weights, that is its cost. Diverged: a
    non-finite loss or weight, or a weight beyond MAX_WEIGHT."""
    largest = torch.nn.utils.get_total_norm([p.detach() for p in params], norm_type=math.inf)
    bad = ~torch.isfinite(largest) | (largest > MAX_WEIGHT) | ~torch.isfinite(loss.detach())
    health = torch.stack([loss.detach().float(), bad.float(), torch.tensor(float(stop.signum is not None),
                                                                           device=loss.device)])
    if world_size > 1:
        dist.all_reduce(health)
    return health[0].item() / world_size, health[1].item() > 0, health[2].item() > 0


class StopRequest:
    """Within it, SIGTERM (a cluster scheduler taking the node back) and SIGINT (Ctrl-C) ask the training loop to
    stop after its current step, save and exit, rather than die mid-step."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def request(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def rng_states(world_size):
    """Every rank's RNG states (CPU and CUDA), gathered so one file can resume all of them exactly."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def continues_in_place(checkpoint):
    """A resume writes on in its checkpoint's run folder when that checkpoint is the newest there; from an earlier
    one, or one copied out of its run, it branches into a new folder, so no checkpoint is ever overwritten."""
    run = run_folder(checkpoint)
    return run is not None and os.path.samefile(checkpoint_path(run), checkpoint)


def open_run(args, dit_config, rank, world_size):
    """The run folder (rank 0 decides, every rank learns it): the resumed run's, or a new one."""
    run_dir = [None]
    if rank == 0:
        old_run = run_folder(args.resume) if args.resume else None
        if args.resume and continues_in_place(args.resume):
            run_dir = [old_run]
            data.remove_stale_temporaries(interrupted_saves(run_dir[0]))  # of processes that no longer run
        else:  # a new run, or a branch: beside the run it continues unless --results-dir says where
            results_dir = os.path.dirname(old_run) if old_run and "results_dir" not in args.given else args.results_dir
            model_name = dit_name(dit_config) or f"DiT-{dit_config['depth']}x{dit_config['hidden_size']}"
            run_dir = [create_run_folder(results_dir, args.run_name or f"{model_name.replace('/', '-')}-{args.method}")]
    if world_size > 1:
        dist.broadcast_object_list(run_dir)
    return run_dir[0]


class Log:
    """Rank 0 writes each message to the terminal and log.txt, and each logged step as a JSON line to metrics.jsonl."""

    def __init__(self, run_dir, rank):
        names = ("log.txt", METRICS_FILE)
        self.files = [open(os.path.join(run_dir, name), "a") for name in names] if rank == 0 else None

    def __call__(self, message, **metrics):
        if self.files:
            tqdm.write(message)
            for file, line in zip(self.files, (message, json.dumps(metrics) if metrics else None)):
                if line is not None:
                    file.write(line + "\n")
                    file.flush()


def duration(seconds):
    """Seconds as a person says them: '40 s', '7 min', '5 h 12 min', '1 day 3 h', '3 days 4 h'."""
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if seconds < 60:
        return f"{seconds:.0f} s"
    if hours < 1:
        return f"{minutes:.0f} min"
    return (f"{int(hours)} h {int(minutes % 60)} min" if days < 1
            else f"{int(days)} day{'s' if days >= 2 else ''} {int(hours % 24)} h")


class Meter:
    """Throughput and loss: a log line and a metrics.jsonl record every --log-every steps, and on a CPU, once and
    early, what the whole run will cost: after the first step if it took over 20 s (its own time is then the
    estimate), else over the steps after it (warm-up) until 5 steps or 20 s have passed."""

    def __init__(self, args, step, lr, device, log):
        self.args, self.lr, self.log, self.start = args, lr, log, step
        self.projected = device.type != "cpu"  # a GPU run shows its rate in the log lines; nothing to warn
        self.timer, self.steps, self.loss = time.time(), 0, 0.0

    def update(self, step, loss):
        args, now = self.args, time.time()
        self.steps, self.loss = self.steps + 1, self.loss + loss
        if step == self.start + 1:
            self.warm = now
            if now - self.timer > 20:
                self.project(step, 1 / (now - self.timer), f"step {step}")
        elif not self.projected and (step == self.start + 6 or now - self.warm > 20):
            self.project(step, (step - self.start - 1) / (now - self.warm), f"steps {self.start + 2}-{step}")
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = now - self.timer
            metrics = dict(step=step, loss=self.loss / self.steps, steps_per_s=self.steps / elapsed,
                           images_per_s=self.steps * args.global_batch_size / elapsed, lr=self.lr, method=args.method)
            self.log(f"step {step:07d}  loss {metrics['loss']:.4f}  {metrics['steps_per_s']:.2f} steps/s  "
                     f"{metrics['images_per_s']:.1f} images/s", **metrics)
            self.timer, self.steps, self.loss = time.time(), 0, 0.0

    def project(self, step, steps_per_s, measured):
        """Say once what the steps to go will take at `steps_per_s`."""
        self.projected, seconds = True, (self.args.max_steps - step) / steps_per_s
        hint = "" if seconds < 3600 else "; a job for GPUs. A first run that ends in minutes: python train.py --toy"
        self.log(f"on this CPU: {steps_per_s * self.args.global_batch_size:.1f} images/s over {measured}; the "
                 f"{self.args.max_steps - step:,} steps to go take about {duration(seconds)}{hint}")


# -----------------------------------------------------------------------------------------------------------
# Data and model


def check_settings(args, resume, world_size):
    """The checks that need no data, made before any slow work."""
    foreign = [f"{data.flag(option)} ({method})" for method, spec in METHODS.items() if method != args.method
               for option in spec.options if option in args.given]
    if foreign:
        raise SystemExit(f"{', '.join(foreign)}: not an option of --method {args.method}, which has "
                         f"{', '.join(map(data.flag, METHODS[args.method].options)) or 'none'}")
    if resume and args.max_steps <= resume.step:
        raise SystemExit(f"--max-steps {args.max_steps}: the checkpoint is at step {resume.step} already; "
                         f"give a larger --max-steps to train on")
    if args.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes")
    if args.vae is None:
        raise SystemExit("give --vae (the SD VAE folder, e.g. sd-vae-ft-ema) or --vae none to train in pixel space")
    if METHODS[args.method].delta and not args.ckpt:
        raise SystemExit(f"--method {args.method} fine-tunes a pre-trained model: give its --ckpt")
    if problem := data.data_path_problem(args.data, args.data_path):
        raise SystemExit(problem)
    if os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise SystemExit(f"--results-dir {args.results_dir} is a file: give a folder (it is made if missing)")
    if args.latent_cache and args.vae == "none":
        raise SystemExit("--latent-cache holds VAE latents; with --vae none (pixel space) there are none: drop it")
    if args.latent_cache and (problem := data.cache_folder_problem(args.latent_cache)):
        raise SystemExit(f"--latent-cache {problem}")


def open_vae(args, device):
    """The VAE of --vae (None: pixel space), checked against --image-size."""
    try:
        vae = None if args.vae == "none" else load_vae(args.vae, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--vae: {e}")
    if vae is not None and args.image_size % vae.downsample_factor:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of the VAE's {vae.downsample_factor}")
    return vae


def load_network(args, vae):
    """The DiT to fine-tune (--ckpt) or to train from scratch, checked against the input it will see before any
    data is read -> (model, base identity or None)."""
    channels, input_size = 3, args.image_size  # pixel space, or the VAE's latents
    if vae is not None:
        channels, input_size = vae.latent_channels, args.image_size // vae.downsample_factor
    if not args.ckpt:  # its one label row is a placeholder: prepare() puts in the dataset's table
        model, base = DiT(input_size=input_size, in_channels=channels, num_classes=1,
                          **DIT_CONFIGS[args.model or "DiT-XL/2"]), None
    else:
        try:
            args.ckpt = checkpoint_path(args.ckpt, args.results_dir)
            model, base = load_base(args.ckpt, input_size, args.num_heads, args.model)
        except (ValueError, FileNotFoundError) as e:
            moved = " (a base that moved: resume with --ckpt <its new path>, checked by its fingerprint)"
            raise SystemExit(f"--ckpt: {e}" + (moved if args.resume else ""))
        if problem := base_problem(model, args.method):
            raise SystemExit(f"--ckpt {args.ckpt}: {problem}")
        if model.in_channels != channels:
            raise SystemExit(f"--ckpt {args.ckpt} expects {model.in_channels} input channels, but --vae {args.vae} "
                             f"gives {channels}")
    if input_size % model.patch_size:
        raise SystemExit(f"--image-size {args.image_size}: the {input_size} px {'latents' if vae else 'images'} "
                         f"do not split into the model's {model.patch_size} px patches")
    return model, base if METHODS[args.method].delta else None


def load_data(args, vae, rank, world_size, resume=None):
    """(dataset, hierarchy): images encoded on the fly, cached posterior moments, or pixels; a resume's classes
    checked before any encoding."""
    try:
        dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, split=args.split,
                                               hflip=not args.no_hflip)
        if resume:
            check_resumed_classes(resume, hierarchy, args)
        if args.latent_cache and vae is not None:
            dataset = data.build_latent_cache(dataset, vae, args.latent_cache, rank=rank, world_size=world_size,
                                              num_workers=args.num_workers)
    except (ValueError, FileNotFoundError) as e:  # a missing or stale data set or cache
        raise SystemExit(str(e))
    return dataset, hierarchy


def check_resumed_classes(resume, hierarchy, args):
    """The label table's rows are the run's classes: a resume trains on the same ones, in the same order."""
    saved = data.Hierarchy.from_dict(resume.hierarchy)
    fields = ("class_names", "superclass_names", "class_to_superclass")
    if all(getattr(saved, k) == getattr(hierarchy, k) for k in fields):
        return
    (c, s), (old_c, old_s) = [(len(h.class_names), len(h.superclass_names)) for h in (hierarchy, saved)]
    differ = (f"{c} classes in {s} superclasses, where the run trained on {old_c} in {old_s}"
              if (c, s) != (old_c, old_s) else "as many classes as the run trained on, but other names, order or "
                                               "superclasses")
    raise SystemExit(f"--resume: the data at {args.data_path} now has {differ}. Resume on the data as it was, or "
                     f"fine-tune anew from this checkpoint (--ckpt {args.resume})")


def method_options(args, hierarchy):
    """prepare()'s arguments for --method on the dataset's classes: the hierarchy, p_parent, the method's own."""
    return dict(class_to_superclass=hierarchy.class_to_superclass, num_superclasses=len(hierarchy.superclass_names),
                p_parent=args.p_parent, **{name: getattr(args, name) for name in METHODS[args.method].options})


def to_model_input(x, vae, device):
    """A batch as the DiT sees it: cached posterior moments are sampled afresh (z = mean + std * eps), images are
    encoded by the VAE and scaled, pixels pass as they are."""
    if isinstance(x, (list, tuple)):
        mean, std = x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True)
        return mean + std * torch.randn_like(std)
    x = x.to(device, non_blocking=True)
    return vae.encode(x).sample() * vae.scaling_factor if vae is not None else x


def autocast_forward(network, device, precision):
    """The network in mixed precision (bf16/fp16 autocast); its output, and so the loss (whose VLB term needs the
    range), in fp32. bench.py times this same forward."""
    low_precision = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)

    def forward(x, t, **model_kwargs):
        with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
            return network(x, t, **model_kwargs).float()

    return forward


def batches(dataset, args, step, rank, world_size, device):
    """This rank's batches from `step` on: a seeded permutation per epoch, so a resumed run skips what it has seen."""
    local_batch = args.global_batch_size // world_size
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch  # > 0: main checked
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * local_batch: steps_per_epoch * local_batch]
        yield from DataLoader(dataset, local_batch, sampler=indices, num_workers=args.num_workers,
                              pin_memory=device.type == "cuda", drop_last=True,
                              generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG alone
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def write_samples(model, ema, vae, path, class_names, step):
    """A grid of what the EMA weights draw at `step`, a row per class (up to 8, spread over the label table, each
    under its name), 2 images each: fixed noise from a generator of its own (so grids compare across steps and the
    training's random stream is left alone), the method's guidance at scale 4, 10 DPM-Solver++ steps."""
    embedder, device = model.y_embedder, model.pos_embed.device
    classes = torch.linspace(0, embedder.num_classes - 1, min(8, embedder.num_classes)).round().long()
    labels = classes.repeat_interleave(2)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.eval()
    model.load_state_dict(ema, strict=False)
    model_fn, copies = model.guided(labels.to(device), "fine" if embedder.num_superclasses else "cfg", 4.0)
    x = run_sampler("dpm++", model_fn, z.repeat(copies, 1, 1, 1), steps=10, progress=False)[: len(labels)]
    data.save_grid(data.to_pixels(x, vae), path, cols=2,
                   row_names=[class_names[c] for c in classes], titles=[f"step {step}"])
    model.load_state_dict(trained, strict=False)
    model.train()


# -----------------------------------------------------------------------------------------------------------
# Training


def restore(resume, model, opt, scaler, lr, seed, rank, world_size, device, log):
    """Continue from a checkpoint: trained weights, optimizer (at learning rate `lr`), scaler and each rank's own
    random stream -> (EMA, step). On another world size the streams start afresh (the run goes on, not bit-exactly)."""
    model.load_state_dict(resume.model, strict=False)
    opt.load_state_dict(resume.optimizer)
    for group in opt.param_groups:  # the saved state carries the old lr
        group["lr"] = lr
    if scaler.is_enabled() and resume.scaler:  # fp16 before and now
        scaler.load_state_dict(resume.scaler)
    if len(resume.rng) == world_size:
        torch.set_rng_state(resume.rng[rank]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(resume.rng[rank]["cuda"])
    else:
        torch.manual_seed((seed + resume.step) * world_size + rank)
        log(f"resuming on {world_size} processes, not {len(resume.rng)}: fresh random streams, not bit-exact")
    return {k: v.to(device) for k, v in resume.ema.items()}, resume.step


def main(args):
    rank, world_size, device = setup_distributed()
    resume = None
    if args.resume:  # continue with the saved settings, but what RESUMABLE lets change
        try:
            args.resume = checkpoint_path(args.resume, args.results_dir)  # a run folder or name: its newest
            resume = read_checkpoint(args.resume)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--resume: {e}")
        args, changed = resumed_args(args, resume)
    check_settings(args, resume, world_size)
    torch.manual_seed(args.seed * world_size + rank)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    vae = open_vae(args, device)
    model, base = load_network(args, vae)
    dataset, hierarchy = load_data(args, vae, rank, world_size, resume)
    dit_config, options = model.config, method_options(args, hierarchy)
    try:
        prepare(model, args.method, **options)
    except ValueError as e:  # data without the hierarchy the method needs
        raise SystemExit(f"--method {args.method}: {e}")
    if resume and (resume.base or {}).get("sha256") != (base or {}).get("sha256"):
        raise SystemExit(f"--resume: the checkpoint was trained on the base {resume.base['path']}; --ckpt "
                         f"{args.ckpt} is another file (its tensors differ)")
    if len(dataset) // world_size < args.global_batch_size // world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size}: the {len(dataset)} training images cannot "
                         f"fill one batch")
    run_dir = open_run(args, dit_config, rank, world_size)
    log = Log(run_dir, rank)
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    diffusion = create_diffusion("")
    total, trainable = count_parameters(model)
    log(f"{args.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
        f"{len(hierarchy.class_names)} classes in {len(hierarchy.superclass_names)} superclasses, "
        f"{len(dataset):,} training items ({'no mirrors' if args.no_hflip else 'each image and its mirror'}), "
        f"{world_size} process(es) on {device.type}, {precision}")

    lr = args.lr or METHODS[args.method].lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if resume:
        ema, step = restore(resume, model, opt, scaler, lr, args.seed, rank, world_size, device, log)
        in_place = run_folder(args.resume) == os.path.abspath(run_dir)
        log(f"resumed from {args.resume} at step {step}" + ("" if in_place else f", into the new run folder {run_dir} "
            "(it is not the newest checkpoint of its run, which stays as it is)"))
        if changed:
            log("changed on resume: " + ", ".join(f"{data.flag(k)} {old} -> {new}"
                                                  for k, (old, new) in changed.items()))
    ddp_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world_size > 1 else model
    forward = autocast_forward(torch.compile(ddp_model) if args.compile else ddp_model, device, precision)

    def save(path):
        checkpoint = Checkpoint(
            method=args.method, options=options, dit=dit_config, base=base, hierarchy=hierarchy.to_dict(),
            vae=None if vae is None else os.path.abspath(args.vae), model=trainable_state_dict(model), ema=ema,
            data=dict(kind=args.data, path=args.data_path, split=args.split, image_size=args.image_size,
                      hflip=not args.no_hflip),
            step=step, optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rng_states(world_size),
            settings={k: v for k, v in vars(args).items() if k not in ("resume", "given")})
        if rank == 0:
            save_checkpoint(path, checkpoint)

    model.train()
    meter, last_saved = Meter(args, step, lr, device, log), args.resume
    bar = dict(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    with StopRequest() as stop, tqdm(**bar) as progress:  # the bar is closed however the loop ends
        for x, y in batches(dataset, args, step, rank, world_size, device):
            if step >= args.max_steps:
                break
            y = y.to(device, non_blocking=True)
            with torch.no_grad():
                x = to_model_input(x, vae, device)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)  # fp16: a step whose gradients overflowed is skipped and the scale lowered
            scaler.update()
            mean_loss, diverged, stopping = step_health(loss, opt.param_groups[0]["params"], stop, world_size)
            if diverged:  # the weights in memory are lost; no checkpoint holds them
                log(f"step {step + 1}: the training diverged (loss {mean_loss:.4g}, or a weight non-finite or beyond "
                    f"{MAX_WEIGHT:g}); stopping before it reaches a checkpoint. The last good checkpoint is "
                    f"{last_saved or 'none (none was saved)'}: resume from it with a lower --lr, or --precision fp32.")
                raise SystemExit(1)
            with torch.no_grad():  # EMA of the trainable parameters only
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        ema[name].lerp_(p.detach().float(), 1 - args.ema_decay)
            step = step + 1
            progress.update()
            meter.update(step, mean_loss)
            if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
                grid = os.path.join(run_dir, SAMPLES_DIR, f"{step:07d}.png")
                write_samples(model, ema, vae, grid, hierarchy.class_names, step)
                log(f"samples at step {step}: {grid}")
            if step % args.ckpt_every == 0 or step == args.max_steps or stopping:
                last_saved = checkpoint_file(run_dir, step)
                save(last_saved)
                log(f"saved {last_saved}")
            if stopping:
                log(f"stopped by a signal after step {step}; continue with: python train.py --resume {last_saved}")
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    finish_distributed(world_size)
    return model, run_dir


# -----------------------------------------------------------------------------------------------------------
# --toy: the README's two-stage experiment in one command


def toy_base(args):
    """The base --toy fine-tunes: the newest run named toy-base in --results-dir with the same settings (reused when
    finished, resumed when interrupted), else a new one -> its checkpoint."""
    shared = {k: getattr(args, k) for k in TOY_SHARED}
    base = argparse.Namespace(**{**vars(parse_args([])), **TOY_BASE, **shared, "max_steps": 2 * args.max_steps})
    same = ("data", "split", "method", "model", "image_size", "vae", "global_batch_size", "lr", "ema_decay", "seed",
            "data_path", "max_steps")
    for run in named_runs(TOY_BASE["run_name"], args.results_dir):
        try:
            path = checkpoint_path(run)
            checkpoint = read_checkpoint(path)
        except (ValueError, FileNotFoundError):  # a run stopped before its first checkpoint
            continue
        if all(checkpoint.settings.get(k) == getattr(base, k) for k in same):
            if checkpoint.step == base.max_steps:
                print(f"toy base: reusing {path}, pre-trained for {checkpoint.step} steps")
                return path
            print(f"toy base: resuming {path}, stopped at step {checkpoint.step} of {base.max_steps}")
            return checkpoint_path(main(parse_args(["--resume", path]))[1])
    print(f"toy base: pre-training {base.model} from scratch on the toy source split for {base.max_steps} steps")
    return checkpoint_path(main(base)[1])


def toy_experiment(args):
    """--toy: the base (toy_base), the fine-tune with --method on the target split, then into its run folder a grid
    of every target class (training images, the method's guidance, none) and, for a tiered label table, Figure 7's
    t-SNE; prints where they are and what to try next."""
    import evaluate  # here, not at the top: sample.py imports this file
    import sample
    started = time.time()
    args.ckpt = args.ckpt or toy_base(args)
    print(f"fine-tuning with {args.method} on the toy target split for {args.max_steps} steps")
    run_dir = main(args)[1]
    tiered = METHODS[args.method].tiered
    grid = sample.main(sample.parse_args([
        "--ckpt", run_dir, "--class", "all", "--n", "6", "--with-data", "--guidance", "fine" if tiered else "cfg",
        "none", "--sampler", "dpm++", "--out", os.path.join(run_dir, SAMPLES_DIR, "every-class.png")]))
    outputs = [("samples", grid)]
    if tiered:  # Figure 7 needs superclass rows
        outputs.append(("t-SNE", evaluate.main(["tsne", "--checkpoint", run_dir])))  # into the run folder
    same_base = "".join(f" {data.flag(k)} {getattr(args, k)}" for k in TOY_SHARED if k in args.given)
    print(f"\ntoy experiment done in {duration(time.time() - started)}: {run_dir}\n"
          + "".join(f"  {name:8s} {os.path.relpath(path)}\n" for name, path in outputs) + "next:\n"
          f"  python sample.py --ckpt {run_dir} --class disc_e          # one class, by name or id\n"
          f"  python sample.py --ckpt {run_dir} --class all --sampler ddpm   # the papers' 250-step sampler\n"
          f"  python train.py --toy --method lora{same_base}      # another method on the same base")
    return run_dir


if __name__ == "__main__":
    arguments = parse_args()
    try:
        data.run_script(lambda: toy_experiment(arguments) if arguments.toy else main(arguments))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which saves and stops by itself
        sys.exit("interrupted outside the training steps: what they saved is kept")
