"""
Speed and memory of every fine-tuning method, measured in one run so the ratios are fair on a shared machine:

    python bench.py --model DiT-XL/2 --image-size 256 --batch-size 32         # on a GPU
    python bench.py --model DiT-S/4 --image-size 64 --batch-size 8 --steps 5  # on a CPU

Training: images/s of a full step (forward, hybrid loss, backward, AdamW) and peak memory, each method in a fresh
process (so peaks do not mix), the ratio to full fine-tuning, and on CUDA the model FLOPs utilisation.
Sampling: images/s of guided DDPM steps for the base DiT and each method after merge().
"""
import argparse
import multiprocessing
import resource
import time

import torch

from diffusion import create_diffusion, sample_ddpm
from model import DIT_CONFIGS, DiT
from peft import METHODS, merge, prepare

NUM_CLASSES, NUM_SUPERCLASSES = 10000, 11  # iNat 2021's label table


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2", choices=list(DIT_CONFIGS))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method, after 3 warm-up steps")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA")
    p.add_argument("--sample-steps", type=int, default=10, help="timed guided sampling steps (0: skip)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    return p.parse_args()


def build(args, method, device):
    """A randomly initialised DiT prepared for `method` on iNat's 10,000 + 11 classes (weights do not matter)."""
    model = DiT(input_size=args.image_size // 8, num_classes=1000, **DIT_CONFIGS[args.model]).to(device)
    return prepare(model, method, NUM_CLASSES, [c % NUM_SUPERCLASSES for c in range(NUM_CLASSES)], NUM_SUPERCLASSES)


def forward_flops(args):
    """Matmul FLOPs of one forward pass per image: 2 * (12 D^2 per token + 2 T D for attention) per block."""
    cfg = DIT_CONFIGS[args.model]
    D, L, T = cfg["hidden_size"], cfg["depth"], (args.image_size // 8 // cfg["patch_size"]) ** 2
    return 2 * L * T * (12 * D * D + 2 * T * D)


def timed(fn, steps, device):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def train_step_worker(args, method, queue):
    """One method in its own process: seconds per training step and peak memory in GiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else None
    torch.manual_seed(0)
    model = build(args, method, device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    diffusion = create_diffusion("")
    x = torch.randn(args.batch_size, 4, args.image_size // 8, args.image_size // 8, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.steps, device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    queue.put((seconds, peak / 2**30))


def sampling_throughput(args, device):
    """Images/s of guided DDPM steps: the base DiT and every method's merged model run at the same speed."""
    diffusion = create_diffusion(str(args.sample_steps))
    results = {}
    for method in ["base"] + [m for m in args.methods.split(",") if m != "full"]:
        torch.manual_seed(0)
        model = (DiT(input_size=args.image_size // 8, num_classes=1000, **DIT_CONFIGS[args.model]).to(device)
                 if method == "base" else merge(build(args, method, device))).eval()
        n, size = args.batch_size, args.image_size // 8
        z = torch.randn(n, 4, size, size, device=device)
        labels = torch.randint(0, model.y_embedder.num_classes, (n,), device=device)
        parents = (model.y_embedder.parent[labels] if model.y_embedder.num_superclasses
                   else torch.full_like(labels, model.y_embedder.null_index))
        kwargs = dict(y=torch.cat([labels, parents]), cfg_scale=4.0)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seconds = timed(lambda: sample_ddpm(model.forward_with_cfg, torch.cat([z, z]), diffusion, kwargs, False),
                            1, device)
        results[method] = n * args.sample_steps / seconds  # image-steps per second
    return results


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, {NUM_CLASSES} + {NUM_SUPERCLASSES} classes, "
          f"{name}, torch {torch.__version__}")
    context = multiprocessing.get_context("spawn")
    rows = {}
    for method in args.methods.split(","):
        queue = context.Queue()
        worker = context.Process(target=train_step_worker, args=(args, method, queue))
        worker.start()
        rows[method] = queue.get()
        worker.join()
    full = rows.get("full", next(iter(rows.values())))
    print("\n| method | images/s | vs full | peak memory (GiB) | vs full |" + (" MFU |" if device.type == "cuda" else "")
          + "\n|---|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    for method, (seconds, peak) in rows.items():
        line = (f"| {method} | {args.batch_size / seconds:.1f} | {full[0] / seconds:.2f}x | {peak:.2f} | "
                f"{peak / full[1]:.2f}x |")
        if device.type == "cuda":  # full trains every weight: 3 forward passes' worth; frozen weights skip one
            flops = forward_flops(args) * args.batch_size * (3 if method == "full" else 2)
            line += f" {100 * flops / seconds / (args.peak_tflops * 1e12):.1f}% |"
        print(line)
    if args.sample_steps:
        results = sampling_throughput(args, device)
        print(f"\nguided sampling ({args.sample_steps} DDPM steps, batch {args.batch_size}, scale 4.0):")
        print("| model | image-steps/s | vs base |\n|---|---:|---:|")
        for method, rate in results.items():
            print(f"| {method} | {rate:.1f} | {rate / results['base']:.2f}x |")


if __name__ == "__main__":
    main()
