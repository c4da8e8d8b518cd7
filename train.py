"""
Fine-tune a pre-trained DiT with any method of peft.py (or train one from scratch), on a CPU or many GPUs.

    torchrun --nproc_per_node=8 train.py --method finediffusion --data inat --data-path /data/inat2021 \\
        --ckpt pretrained/DiT-XL-2-256x256.pt --vae pretrained/sd-vae-ft-ema --latent-cache cache/inat256
    python train.py --resume DiT-XL-2-finediffusion       # a run's name, folder or checkpoint: on where it stopped
    python toy.py                                         # the README's first run, on a CPU in minutes

torch.distributed DDP directly (nccl on GPUs, gloo on CPU); frozen parameters get no gradients, no optimizer state
and no all-reduce. `main` reads top to bottom: set-up, the training loop (its step is `train_step`), checkpoints.
A checkpoint (checkpoint.py's format) holds what the method trains, its EMA, the optimizer, the step and every
rank's RNG state, so --resume continues bit-exactly; a run folder also holds log.txt and metrics.jsonl.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import argparse
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import cli
import data
from checkpoint import (SAMPLES_DIR, Checkpoint, RunLog, checkpoint_file, continued_run, find_checkpoint, load_base,
                        load_model, lock_run, open_run, read_checkpoint, restore_rng, rng_states, run_folder,
                        save_checkpoint)
from diffusion import create_diffusion, sample
from model import DIT_CONFIGS, DiT, dit_name, load_vae
from peft import METHODS, base_problem, count_parameters, prepare, trainable_state_dict

# What a --resume may change: it continues the saved run, so anything else would be silently not what was asked.
# The data may move (another machine, another mount): a resume checks that it holds the classes the run trained on.
RESUMABLE = ("max_steps", "lr", "ckpt_every", "ckpt_minutes", "log_every", "sample_every", "num_workers", "precision",
             "compile", "grad_checkpointing", "ckpt", "results_dir", "run_name", "data_path", "latent_cache")
MAX_WEIGHT = 1e4  # no weight of a trained DiT comes near; a diverging run passes it long before an overflow


def parse_args(argv=None, doc=__doc__, own_flags=None, **defaults):
    """train.py's flags; toy.py gives its own `doc`, `defaults` (the toy settings) and flags (own_flags(parser))."""
    p = cli.Parser(description=doc)
    if own_flags:
        own_flags(p)
    p.add_argument("--method", default="finediffusion", choices=list(METHODS), help="what trains (peft.METHODS)")
    p.add_argument("--ckpt", default=None,
                   help="base DiT: a checkpoint (.pt/.safetensors), a run folder or a run's name; none: from scratch")
    p.add_argument("--model", default=None, choices=list(DIT_CONFIGS),
                   help="with --ckpt: checked against the file (any DiT shape loads); without: DiT-XL/2 if not given")
    p.add_argument("--num-heads", type=cli.POSITIVE, default=None,
                   help="heads of a --ckpt that does not record them (none: model.heads_for_width)")
    p.add_argument("--image-size", type=cli.number(int, 8, 2048), default=256, help="pixels; a multiple of the VAE's 8")
    p.add_argument("--vae", default=None, help="SD VAE folder or file (sd-vae-ft-ema); 'none': pixel space")
    p.add_argument("--data", default="inat", choices=data.DATA_KINDS, help="dataset layout")
    p.add_argument("--data-path", default=None, help="dataset root (toy: where to generate it)")
    p.add_argument("--split", default=None, help="inat: train_mini/train/val; toy: source/target")
    p.add_argument("--latent-cache", default=None, help="encode the data once into this folder and train from it")
    p.add_argument("--no-hflip", action="store_true",
                   help="no mirrored copies: for data where left and right differ (text, symbols, some markings)")
    p.add_argument("--global-batch-size", type=cli.number(int, 1, 65536), default=256,
                   help="images per step over all processes")
    p.add_argument("--max-steps", type=cli.POSITIVE, default=200_000, help="optimizer steps in all")
    p.add_argument("--lr", type=cli.number(float, 0.0, 1.0, low_open=True), default=None,
                   help="learning rate (none: the method's suggested one, peft.METHODS)")
    p.add_argument("--ema-decay", type=cli.FRACTION, default=0.9999, help="EMA of the trained weights")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="the EMA's decay rises as min(decay, (1 + t) / (10 + t)) at step t, so that a short run's EMA "
                        "is its training, not still the base; --no-ema-warmup: constant, as the official code")
    p.add_argument("--p-parent", type=cli.FRACTION, default=0.1, help="P(fine label -> its parent) while training")
    for method, spec in METHODS.items():  # each method's own options, e.g. --lora-rank
        for option, default in spec.options.items():
            p.add_argument(cli.flag(option), type=cli.number(type(default), 1, 4096), default=default,
                           help=f"{method} only")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="none: bf16 on CUDA, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--num-workers", type=cli.NUM_WORKERS, default=cli.WORKERS, help="data loaders per rank")
    p.add_argument("--seed", type=cli.SEED, default=0, help="weights of new parameters, data order, noise")
    p.add_argument("--results-dir", default="results", help="where run folders are made")
    p.add_argument("--run-name", default=None, help="the run folder is results-dir/NNN-<run-name> (none: "
                                                    "model-method); the scripts take the name for its newest run")
    p.add_argument("--log-every", type=cli.POSITIVE, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=cli.POSITIVE, default=10_000, help="steps between checkpoints")
    p.add_argument("--ckpt-minutes", type=cli.number(float, 0.0, low_open=True), default=30.0,
                   help="and a checkpoint after this many minutes of training since the last one")
    p.add_argument("--sample-every", type=cli.NON_NEGATIVE, default=0, help="steps between sample grids (0: none)")
    p.add_argument("--resume", default=None, help="a train.py checkpoint to continue (a run or name: its newest)")
    p.set_defaults(**defaults)
    return p.parse_args(argv)


def check_args(args, world_size):
    """Every check that needs no data, before any slow work; a --resume takes its run's saved settings, but for what
    RESUMABLE lets change -> (args, the Checkpoint resumed or None, {flag: (old, new)} changed on resume)."""
    resume, changed = None, {}
    if args.resume:
        args.resume = find_checkpoint(args.resume, args.results_dir)
        resume = read_checkpoint(args.resume)
        refused = [name for name in args.given if name not in RESUMABLE + ("resume",)]
        cli.check(refused and f"--resume continues the run with its saved settings and cannot change "
                              f"{', '.join(map(cli.flag, refused))}; it can change "
                              f"{', '.join(map(cli.flag, RESUMABLE))}")
        # flags newer than the checkpoint take their defaults, but for the EMA warm-up: those runs had none
        settings = {**vars(parse_args([])), "ema_warmup": False, **resume.settings}
        changed = {name: (settings[name], getattr(args, name)) for name in args.given
                   if name != "resume" and settings[name] != getattr(args, name)}
        settings.update({name: new for name, (_, new) in changed.items()}, resume=args.resume, given=args.given)
        args = argparse.Namespace(**settings)
        if run_folder(args.resume) and "results_dir" not in args.given:  # a branch goes beside the run it continues
            args.results_dir = os.path.dirname(run_folder(args.resume))
        cli.check(args.max_steps <= resume.step and f"--max-steps {args.max_steps}: the checkpoint is at step "
                                                     f"{resume.step} already; give a larger --max-steps to train on")
        if in_place := continued_run(args.resume):  # a run another process writes: refused now, not after the data
            cli.by_rank_zero(lambda: lock_run(in_place).release())
    foreign = [f"{cli.flag(option)} ({method})" for method, spec in METHODS.items() if method != args.method
               for option in spec.options if option in args.given]
    cli.check(
        foreign and f"{', '.join(foreign)}: not an option of --method {args.method}, which has "
                    f"{', '.join(map(cli.flag, METHODS[args.method].options)) or 'none'}",
        args.global_batch_size % world_size and f"--global-batch-size {args.global_batch_size} is not divisible by "
                                                f"{world_size} processes",
        args.vae is None and "give --vae (the SD VAE folder, e.g. sd-vae-ft-ema) or --vae none to train in pixel space",
        METHODS[args.method].delta and not args.ckpt and f"--method {args.method} fine-tunes a pre-trained model: "
                                                         f"give its --ckpt",
        data.data_path_problem(args.data, args.data_path),
        args.latent_cache and args.vae == "none" and "--latent-cache holds VAE latents; with --vae none (pixel space) "
                                                     "there are none: drop it",
        args.latent_cache and data.cache_folder_problem(args.latent_cache))
    cli.writable_folder(args.results_dir, "--results-dir")
    cli.plain_name(args.run_name, "--run-name")
    if args.latent_cache:
        cli.writable_folder(args.latent_cache, "--latent-cache")
    if args.ckpt and (resume is None or "ckpt" in args.given):  # (a resume's recorded base: load_model finds it)
        args.ckpt = find_checkpoint(args.ckpt, args.results_dir)
    return args, resume, changed


def train_step(network, diffusion, opt, scaler, x, y, precision):
    """One optimizer step on a batch (x (N, C, H, W) as the DiT sees it, labels y (N,)) -> the loss. The network runs
    under bf16/fp16 autocast, its output and so the loss (whose VLB term needs the range) in fp32. bench.py times
    this same step."""
    low_precision = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)

    def forward(x, t, y):
        with torch.autocast(x.device.type, dtype=low_precision, enabled=low_precision is not None):
            return network(x, t, y).float()

    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()  # Improved DDPM Eq. 16, as DiT
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)  # fp16: a step whose gradients overflowed is skipped and the scale lowered
    scaler.update()
    return loss


def step_health(loss, params, requests, world_size):
    """After an update: (mean loss over ranks, did it diverge, for each of `requests` whether any rank made it),
    agreed by every rank through one all-reduce of a few scalars per step; with one read of the trained weights,
    that is its cost. Diverged: a non-finite loss or weight, or a weight beyond MAX_WEIGHT."""
    largest = torch.nn.utils.get_total_norm([p.detach() for p in params], norm_type=math.inf)
    bad = ~torch.isfinite(largest) | (largest > MAX_WEIGHT) | ~torch.isfinite(loss.detach())
    health = torch.cat([torch.stack([loss.detach().float(), bad.float()]),
                        torch.tensor([float(r) for r in requests], device=loss.device)])
    if world_size > 1:
        dist.all_reduce(health)
    return health[0].item() / world_size, health[1].item() > 0, [r > 0 for r in health[2:].tolist()]


@torch.no_grad()
def update_ema(averaged, trained, decay):
    """averaged = decay * averaged + (1 - decay) * trained, over the trained tensors only, in one fused update (a
    1.77% method pays for its 1.77%); bit-identical to lerp_ tensor by tensor."""
    torch._foreach_lerp_(averaged, [p.detach().float() for p in trained], 1 - decay)


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
    training's random stream is left alone), the model's own guidance at scale 4, 10 DPM-Solver++ steps."""
    embedder, device = model.y_embedder, model.pos_embed.device
    classes = torch.linspace(0, embedder.num_classes - 1, min(8, embedder.num_classes)).round().long()
    labels = classes.repeat_interleave(2)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.eval().load_state_dict(ema, strict=False)
    x = sample(model, z, labels.to(device), sampler="dpm++", steps=10, progress=False)
    data.save_grid(data.to_pixels(x, vae), path, cols=2, row_names=[class_names[c] for c in classes],
                   titles=[f"step {step}"])
    model.train().load_state_dict(trained, strict=False)


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
        hint = "" if seconds < 3600 else "; a job for GPUs. A first run that ends in minutes: python toy.py"
        self.log(f"on this CPU: {steps_per_s * self.args.global_batch_size:.1f} images/s over {measured}; the "
                 f"{self.args.max_steps - step:,} steps to go take about {cli.duration(seconds)}{hint}")


def build_model(args, resume, hierarchy, vae):
    """The model to train, checked against the data and the VAE -> (model prepared for --method, its base's
    architecture, the base's identity where checkpoints hold a delta, prepare()'s options); a resume's is rebuilt."""
    channels, input_size = (3, args.image_size) if vae is None else (vae.latent_channels,
                                                                     args.image_size // vae.downsample_factor)
    own = {name: getattr(args, name) for name in METHODS[args.method].options}  # e.g. lora_rank
    options = dict(class_to_superclass=hierarchy.class_to_superclass, p_parent=args.p_parent,
                   num_superclasses=len(hierarchy.superclass_names), **own)
    classes = [hierarchy.class_names, hierarchy.superclass_names, hierarchy.class_to_superclass]  # the table's rows
    trained = resume and [resume.hierarchy[k] for k in ("class_names", "superclass_names", "class_to_superclass")]
    cli.check(trained and trained != classes and f"--resume: the data at {args.data_path} now has {len(classes[0])} "
              f"classes in {len(classes[1])} superclasses, where the run trained on {len(trained[0])} in "
              f"{len(trained[1])} (or other names or order). Resume on the data as it was, or fine-tune anew from "
              f"this checkpoint (--ckpt {args.resume})")
    if resume:
        model, _ = load_model(args.resume, args.ckpt if "ckpt" in args.given else None, weights="raw", merged=False)
        dit_config, base = resume.dit, resume.base
    else:  # a pre-trained base, or a new DiT whose one label row prepare() replaces by the dataset's table
        model, base = (load_base(args.ckpt, input_size, args.num_heads) if args.ckpt else
                       (DiT(input_size=input_size, in_channels=channels, num_classes=1,
                            **DIT_CONFIGS[args.model or "DiT-XL/2"]), None))
        dit_config = model.config
        cli.check(args.model and dit_name(dit_config) != args.model and f"--ckpt {args.ckpt} holds "
                  f"{dit_name(dit_config) or 'a DiT of another shape'}, not --model {args.model}",
                  base_problem(model, args.method, **own),
                  model.in_channels != channels and f"--ckpt {args.ckpt} expects {model.in_channels} input channels, "
                                                    f"but --vae {args.vae} gives {channels}",
                  input_size % model.patch_size and f"--image-size {args.image_size}: the {input_size} px "
                  f"{'latents' if vae else 'images'} do not split into the model's {model.patch_size} px patches")
        prepare(model, args.method, **options)
    return model, dit_config, base if METHODS[args.method].delta else None, options


def main(args):
    """Train as `args` say -> (the model, its run folder)."""
    # processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` is one process
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    args, resume, changed = check_args(args, world_size)
    torch.manual_seed(args.seed * world_size + rank)
    precision = args.precision or ("bf16" if cuda else "fp32")

    # the VAE, the data and the model, each checked before anything slow follows it
    vae = None if args.vae == "none" else load_vae(args.vae, device)
    cli.check(vae is not None and args.image_size % vae.downsample_factor and f"--image-size {args.image_size} is "
              f"not a multiple of the VAE's {vae.downsample_factor}")
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, args.split, not args.no_hflip)
    model, dit_config, base, options = build_model(args, resume, hierarchy, vae)
    if args.latent_cache and vae is not None:
        dataset = data.build_latent_cache(dataset, vae, args.latent_cache, rank, world_size,
                                          num_workers=args.num_workers)
    if len(dataset) // world_size < args.global_batch_size // world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the {len(dataset)} training images cannot "
                         f"fill one batch")
    dataset[0]  # a first item read (a set of which no image can be read is refused here, before a run folder)
    model_name = (dit_name(dit_config) or f"DiT-{dit_config['depth']}x{dit_config['hidden_size']}").replace("/", "-")
    # the run folder, written by rank 0 alone, which holds its lock until the end
    owner = cli.by_rank_zero(lambda: open_run(args.results_dir, args.run_name or f"{model_name}-{args.method}",
                                              args.resume))
    run_dir = cli.shared(owner and os.path.dirname(owner.path))
    log = RunLog(run_dir, rank)
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    diffusion = create_diffusion("")
    total, trainable = count_parameters(model)
    log(f"{args.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
        f"{len(hierarchy.class_names)} classes in {len(hierarchy.superclass_names)} superclasses, "
        f"{len(dataset):,} training items ({'no mirrors' if args.no_hflip else 'each image and its mirror'}), "
        f"{world_size} process(es) on {device.type}, {precision}")

    # the optimizer, the EMA and the step: fresh, or where the resumed run left them
    lr = args.lr or METHODS[args.method].lr
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}  # all the optimizer and EMA see
    opt = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=0)
    ema = {name: p.detach().float().clone() for name, p in trained.items()}
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if resume:
        opt.load_state_dict(resume.optimizer)
        for group in opt.param_groups:  # the saved state carries the old lr
            group["lr"] = lr
        if scaler.is_enabled() and resume.scaler:  # fp16 before and now
            scaler.load_state_dict(resume.scaler)
        if not restore_rng(resume.rng, rank, world_size, args.seed + resume.step):
            log(f"resuming on {world_size} processes, not {len(resume.rng)}: fresh random streams, not bit-exact")
        ema, step = {name: v.to(device) for name, v in resume.ema.items()}, resume.step
        in_place = run_folder(args.resume) == os.path.abspath(run_dir)
        log(f"resumed from {args.resume} at step {step}" + ("" if in_place else f", into the new run folder {run_dir} "
            "(it is not the newest checkpoint of its run, which stays as it is)"))
        if changed:
            log("changed on resume: " + ", ".join(f"{cli.flag(k)} {old} -> {new}" for k, (old, new) in changed.items()))
    ddp_model = DDP(model, device_ids=[device] if cuda else None) if world_size > 1 else model
    if args.compile:  # random ops drawn as eager draws them: --compile changes the speed, not the label dropout
        torch._inductor.config.fallback_random = True
    network = torch.compile(ddp_model) if args.compile else ddp_model
    trained, averaged = list(trained.values()), [ema[name] for name in trained]

    # the training loop
    model.train()
    meter, last_saved, saved_at = Meter(args, step, lr, device, log), args.resume, time.time()
    bar = dict(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    with owner or contextlib.nullcontext(), cli.StopRequest() as stop, tqdm(**bar) as progress:  # released at the end
        for x, y in batches(dataset, args, step, rank, world_size, device):
            if step >= args.max_steps:
                break
            with torch.no_grad():
                x = data.model_input(x, vae, device)
            loss = train_step(network, diffusion, opt, scaler, x, y.to(device, non_blocking=True), precision)
            save_due = rank == 0 and time.time() - saved_at > 60 * args.ckpt_minutes  # rank 0's clock decides
            mean_loss, diverged, (stopping, save_due) = step_health(loss, trained, [stop.signum is not None, save_due],
                                                                    world_size)
            if diverged:  # the weights in memory are lost; no checkpoint holds them
                log(f"step {step + 1}: the training diverged (loss {mean_loss:.4g}, or a weight non-finite or beyond "
                    f"{MAX_WEIGHT:g}); stopping before it reaches a checkpoint. The last good checkpoint is "
                    f"{last_saved or 'none (none was saved)'}: resume from it with a lower --lr, or --precision fp32.")
                raise SystemExit(1)
            update_ema(averaged, trained, min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup
                       else args.ema_decay)
            step = step + 1
            progress.update()
            meter.update(step, mean_loss)
            if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
                grid = os.path.join(run_dir, SAMPLES_DIR, f"{step:07d}.png")
                write_samples(model, ema, vae, grid, hierarchy.class_names, step)
                log(f"samples at step {step}: {grid}")

            # checkpoints: every --ckpt-every steps and --ckpt-minutes, at the end, and when a signal asks to stop
            if step % args.ckpt_every == 0 or step == args.max_steps or stopping or save_due:
                checkpoint = Checkpoint(
                    method=args.method, options=options, dit=dit_config, base=base, hierarchy=hierarchy.to_dict(),
                    vae=None if vae is None else os.path.abspath(args.vae), model=trainable_state_dict(model),
                    ema=ema, data=dict(kind=args.data, path=args.data_path, split=args.split,
                                       image_size=args.image_size, hflip=not args.no_hflip),
                    step=step, optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rng_states(world_size),
                    settings={k: v for k, v in vars(args).items() if k not in ("resume", "given")})
                cli.by_rank_zero(lambda: save_checkpoint(checkpoint_file(run_dir, step), checkpoint))
                last_saved, saved_at = checkpoint_file(run_dir, step), time.time()
                log(f"saved {last_saved}")
            if stopping:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # processes per node, under torchrun
                launcher = "python" if world_size == 1 else f"torchrun --nproc_per_node={local}" + (
                    f" --nnodes={world_size // local} (and your rendezvous flags)" if world_size > local else "")
                log(f"stopped by a signal after step {step}; continue with: {launcher} train.py --resume {last_saved}")
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    if world_size > 1:  # leave together: no rank exits (closing its connections) while another still works
        dist.barrier()
        dist.destroy_process_group()
    return model, run_dir


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
