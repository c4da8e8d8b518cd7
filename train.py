"""
Fine-tune a pre-trained DiT with any method of peft.py (or train one from scratch), on a CPU or many GPUs.

    torchrun --nproc_per_node=8 train.py --method finediffusion --data inat --data-path /data/inat2021 \\
        --ckpt pretrained/DiT-XL-2-256x256.pt --vae pretrained/sd-vae-ft-ema
    python train.py --data toy --split source --method full --model DiT-T/4 --image-size 32 --vae none

torch.distributed DDP directly (nccl on GPUs, gloo on CPU); frozen parameters get no gradients, no optimizer
state and no all-reduce. Checkpoints (peft.py's format) hold only what the method trains, plus EMA, optimizer, step
and every rank's RNG state, and are written atomically; --resume continues bit-exactly. Each run folder holds
log.txt and metrics.jsonl (one JSON line per logged step: what bench.py's Table 2 reads).
"""
import argparse
import glob
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from diffusion import create_diffusion
from model import DIT_CONFIGS, DiT, dit_name, load_vae
from peft import (METHODS, Checkpoint, count_parameters, load_base, prepare, read_checkpoint, save_checkpoint,
                  trainable_state_dict)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="finediffusion", choices=list(METHODS))
    p.add_argument("--ckpt", default=None, help="base DiT checkpoint (.pt/.safetensors); none: train from scratch")
    p.add_argument("--model", default=None, choices=list(DIT_CONFIGS),
                   help="with --ckpt: checked against the file (any DiT shape loads); without: default DiT-XL/2")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads of a --ckpt that does not record them (default: model.heads_for_width)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default=None, help="SD VAE folder or file (sd-vae-ft-ema); 'none': pixel space")
    p.add_argument("--data", default="inat", choices=["inat", "vegfru", "folder", "toy"])
    p.add_argument("--data-path", default=None, help="dataset root (toy: where to generate it)")
    p.add_argument("--split", default=None, help="inat: train_mini/train/val; toy: source/target")
    p.add_argument("--latent-cache", default=None, help="encode the data once into this folder and train from it")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--lr", type=float, default=None, help="default: the method's suggested lr (peft.METHODS)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--p-parent", type=float, default=0.1, help="P(fine label -> its parent) while training")
    for method, spec in METHODS.items():  # each method's own options, e.g. --lora-rank
        for option, default in spec.options.items():
            p.add_argument(f"--{option.replace('_', '-')}", type=type(default), default=default, help=f"{method} only")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=10_000)
    p.add_argument("--resume", default=None, help="a checkpoint of this script to continue from")
    return p.parse_args(argv)


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


def all_mean(value, world_size):
    """Mean of a scalar tensor over all ranks."""
    if world_size > 1:
        dist.all_reduce(value)
        value = value / world_size
    return value


def rng_states(world_size):
    """Every rank's RNG states (CPU and CUDA), gathered so one file can resume all of them exactly."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def open_run(args, dit_config, rank, world_size):
    """The run folder: the resumed checkpoint's, or results/NNN-model-method (rank 0 picks, every rank writes there)."""
    if args.resume:
        return os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    index = len(glob.glob(os.path.join(args.results_dir, "*")))
    model_name = dit_name(dit_config) or f"DiT-{dit_config['depth']}x{dit_config['hidden_size']}"
    run_dir = [os.path.join(args.results_dir, f"{index:03d}-{model_name.replace('/', '-')}-{args.method}")]
    if world_size > 1:
        dist.broadcast_object_list(run_dir)
    if rank == 0:
        os.makedirs(os.path.join(run_dir[0], "checkpoints"), exist_ok=True)
    return run_dir[0]


class Log:
    """Rank 0 writes each message to the terminal and log.txt, and each logged step as a JSON line to metrics.jsonl."""

    def __init__(self, run_dir, rank):
        names = ("log.txt", "metrics.jsonl")
        self.files = [open(os.path.join(run_dir, name), "a") for name in names] if rank == 0 else None

    def __call__(self, message, **metrics):
        if self.files:
            tqdm.write(message)
            for file, line in zip(self.files, (message, json.dumps(metrics) if metrics else None)):
                if line is not None:
                    file.write(line + "\n")
                    file.flush()


# -----------------------------------------------------------------------------------------------------------
# Data and model


def load_data(args, device, rank, world_size):
    """(vae or None, dataset, hierarchy): images encoded on the fly, cached posterior moments, or pixels."""
    vae = None if args.vae == "none" else load_vae(args.vae, device)
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, split=args.split)
    if args.latent_cache and vae is not None:
        dataset = data.build_latent_cache(dataset, vae, args.latent_cache, rank=rank, world_size=world_size,
                                          num_workers=args.num_workers)
    return vae, dataset, hierarchy


def build_model(args, hierarchy, vae):
    """--ckpt (or a fresh DiT, from scratch) prepared for --method: (model, base config, prepare's options, base)."""
    channels, input_size = 3, args.image_size  # pixel space, or the VAE's latents
    if vae is not None:
        channels, input_size = vae.latent_channels, args.image_size // vae.downsample_factor
    base = None
    if args.ckpt:
        try:
            model, base = load_base(args.ckpt, input_size, args.num_heads, args.model)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--ckpt: {e}")
        if model.in_channels != channels:
            raise SystemExit(f"--ckpt {args.ckpt} expects {model.in_channels} input channels, but --vae {args.vae} "
                             f"gives {channels}")
    else:
        model = DiT(input_size=input_size, in_channels=channels, num_classes=len(hierarchy.class_names),
                    **DIT_CONFIGS[args.model or "DiT-XL/2"])
    config = model.config
    options = dict(class_to_superclass=hierarchy.class_to_superclass, num_superclasses=len(hierarchy.superclass_names),
                   p_parent=args.p_parent, **{name: getattr(args, name) for name in METHODS[args.method].options})
    return prepare(model, args.method, **options), config, options, base if METHODS[args.method].delta else None


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
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images cannot fill one batch of {args.global_batch_size}")
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * local_batch: steps_per_epoch * local_batch]
        yield from DataLoader(dataset, local_batch, sampler=indices, num_workers=args.num_workers,
                              pin_memory=device.type == "cuda", drop_last=True,
                              generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG alone
        epoch, skip = epoch + 1, 0


# -----------------------------------------------------------------------------------------------------------
# Training


def restore(resume, model, opt, scaler, seed, rank, world_size, device, log):
    """Continue from a checkpoint: trained weights, optimizer, scaler and each rank's own random stream ->
    (EMA, step). On another world size the streams start afresh (the run goes on, but not bit-exactly)."""
    model.load_state_dict(resume.model, strict=False)
    opt.load_state_dict(resume.optimizer)
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
    if args.resume:  # continue with the saved settings; only --max-steps may change
        try:
            resume = read_checkpoint(args.resume)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--resume: {e}")
        args = argparse.Namespace(**{**resume.settings, "resume": args.resume, "max_steps": args.max_steps})
    if args.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes")
    if args.vae is None:
        raise SystemExit("give --vae (the SD VAE folder, e.g. sd-vae-ft-ema) or --vae none to train in pixel space")
    if METHODS[args.method].delta and not args.ckpt:
        raise SystemExit(f"--method {args.method} fine-tunes a pre-trained model: give its --ckpt")
    torch.manual_seed(args.seed * world_size + rank)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    vae, dataset, hierarchy = load_data(args, device, rank, world_size)
    model, dit_config, options, base = build_model(args, hierarchy, vae)
    if resume and resume.base != base:
        raise SystemExit(f"--resume: the checkpoint was trained on base {resume.base}, --ckpt is {base}")
    run_dir = open_run(args, dit_config, rank, world_size)
    log = Log(run_dir, rank)
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    diffusion = create_diffusion("")
    total, trainable = count_parameters(model)
    log(f"{args.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
        f"{len(hierarchy.class_names)} classes in {len(hierarchy.superclass_names)} superclasses, "
        f"{len(dataset):,} training images, {world_size} process(es) on {device.type}, {precision}")

    lr = args.lr or METHODS[args.method].lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if resume:
        ema, step = restore(resume, model, opt, scaler, args.seed, rank, world_size, device, log)
        log(f"resumed from {args.resume} at step {step}")
    ddp_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world_size > 1 else model
    forward = autocast_forward(torch.compile(ddp_model) if args.compile else ddp_model, device, precision)

    def save(path):
        checkpoint = Checkpoint(
            method=args.method, options=options, dit=dit_config, base=base, hierarchy=hierarchy.to_dict(),
            vae=None if vae is None else os.path.abspath(args.vae), model=trainable_state_dict(model), ema=ema,
            data=dict(kind=args.data, path=args.data_path, split=args.split, image_size=args.image_size), step=step,
            optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rng_states(world_size), settings=vars(args))
        if rank == 0:
            save_checkpoint(path, checkpoint)

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    timer, logged_steps, running_loss = time.time(), 0, 0.0
    for x, y in batches(dataset, args, step, rank, world_size, device):
        if step >= args.max_steps:
            break
        y = y.to(device, non_blocking=True)
        with torch.no_grad():
            x = to_model_input(x, vae, device)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
        # the guard costs one all-reduce of a scalar per step: every rank must stop at the same step
        mean_loss = all_mean(loss.detach().float().clone(), world_size)
        if not torch.isfinite(mean_loss):
            log(f"step {step}: the loss is {mean_loss.item()}; stopping before it reaches the weights. The last good "
                f"checkpoint is in {run_dir}/checkpoints; resume from it with a lower --lr or --precision bf16/fp32.")
            raise SystemExit(1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # EMA of the trainable parameters only
            for name, p in model.named_parameters():
                if p.requires_grad:
                    ema[name].lerp_(p.detach().float(), 1 - args.ema_decay)
        step, logged_steps, running_loss = step + 1, logged_steps + 1, running_loss + mean_loss.item()
        progress.update()
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = time.time() - timer
            metrics = dict(step=step, loss=running_loss / logged_steps, steps_per_s=logged_steps / elapsed,
                           images_per_s=logged_steps * args.global_batch_size / elapsed, lr=lr, method=args.method)
            log(f"step {step:07d}  loss {metrics['loss']:.4f}  {metrics['steps_per_s']:.2f} steps/s  "
                f"{metrics['images_per_s']:.1f} images/s", **metrics)
            timer, logged_steps, running_loss = time.time(), 0, 0.0
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save(os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"))
            log(f"saved {run_dir}/checkpoints/{step:07d}.pt")
    progress.close()
    if world_size > 1:
        dist.destroy_process_group()
    return model, run_dir


if __name__ == "__main__":
    main(parse_args())
