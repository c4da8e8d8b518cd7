"""Fine-tune a pre-trained DiT with any method of peft.py (or train one anew), on CPU or GPUs.

    torchrun --nproc_per_node=8 train.py --method finediffusion --data inat --data-path inat \\
        --ckpt pretrained/DiT-XL-2-256x256.pt --vae pretrained/sd-vae-ft-ema --latent-cache cache
    python train.py --resume DiT-XL-2-finediffusion   # a run's name, folder or checkpoint: go on

DDP (nccl on GPUs, gloo on CPU); with every rank's RNG state saved, --resume is bit-exact.
"""
import cli  # first: a quiet Ctrl-C while torch loads

import argparse
import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from checkpoint import (SAMPLES_DIR, Checkpoint, RunLog, checkpoint_file, continued_run, dit_name,
                        find_checkpoint, load_base, load_model, load_vae, lock_run, open_run,
                        read_checkpoint, restore_rng, rng_states, run_folder, save_checkpoint)
from diffusion import create_diffusion, sample
from model import DIT_CONFIGS, DiT
from peft import METHODS, base_problem, count_parameters, prepare, trainable_state_dict

# What a --resume may change; the data may move, but must hold the run's classes.
RESUMABLE = ("max_steps", "lr", "ckpt_every", "ckpt_minutes", "log_every", "sample_every",
             "num_workers", "precision", "compile", "grad_checkpointing", "ckpt", "results_dir",
             "run_name", "data_path", "latent_cache")
MAX_WEIGHT = 1e4  # no trained DiT's weight comes near; a diverging run passes it before overflow


def parse_args(argv=None, doc=__doc__, own_flags=None, **defaults):
    """train.py's flags; toy.py gives its own `doc`, `defaults` and flags (own_flags(parser))."""
    p = cli.Parser(description=doc)
    if own_flags:
        own_flags(p)
    p.add_argument("--method", default="finediffusion", choices=list(METHODS), help="what trains")
    p.add_argument("--ckpt", help="base DiT: a .pt/.safetensors, a run or a run's name; none: new")
    p.add_argument("--model", choices=list(DIT_CONFIGS), help="--ckpt's, checked; else DiT-XL/2")
    p.add_argument("--num-heads", type=cli.POSITIVE, help="a --ckpt's (none: its record or guess)")
    p.add_argument("--image-size", type=cli.number(int, 8, 2048), default=256, help="pixels")
    p.add_argument("--vae", help="SD VAE folder or file (sd-vae-ft-ema); 'none': pixel space")
    p.add_argument("--data", default="inat", choices=data.DATA_KINDS, help="dataset layout")
    p.add_argument("--data-path", help="dataset root (toy: where to generate it)")
    p.add_argument("--split", help="inat: train_mini/train/val; toy: source/target")
    p.add_argument("--latent-cache", help="encode the data once into this folder, train from it")
    p.add_argument("--no-hflip", action="store_true", help="no mirrored copies (text, symbols)")
    p.add_argument("--global-batch-size", type=cli.number(int, 1, 65536), default=256,
                   help="images per step over all processes")
    p.add_argument("--max-steps", type=cli.POSITIVE, default=200_000, help="optimizer steps")
    p.add_argument("--lr", type=cli.number(float, 0.0, 1.0, low_open=True), help="none: --method's")
    p.add_argument("--ema-decay", type=cli.FRACTION, default=0.9999, help="EMA of what trains")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="decay min(decay, (1 + t) / (10 + t)) at step t: a short run's EMA moves")
    p.add_argument("--p-parent", type=cli.FRACTION, default=0.1, help="P(fine label -> parent)")
    for method, spec in METHODS.items():  # each method's own options, e.g. --lora-rank
        for option, default in spec.options.items():
            p.add_argument(cli.flag(option), type=cli.number(type(default), 1, 4096),
                           default=default, help=f"{method} only")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="none: bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--grad-checkpointing", action="store_true", help="less memory, slower")
    p.add_argument("--num-workers", type=cli.NUM_WORKERS, default=cli.WORKERS, help="per rank")
    p.add_argument("--seed", type=cli.SEED, default=0, help="new weights, data order, noise")
    p.add_argument("--results-dir", default="results", help="where run folders are made")
    p.add_argument("--run-name", help="run folder results-dir/NNN-<name> (none: model-method)")
    p.add_argument("--log-every", type=cli.POSITIVE, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=cli.POSITIVE, default=10_000, help="steps between saves")
    p.add_argument("--ckpt-minutes", type=cli.number(float, 0.0, low_open=True), default=30.0,
                   help="and minutes between saves")
    p.add_argument("--sample-every", type=cli.NON_NEGATIVE, default=0, help="steps between grids")
    p.add_argument("--resume", help="a checkpoint to continue (a run or name: its newest)")
    p.set_defaults(**defaults)
    return p.parse_args(argv)


def precision_for(device, precision=None):
    """The autocast precision: as given, else bf16 on CUDA and fp32 elsewhere."""
    return precision or ("bf16" if device.type == "cuda" else "fp32")


def check_args(args, world_size):
    """Every check that needs no data -> (args, the resumed Checkpoint, what a resume changed)."""
    resume, changed = None, ""
    if args.resume:
        args.resume = find_checkpoint(args.resume, args.results_dir)
        resume = read_checkpoint(args.resume)
        if refused := [cli.flag(k) for k in args.given if k not in (*RESUMABLE, "resume")]:
            raise ValueError(f"--resume cannot change {', '.join(refused)} (saved with the run); "
                             f"it can change {', '.join(map(cli.flag, RESUMABLE))}")
        # flags newer than the checkpoint take their defaults, but for the EMA warm-up: it had none
        settings = {**vars(parse_args([])), "ema_warmup": False, **resume.settings}
        given = {k: getattr(args, k) for k in args.given if k != "resume"}
        changed = ", ".join(f"{cli.flag(k)} {settings[k]} -> {v}" for k, v in given.items()
                            if settings[k] != v)
        settings.update(given, resume=args.resume, given=args.given)
        args = argparse.Namespace(**settings)
        if run_folder(args.resume) and "results_dir" not in args.given:  # a branch goes beside it
            args.results_dir = os.path.dirname(run_folder(args.resume))
        if args.max_steps <= resume.step:
            raise ValueError(f"--max-steps {args.max_steps}: the checkpoint is at step "
                             f"{resume.step} already; give a larger --max-steps")
        if in_place := continued_run(args.resume):  # in use by another process: refused now
            cli.by_rank_zero(lambda: lock_run(in_place).release())
    if foreign := [f"{cli.flag(o)} ({m})" for m in METHODS if m != args.method
                   for o in METHODS[m].options if o in args.given]:
        raise ValueError(f"{', '.join(foreign)}: not an option of --method {args.method}, which "
                         f"has {', '.join(map(cli.flag, METHODS[args.method].options)) or 'none'}")
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"{world_size} processes")
    if args.vae is None:
        raise ValueError("give --vae (the SD VAE folder, e.g. sd-vae-ft-ema), or --vae none")
    if METHODS[args.method].delta and not args.ckpt:
        raise ValueError(f"--method {args.method} fine-tunes a pre-trained model: give its --ckpt")
    if problem := data.data_path_problem(args.data, args.data_path):
        raise ValueError(problem)
    cli.writable_folder(args.results_dir, "--results-dir")
    cli.plain_name(args.run_name, "--run-name")
    if args.latent_cache:
        if args.vae == "none":
            raise ValueError("--latent-cache: with --vae none (pixel space) there are none")
        if problem := data.cache_folder_problem(args.latent_cache):
            raise ValueError(problem)
        cli.writable_folder(args.latent_cache, "--latent-cache")
    if args.ckpt and (resume is None or "ckpt" in args.given):  # (a resume's: load_model's)
        args.ckpt = find_checkpoint(args.ckpt, args.results_dir)
    return args, resume, changed


def train_step(network, diffusion, opt, scaler, x, y, precision):
    """One step on x (N, C, H, W), y (N,) -> the loss: the network under autocast, the loss fp32."""
    low = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    autocast = torch.autocast(x.device.type, dtype=low, enabled=low is not None)
    forward = autocast(lambda x, t, y: network(x, t, y).float())
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()  # Improved DDPM 16
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)  # fp16: a step whose gradients overflowed is skipped, the scale lowered
    scaler.update()
    return loss


def update_ema(averaged, trained, decay):
    """averaged = decay * averaged + (1 - decay) * trained, fused: bit-identical to lerp_ each."""
    torch._foreach_lerp_(averaged, [p.detach().float() for p in trained], 1 - decay)


def batches(dataset, args, step, rank, world_size, device):
    """This rank's batches from `step` on: a seeded permutation per epoch (a resume skips ahead)."""
    local_batch = args.global_batch_size // world_size
    sampler = DistributedSampler(dataset, world_size, rank, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch  # > 0: checked before
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * local_batch: steps_per_epoch * local_batch]
        yield from DataLoader(dataset, local_batch, sampler=indices, num_workers=args.num_workers,
                              pin_memory=device.type == "cuda", drop_last=True,
                              generator=torch.Generator().manual_seed(epoch))  # not the global RNG
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def write_samples(model, ema, vae, run_dir, class_names, step, log):
    """The EMA's grid at `step`: 8 classes, 2 images each, from noise of its own RNG."""
    num_classes, device = model.y_embedder.num_classes, model.pos_embed.device
    classes = torch.linspace(0, num_classes - 1, min(8, num_classes)).round().long()
    labels = classes.repeat_interleave(2)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.eval().load_state_dict(ema, strict=False)
    x = sample(model, z, labels.to(device), sampler="dpm++", steps=10, progress=False)
    path = os.path.join(run_dir, SAMPLES_DIR, f"{step:07d}.png")
    data.save_grid(data.to_pixels(x, vae), path, cols=2, titles=[f"step {step}"],
                   row_names=[class_names[c] for c in classes])
    model.train().load_state_dict(trained, strict=False)
    log(f"samples at step {step}: {path}")


class Meter:
    """Loss and speed every --log-every steps; on a CPU, once and early, what the run will cost:
    from step 1 if it took over 20 s, else from the next ones until 5 steps or 20 s."""
    def __init__(self, args, step, lr, device, log):
        self.args, self.lr, self.log, self.start = args, lr, log, step
        self.projected = device.type != "cpu"  # a GPU run shows its rate in the log lines
        self.timer, self.steps, self.loss = time.time(), 0, 0.0

    def update(self, step, loss):
        args, now = self.args, time.time()
        self.steps, self.loss = self.steps + 1, self.loss + loss
        first = step == self.start + 1  # timed alone; the warm steps after it from its end
        since, measured = (self.timer, 1) if first else (self.warm, step - self.start - 1)
        self.warm = now if first else self.warm
        if not self.projected and (measured >= 5 or now - since > 20):
            self.projected, steps_per_s = True, measured / (now - since)
            seconds = (args.max_steps - step) / steps_per_s
            hint = "; a job for GPUs. A first run that ends in minutes: python toy.py"
            self.log(f"on this CPU: {steps_per_s * args.global_batch_size:.1f} images/s over "
                     f"{f'step {step}' if first else f'steps {self.start + 2}-{step}'}; the "
                     f"{args.max_steps - step:,} steps to go take about {cli.duration(seconds)}"
                     f"{hint if seconds >= 3600 else ''}")
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = now - self.timer
            metrics = dict(step=step, loss=self.loss / self.steps, steps_per_s=self.steps / elapsed,
                           images_per_s=self.steps * args.global_batch_size / elapsed, lr=self.lr,
                           method=args.method)
            self.log(f"step {step:07d}  loss {metrics['loss']:.4f}  {metrics['steps_per_s']:.2f} "
                     f"steps/s  {metrics['images_per_s']:.1f} images/s", **metrics)
            self.timer, self.steps, self.loss = time.time(), 0, 0.0


class Guard(cli.StopRequest):
    """Save and stop, agreed by all ranks a step: a signal saves, exits 128 + signum; divergence
    (loss or weight inf/NaN or > MAX_WEIGHT) exits 1 unsaved; rank 0 saves every --ckpt-minutes."""
    def __init__(self, args, world_size, log, save):
        self.args, self.world_size, self.log, self.save = args, world_size, log, save
        self.last_saved, self.saved_at = args.resume, time.time()

    def after_step(self, step, loss, trained):
        """-> the loss averaged over ranks."""
        args = self.args  # due: a step to save, or rank 0's clock says so
        due = (step % args.ckpt_every == 0 or step == args.max_steps or cli.is_rank_zero()
               and time.time() - self.saved_at > 60 * args.ckpt_minutes)
        largest = torch.nn.utils.get_total_norm([p.detach() for p in trained], norm_type=torch.inf)
        bad = ~torch.isfinite(largest) | (largest > MAX_WEIGHT) | ~torch.isfinite(loss.detach())
        asked = torch.tensor([self.signum is not None, due], device=loss.device)  # by any rank
        health = torch.cat([torch.stack([loss.detach().float(), bad.float()]), asked])
        if self.world_size > 1:
            dist.all_reduce(health)
        loss, bad, self.stopping, self.due = health.tolist()
        if bad:  # the weights in memory are lost; no checkpoint holds them
            self.log(f"step {step}: training diverged (loss {loss / self.world_size:.4g}, or a "
                     f"weight > {MAX_WEIGHT:g} or inf/NaN), unsaved. The last good checkpoint is "
                     f"{self.last_saved or 'none'}: resume with a lower --lr, or --precision fp32")
            raise SystemExit(1)
        return loss / self.world_size

    def end_step(self, step):
        """Save if due; then exit if a signal asked, saying how to go on."""
        if self.due or self.stopping:
            self.last_saved, self.saved_at = self.save(step), time.time()
            self.log(f"saved {self.last_saved}")
        if self.stopping:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))  # processes per node
            launcher = "python" if self.world_size == 1 else f"torchrun --nproc_per_node={local}"
            if self.world_size > local:
                launcher += f" --nnodes={self.world_size // local} (and your rendezvous flags)"
            self.log(f"stopped by a signal after step {step}; continue with: {launcher} train.py "
                     f"--resume {self.last_saved}")
            raise SystemExit(128 + (self.signum or signal.SIGTERM))


def load_data_and_model(args, resume, rank, world_size, device):
    """Each checked before slow work -> (VAE, training set, model (a resume's rebuilt), fields)."""
    vae = None if args.vae == "none" else load_vae(args.vae, device)
    if vae is not None and args.image_size % vae.downsample_factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's "
                         f"{vae.downsample_factor}")
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, args.split,
                                           not args.no_hflip)
    channels, input_size = ((3, args.image_size) if vae is None else
                            (vae.latent_channels, args.image_size // vae.downsample_factor))
    own = {name: getattr(args, name) for name in METHODS[args.method].options}  # e.g. lora_rank
    options = dict(class_to_superclass=hierarchy.class_to_superclass, p_parent=args.p_parent,
                   num_superclasses=len(hierarchy.superclass_names), **own)
    if resume:  # the label table's rows are the run's classes
        keys = ("class_names", "superclass_names", "class_to_superclass")
        now, was = ([h[k] for k in keys] for h in (hierarchy.to_dict(), resume.hierarchy))
        if now != was:
            raise ValueError(f"--resume: the data at {args.data_path} now has {len(now[0])} "
                             f"classes in {len(now[1])} superclasses, where the run trained on "
                             f"{len(was[0])} in {len(was[1])} (or other names or order): give the "
                             f"data as it was, or fine-tune anew with --ckpt {args.resume}")
        model, _ = load_model(args.resume, args.ckpt if "ckpt" in args.given else None,
                              weights="raw", merged=False)
        dit, base = resume.dit, resume.base
    else:  # a pre-trained base, or a new DiT whose one label row prepare() replaces by the table
        model, base = (load_base(args.ckpt, input_size, args.num_heads) if args.ckpt else (DiT(
            input_size=input_size, in_channels=channels, num_classes=1,
            **DIT_CONFIGS[args.model or "DiT-XL/2"]), None))
        dit = model.config
        if args.model and dit_name(dit) != args.model:
            raise ValueError(f"--ckpt {args.ckpt} holds {dit_name(dit) or 'another DiT shape'}, "
                             f"not --model {args.model}")
        if problem := base_problem(model, args.method, **own):
            raise ValueError(problem)
        if model.in_channels != channels:
            raise ValueError(f"--ckpt {args.ckpt} expects {model.in_channels} input channels, but "
                             f"--vae {args.vae} gives {channels}")
        if input_size % model.patch_size:
            raise ValueError(f"--image-size {args.image_size}: the {input_size} px "
                             f"{'latents' if vae else 'images'} do not split into the model's "
                             f"{model.patch_size} px patches")
        prepare(model, args.method, **options)
    if args.latent_cache and vae is not None:
        dataset = data.build_latent_cache(dataset, vae, args.latent_cache, rank, world_size,
                                          num_workers=args.num_workers)
    if len(dataset) < args.global_batch_size:  # each rank's share, a batch at least
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the {len(dataset)} "
                         f"training images cannot fill one batch")
    dataset[0]  # an item read: a set whose images cannot be read is refused before a run folder
    return vae, dataset, model, dict(
        method=args.method, options=options, dit=dit, hierarchy=hierarchy.to_dict(),
        base=base if METHODS[args.method].delta else None,
        vae=None if vae is None else os.path.abspath(args.vae),
        data=dict(kind=args.data, path=args.data_path, split=args.split,
                  image_size=args.image_size, hflip=not args.no_hflip),
        settings={k: v for k, v in vars(args).items() if k not in ("resume", "given")})


def main(args):
    """Train as `args` say -> (the model, its run folder)."""
    rank, world_size, device = cli.init_distributed()
    args, resume, changed = check_args(args, world_size)
    torch.manual_seed(args.seed * world_size + rank)
    precision = precision_for(device, args.precision)
    vae, dataset, model, fields = load_data_and_model(args, resume, rank, world_size, device)
    dit, hierarchy = fields["dit"], fields["hierarchy"]
    name = (dit_name(dit) or f"DiT-{dit['depth']}x{dit['hidden_size']}").replace("/", "-")
    name = args.run_name or f"{name}-{args.method}"
    owner = cli.by_rank_zero(lambda: open_run(args.results_dir, name, args.resume))  # its lock
    run_dir = cli.shared(owner and os.path.dirname(owner.path))
    log = RunLog(run_dir, rank)
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    total, trainable = count_parameters(model)
    mirrors = "no mirrors" if args.no_hflip else "each image and its mirror"
    log(f"{args.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}"
        f"%), {len(hierarchy['class_names'])} classes in {len(hierarchy['superclass_names'])} "
        f"superclasses, {len(dataset):,} training items ({mirrors}), {world_size} process(es) on "
        f"{device.type}, {precision}")
    lr = args.lr or METHODS[args.method].lr
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if resume:  # the run's optimizer (at the new lr), fp16 scale and random streams
        opt.load_state_dict(resume.optimizer)
        for group in opt.param_groups:  # the saved state carries the old lr
            group["lr"] = lr
        if scaler.is_enabled() and resume.scaler:  # fp16 before and now
            scaler.load_state_dict(resume.scaler)
        if not restore_rng(resume.rng, rank, world_size, args.seed + resume.step):
            log(f"resuming on {world_size} processes, not {len(resume.rng)}: fresh random "
                f"streams, not bit-exact")
        branch = run_folder(args.resume) != os.path.abspath(run_dir)  # not its run's newest
        log(f"resumed from {args.resume} at step {resume.step}" + (f", into the new run folder "
            f"{run_dir} (its own run stays as it is)" if branch else ""))
    ema = ({n: v.to(device) for n, v in resume.ema.items()} if resume else
           {n: p.detach().float().clone() for n, p in trained.items()})
    step = resume.step if resume else 0
    if changed:
        log(f"changed on resume: {changed}")
    network = model if world_size == 1 else DDP(
        model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:  # random ops as eager draws them: --compile changes speed, not label dropout
        torch._inductor.config.fallback_random = True
        network = torch.compile(network)
    averaged, trained = [ema[n] for n in trained], list(trained.values())  # the EMA's, the opt's

    model.train()
    meter, diffusion = Meter(args, step, lr, device, log), create_diffusion("")
    steps = tqdm(range(step + 1, args.max_steps + 1), "train", initial=step, total=args.max_steps,
                 disable=rank != 0, dynamic_ncols=True)

    def save(step):  # -> its path; with every rank's RNG state, written by rank 0
        checkpoint = Checkpoint(**fields, model=trainable_state_dict(model), ema=ema, step=step,
                                optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                                rng=rng_states(world_size))
        cli.by_rank_zero(lambda: save_checkpoint(checkpoint_file(run_dir, step), checkpoint))
        return checkpoint_file(run_dir, step)

    with owner or contextlib.nullcontext(), Guard(args, world_size, log, save) as guard:
        for step, (x, y) in zip(steps, batches(dataset, args, step, rank, world_size, device)):
            with torch.no_grad():
                x, y = data.model_input(x, vae, device), y.to(device, non_blocking=True)
            loss = train_step(network, diffusion, opt, scaler, x, y, precision)
            mean_loss = guard.after_step(step, loss, trained)
            warm = min(args.ema_decay, step / (9 + step))  # (1 + t) / (10 + t) at t = step - 1
            update_ema(averaged, trained, warm if args.ema_warmup else args.ema_decay)
            meter.update(step, mean_loss)
            if rank == 0 and args.sample_every and (step % args.sample_every == 0
                                                    or step == args.max_steps):
                write_samples(model, ema, vae, run_dir, hierarchy["class_names"], step, log)
            guard.end_step(step)
    if world_size > 1:  # leave together: no rank exits (closing connections) while another works
        dist.barrier()
        dist.destroy_process_group()
    return model, run_dir


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
