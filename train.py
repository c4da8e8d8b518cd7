"""
Fine-tune a pre-trained DiT with any method of peft.py (or train one from scratch), on a CPU or many GPUs.

    torchrun --nproc_per_node=8 train.py --method finediffusion --data inat --data-path /data/inat2021 \\
        --ckpt pretrained/DiT-XL-2-256x256.pt --vae pretrained/sd-vae-ft-ema
    python train.py --data toy --split source --method full --model DiT-T/4 --image-size 32 --vae none

torch.distributed DDP directly (nccl on GPUs, gloo on CPU); frozen parameters get no gradients, no optimizer
state and no all-reduce. Checkpoints hold only what the method trains (plus EMA, optimizer, step and every
rank's RNG state) and are written atomically; --resume continues bit-exactly.
"""
import argparse
import glob
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from diffusion import create_diffusion
from model import (DIT_CONFIGS, DiT, describe_dit, dit_config_from_state_dict, dit_state_dict, load_dit_weights,
                   load_state_dict_file, load_vae)
from peft import METHODS, SUGGESTED_LR, base_fingerprint, count_parameters, prepare, trainable_state_dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="finediffusion", choices=METHODS)
    p.add_argument("--ckpt", default=None, help="base DiT checkpoint (.pt/.safetensors); none: train from scratch")
    p.add_argument("--model", default="DiT-XL/2", choices=list(DIT_CONFIGS))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default=None, help="SD VAE folder or file (sd-vae-ft-ema); 'none': pixel space")
    p.add_argument("--data", default="inat", choices=["inat", "vegfru", "folder", "toy"])
    p.add_argument("--data-path", default=None, help="dataset root (toy: where to generate it)")
    p.add_argument("--split", default=None, help="inat: train_mini/train/val; toy: source/target")
    p.add_argument("--latent-cache", default=None, help="encode the data once into this folder and train from it")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--lr", type=float, default=None, help="default: the method's suggested lr (peft.py)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--p-parent", type=float, default=0.1, help="P(fine label -> its parent) while training")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--affiner-rank", type=int, default=64)
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
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
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


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------------------
# The model: base checkpoint -> method -> trainable model


def build_model(args, hierarchy, in_channels, input_size):
    """(model, model_config, method options, base identity) for args.method on the dataset's classes."""
    config = dict(input_size=input_size, in_channels=in_channels, num_classes=1000, **DIT_CONFIGS[args.model])
    base_state_dict, base = None, None
    if args.ckpt:
        base_state_dict = dit_state_dict(load_state_dict_file(args.ckpt))
        found = dit_config_from_state_dict(base_state_dict)
        if (found["depth"], found["hidden_size"], found["patch_size"]) != (config["depth"], config["hidden_size"],
                                                                           config["patch_size"]):
            raise SystemExit(f"--ckpt {args.ckpt} holds {describe_dit(base_state_dict)}, not --model {args.model}")
        if found["in_channels"] != in_channels:
            raise SystemExit(f"--ckpt {args.ckpt} expects {found['in_channels']} input channels but --vae gives "
                             f"{in_channels}: {describe_dit(base_state_dict)}")
        config["num_classes"] = found["table_rows"] - 1  # an ImageNet-style table: classes + null row
        if found["input_size"] and found["input_size"] != input_size:  # DiffFit's trick: 512 px from a 256 px model
            config["pos_embed_scale"] = found["input_size"] / input_size  # positions (i/2, j/2) stay in range
    elif args.method != "full":
        raise SystemExit(f"--method {args.method} fine-tunes a pre-trained model: give its --ckpt")
    model = DiT(**config)
    if base_state_dict is not None:
        load_dit_weights(model, base_state_dict, source=args.ckpt)  # names keys and what the file fits
        base = None if args.method == "full" else dict(path=os.path.abspath(args.ckpt), **base_fingerprint(model))
    options = dict(num_classes=len(hierarchy.class_names), p_parent=args.p_parent)
    if args.method == "finediffusion":
        options.update(class_to_superclass=list(hierarchy.class_to_superclass),
                       num_superclasses=len(hierarchy.superclass_names))
    if args.method == "lora":
        options.update(lora_rank=args.lora_rank)
    if args.method == "diffscaler":
        options.update(affiner_rank=args.affiner_rank)
    return prepare(model, args.method, **options), config, options, base


# -----------------------------------------------------------------------------------------------------------
# Training


def main(args):
    rank, world_size, device = setup_distributed()
    if args.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes")
    resume = None
    if args.resume:  # continue with the saved settings; only --max-steps may change
        resume = torch.load(args.resume, map_location="cpu", weights_only=True)
        args = argparse.Namespace(**{**resume["args"], "resume": args.resume, "max_steps": args.max_steps})
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
    else:
        index = len(glob.glob(os.path.join(args.results_dir, "*")))
        run_dir = os.path.join(args.results_dir, f"{index:03d}-{args.model.replace('/', '-')}-{args.method}")
        if world_size > 1:  # every rank writes into rank 0's choice
            run_dir = [run_dir]
            dist.broadcast_object_list(run_dir)
            run_dir = run_dir[0]
        if rank == 0:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    log_file = open(os.path.join(run_dir, "log.txt"), "a") if rank == 0 else None
    torch.manual_seed(args.seed * world_size + rank)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    def log(message):
        if rank == 0:
            tqdm.write(message)
            log_file.write(message + "\n")
            log_file.flush()

    # Data: images (encoded on the fly), cached posterior moments, or pixels
    if args.vae is None:
        raise SystemExit("give --vae (the SD VAE folder, e.g. sd-vae-ft-ema) or --vae none to train in pixel space")
    vae = None if args.vae == "none" else load_vae(args.vae, device)
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, split=args.split)
    if args.latent_cache and vae is not None:
        dataset = data.build_latent_cache(dataset, vae, args.latent_cache, rank=rank, world_size=world_size,
                                          num_workers=args.num_workers)
    # the DiT sees latents (the SD VAE: 4 channels, 1/8 of the image size) or pixels
    latent_channels = vae.post_quant_conv.in_channels if vae else 3
    input_size = args.image_size // 2 ** (len(vae.encoder.down_blocks) - 1) if vae else args.image_size
    model, model_config, method_options, base = build_model(args, hierarchy, latent_channels, input_size)
    if resume and resume["base"] != base:
        raise SystemExit(f"--resume: the checkpoint was trained on base {resume['base']}, --ckpt is {base}")
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    diffusion = create_diffusion("")
    total, trainable = count_parameters(model)
    log(f"{args.method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
        f"{len(hierarchy.class_names)} classes in {len(hierarchy.superclass_names)} superclasses, "
        f"{len(dataset):,} training images, {world_size} process(es) on {device.type}, {precision}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr or SUGGESTED_LR[args.method], weight_decay=0)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    step = 0
    if resume:
        model.load_state_dict(resume["model"], strict=False)
        ema = {k: v.to(device) for k, v in resume["ema"].items()}
        opt.load_state_dict(resume["opt"])
        step = resume["step"]
        if len(resume["rng"]) == world_size:  # every rank continues its own random stream
            torch.set_rng_state(resume["rng"][rank]["cpu"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(resume["rng"][rank]["cuda"])
        else:
            torch.manual_seed((args.seed + step) * world_size + rank)
            log(f"resuming on {world_size} processes, not {len(resume['rng'])}: fresh random streams, not bit-exact")
        log(f"resumed from {args.resume} at step {step}")
    ddp_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world_size > 1 else model
    network = torch.compile(ddp_model) if args.compile else ddp_model
    low_precision = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)

    def forward(x, t, **model_kwargs):
        """The network in mixed precision; the loss (its VLB term needs the range) in fp32."""
        with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
            return network(x, t, **model_kwargs).float()

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if resume:
        scaler.load_state_dict(resume["scaler"])

    # Data order: a seeded permutation per epoch; resuming skips the batches already seen
    local_batch = args.global_batch_size // world_size
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images cannot fill one batch of {args.global_batch_size}")

    def batches():
        epoch, skip = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            indices = list(sampler)[skip * local_batch: steps_per_epoch * local_batch]
            loader = DataLoader(dataset, local_batch, sampler=indices, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda", drop_last=True,
                                generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG alone
            yield from loader
            epoch, skip = epoch + 1, 0

    def save(path):
        checkpoint = dict(method=args.method, method_options=method_options, model_config=model_config, base=base,
                          hierarchy=hierarchy.to_dict(), model=trainable_state_dict(model), ema=ema,
                          opt=opt.state_dict(), scaler=scaler.state_dict(), step=step, rng=rng_states(world_size),
                          args=vars(args))
        if rank == 0:
            save_atomically(checkpoint, path)

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    timer, logged_steps, running_loss = time.time(), 0, 0.0
    for x, y in batches():
        if step >= args.max_steps:
            break
        y = y.to(device, non_blocking=True)
        with torch.no_grad():
            if isinstance(x, (list, tuple)):  # cached posterior moments: sample q(z|x) afresh every step
                mean, std = x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True)
                x = mean + std * torch.randn_like(std)
            else:
                x = x.to(device, non_blocking=True)
            if vae is not None and x.shape[1] == 3:
                x = vae.encode(x).sample() * vae.scaling_factor
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
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
            log(f"step {step:07d}  loss {running_loss / logged_steps:.4f}  {logged_steps / elapsed:.2f} steps/s  "
                f"{logged_steps * args.global_batch_size / elapsed:.1f} images/s")
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
