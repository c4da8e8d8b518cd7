"""
Speed and memory of every fine-tuning method, measured in one run so the ratios are fair on a shared machine:

    python bench.py --model DiT-XL/2 --image-size 256 --batch-size 32         # on a GPU
    python bench.py --model DiT-S/4 --image-size 64 --batch-size 8 --steps 5  # on a CPU

Training: images/s of train.py's step (autocast forward, fp32 hybrid loss, backward, AdamW) and peak memory, each
method in a fresh process (so peaks do not mix), the ratio to full fine-tuning, and on CUDA the model FLOPs
utilisation. Sampling: images/s of guided DDPM steps for the base DiT and each method after merge().
`--table` prints the paper's Table 2 instead: parameters per method, and the training throughput of finished
runs read from their metrics.jsonl (`--runs results/*`). `--estimates` prints what a step costs at full size,
counted without running it (FLOPs, activation and state bytes), and what that makes on an A100, H100 and H200 at an
assumed MFU: estimates, for machines this one is not.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import math
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import cli
from checkpoint import find_checkpoint, read_checkpoint, read_metrics, saved_checkpoints
from cli import NON_NEGATIVE, POSITIVE, number
from diffusion import SAMPLER_STEPS, create_diffusion, sample
from model import DIT_CONFIGS, AutoencoderKL, DiT, dit_name
from peft import METHODS, count_parameters, merge, parameter_table, prepare
from train import train_step

NUM_CLASSES, NUM_SUPERCLASSES = 10000, 11  # iNat 2021's label table
PARENTS = [c % NUM_SUPERCLASSES for c in range(NUM_CLASSES)]  # the split does not change counts or speed
with torch.device("meta"):
    SD_VAE = AutoencoderKL()  # only its geometry: 4 latent channels, 1/8 of the image size


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default="DiT-XL/2", choices=list(DIT_CONFIGS), help="the DiT to time")
    p.add_argument("--image-size", type=POSITIVE, default=256, help="pixels (the DiT sees the SD VAE's latents)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="images per step")
    p.add_argument("--steps", type=POSITIVE, default=20, help="timed steps per method, after 3 warm-up steps")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to time ('': none)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="none: bf16 on CUDA")
    p.add_argument("--sample-steps", type=NON_NEGATIVE, default=10, help="timed guided DDPM steps (0: skip)")
    p.add_argument("--samplers", default=",".join(SAMPLER_STEPS),
                   help="samplers to compare at their usual step counts on a FineDiffusion model ('': none)")
    p.add_argument("--peak-tflops", type=number(float, 0.0, low_open=True), default=989.0,
                   help="the GPU's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--estimates", action="store_true",
                   help="print the counted FLOPs and bytes of a training step per method and, from them, GPU estimates")
    p.add_argument("--mfu", type=number(float, 0.0, 1.0, low_open=True), default=0.4,
                   help="the model FLOPs utilisation --estimates assumes")
    p.add_argument("--table", action="store_true", help="print Table 2 (parameters, throughput of --runs) instead")
    p.add_argument("--runs", nargs="*", default=[], help="train.py run folders whose metrics.jsonl --table reads")
    args = p.parse_args(argv)
    args.methods, args.samplers = ([n for n in names.split(",") if n] for names in (args.methods, args.samplers))
    for flag, names, known in (("--methods", args.methods, METHODS), ("--samplers", args.samplers, SAMPLER_STEPS)):
        if set(names) - set(known):
            p.error(f"argument {flag}: unknown {sorted(set(names) - set(known))}")
    if args.sample_steps == 1:
        p.error("argument --sample-steps: DDPM takes at least 2 steps")
    multiple = SD_VAE.downsample_factor * DIT_CONFIGS[args.model]["patch_size"]  # whole latents, whole patches
    if args.image_size % multiple:
        p.error(f"argument --image-size: {args.model} in the SD VAE's latent space needs a multiple of {multiple}")
    return args


def dit_config(args):
    """The DiT of --model in the SD VAE's latent space at --image-size."""
    return dict(DIT_CONFIGS[args.model], input_size=args.image_size // SD_VAE.downsample_factor,
                in_channels=SD_VAE.latent_channels)


def build(args, method, device):
    """A randomly initialised DiT prepared for `method` on iNat's 10,000 + 11 classes (weights do not matter)."""
    return prepare(DiT(**dit_config(args)).to(device), method, PARENTS)


def timed(fn, steps, device, warmup=3, desc=None):
    """Seconds per call of fn, after `warmup` calls; with desc, a progress bar over all of them (on a CPU a large
    model takes minutes a call)."""
    with tqdm(total=warmup + steps, desc=desc, disable=desc is None, leave=False) as bar:
        for _ in range(warmup):
            fn()
            bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
            bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


def peak_memory(device):
    """Peak bytes: CUDA's allocator's, else ru_maxrss (KiB on Linux, bytes on macOS); NaN without `resource`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource  # POSIX only
    except ImportError:
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def train_step_worker(args, method, queue):
    """One method in its own process: seconds per training step and peak memory in GiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model = build(args, method, device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    diffusion = create_diffusion("")
    x = torch.randn(args.batch_size, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    step = lambda: train_step(model, diffusion, opt, scaler, x, y, precision)  # train.py's own step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.steps, device, desc=f"{method}: training steps")
    queue.put((seconds, peak_memory(device) / 2**30))


def sampling_throughput(args, device):
    """Images/s of guided DDPM steps: the base DiT and every method's merged model run at the same speed."""
    results = {}
    for method in tqdm(["base"] + [m for m in args.methods if m != "full"], desc="guided sampling", leave=False):
        torch.manual_seed(0)
        model = (DiT(**dit_config(args)).to(device) if method == "base" else merge(build(args, method, device))).eval()
        z = torch.randn(args.batch_size, model.in_channels, model.input_size, model.input_size, device=device)
        labels = torch.randint(0, model.y_embedder.num_classes, (args.batch_size,), device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seconds = timed(lambda: sample(model, z, labels, steps=args.sample_steps, progress=False), 1, device)
        results[method] = args.batch_size * args.sample_steps / seconds  # image-steps per second
    return results


def sampler_comparison(args, device):
    """Guided sampling of one batch by each sampler at its usual budget (DDPM 250, DDIM 50, DPM-Solver++ 20 model
    calls) -> {sampler: (model calls, seconds)}. Every call is one forward pass of the doubled batch."""
    torch.manual_seed(0)
    model = merge(build(args, "finediffusion", device)).eval()
    z = torch.randn(args.batch_size, model.in_channels, model.input_size, model.input_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    calls, results = [], {}
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        timed(lambda: model(torch.cat([z, z]), torch.full((2 * len(z),), 500, device=device), labels.repeat(2)), 1,
              device)  # warm-up: kernels, allocator
        for name in tqdm(args.samplers, desc="samplers", leave=False):
            calls.clear()
            seconds = timed(lambda: sample(model, z, labels, sampler=name, progress=False), 1, device, warmup=0)
            results[name] = (len(calls), seconds)
    return results


# -----------------------------------------------------------------------------------------------------------
# Counted work: what a training step costs at full size, without running it. The model runs on the meta device
# (shapes, no numbers): torch's FlopCounterMode counts the FLOPs of the forward and the backward pass, and
# saved-tensor hooks the bytes autograd keeps for the backward, under bf16 autocast as on a GPU. A GPU's figures
# follow from them at a stated MFU: estimates, labelled so.

GPUS = {"A100 80GB": (312e12, 80e9), "H100 SXM": (989e12, 80e9), "H200": (989e12, 141e9)}  # dense bf16 FLOP/s, bytes


def count_step(config, method, batch):
    """A training step of DiT(**config) prepared for `method` on `batch` images, counted on the meta device ->
    (forward FLOPs, backward FLOPs, bytes saved for the backward, (total, trainable) parameters)."""
    with torch.device("meta"):
        model = prepare(DiT(**config).to("meta"), method, PARENTS)  # (pos_embed is made on the CPU)
        x = torch.zeros(batch, config["in_channels"], config["input_size"], config["input_size"])
        t, y = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
    saved = []
    keep = lambda tensor: saved.append(0 if isinstance(tensor, torch.nn.Parameter) else
                                       tensor.numel() * tensor.element_size()) or tensor
    with FlopCounterMode(display=False) as forward, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    with FlopCounterMode(display=False) as backward:
        out.float().mean().backward()
    return forward.get_total_flops(), backward.get_total_flops(), sum(saved), count_parameters(model)


def counted_work(config, method):
    """Per image: forward and backward FLOPs and activation bytes (the difference of a 2- and a 1-image step). Per
    step, the bytes that do not grow with the batch: fp32 weights; the gradients, AdamW's two moments and the EMA
    (fp32) of what trains; the bf16 weight copies autocast keeps for the backward."""
    (f1, b1, a1, _), (f2, b2, a2, (total, trainable)) = (count_step(config, method, n) for n in (1, 2))
    return dict(forward=f2 - f1, backward=b2 - b1, activations=a2 - a1, weights=4 * total, gradients=4 * trainable,
                adamw=8 * trainable, ema=4 * trainable, copies=2 * a1 - a2, trainable=trainable / total)


STATE = ("weights", "gradients", "adamw", "ema", "copies")  # what a step holds whatever its batch


def estimates_markdown(args):
    """--estimates: counted FLOPs and bytes per method at --model and --image-size, then what they make on each GPU
    of GPUS at --mfu: the batch that fits 90% of its memory, and images/s."""
    methods = tqdm(args.methods, desc="counting", leave=False)
    work = {method: counted_work(dit_config(args), method) for method in methods}
    lines = [f"{args.model} at {args.image_size} px, bf16 autocast, counted per training step (frozen weights need no "
             f"weight gradients):\n",
             "| method | trains | GFLOPs/image forward | backward | weights | gradients | AdamW | EMA | bf16 copies | "
             "activations/image |", "|---|" + "---:|" * 9]
    lines += [f"| {method} | {100 * w['trainable']:.2f}% | {w['forward'] / 1e9:,.1f} | {w['backward'] / 1e9:,.1f} | "
              + " | ".join(f"{w[k] / 2**30:.2f} GiB" for k in STATE) + f" | {w['activations'] / 2**20:,.0f} MiB |"
              for method, w in work.items()]
    lines += [f"\nESTIMATES, not measurements: images/s at {args.mfu:.0%} MFU of each GPU's published dense bf16 peak, "
              f"and the batch that fits 90% of its memory:\n",
              "| method | " + " | ".join(f"{gpu}: batch, images/s" for gpu in GPUS) + " |",
              "|---|" + "---:|" * len(GPUS)]
    for method, w in work.items():
        fits = [int((0.9 * memory - sum(w[k] for k in STATE)) // w["activations"]) for _, memory in GPUS.values()]
        lines.append(f"| {method} | " + " | ".join(
            f"{batch}, {args.mfu * peak / (w['forward'] + w['backward']):,.0f}" if batch > 0 else "does not fit"
            for batch, (peak, _) in zip(fits, GPUS.values())) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# Table 2: parameters per method, and what finished runs measured

def training_throughput(runs):
    """{method: median images/s} over the logged steps of train.py runs (the median: start-up aside)."""
    speeds = {}
    for run in runs:
        for record in read_metrics(run):
            speeds.setdefault(record["method"], []).append(record["images_per_s"])
    return {method: float(np.median(values)) for method, values in speeds.items()}


def counted_model(args):
    """What Table 2 counts: the DiT and classes the --runs trained, from their newest checkpoints (a pixel-space run
    has 3 input channels at its image size), with each run's own method options; without checkpoints, --model in
    the SD VAE's latent space at --image-size with iNat's classes -> (DiT config, fine -> superclass, {method:
    prepare() options}, what it is)."""
    found = {run: read_checkpoint(find_checkpoint(run)) for run in args.runs
             if os.path.isfile(run) or saved_checkpoints(run)}
    if not found:  # runs that stopped before their first checkpoint: their metrics still count
        return dit_config(args), PARENTS, {}, f"{args.model}, {args.image_size} px in the SD VAE's latent space"
    first = next(iter(found.values()))
    other = [run for run, c in found.items() if (c.dit, c.options["class_to_superclass"]) !=
             (first.dit, first.options["class_to_superclass"])]
    cli.check(other and f"--runs trained different models or classes ({', '.join(other)} and {next(iter(found))}): "
                        f"give the runs of one experiment")
    what = f"{dit_name(first.dit) or 'DiT'}, {first.dit['in_channels']} input channels at {first.dit['input_size']} px"
    return first.dit, first.options["class_to_superclass"], {c.method: c.options for c in found.values()}, (
        what + ", as --runs trained it")


def parameter_markdown(args):
    """Table 2 as markdown: counts from peft.parameter_table; with --runs, images/s and the speed-up over full
    fine-tuning (the paper's training time, GPU days, is images seen / throughput)."""
    speeds = training_throughput(args.runs)
    config, parents, options, what = counted_model(args)
    header = "| Method | Total | Trainable | % | Delta (MiB) |" + (" Images/s | Speed-up |" if args.runs else "")
    lines = [f"{what}, {len(parents):,} classes in {max(parents) + 1} superclasses:\n", header,
             "|---|" + "---:|" * (header.count("|") - 2)]
    for method, total, trainable, percent, mib in parameter_table(config, parents, options):
        line = f"| {method} | {total:,} | {trainable:,} | {percent:.2f}% | {mib:,.1f} |"
        if args.runs:
            speed = speeds.get(method)
            line += f" {speed:,.1f} |" if speed else " – |"
            line += f" {speed / speeds['full']:.2f}× |" if speed and "full" in speeds else " – |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table or args.estimates:
        print(parameter_markdown(args) if args.table else estimates_markdown(args))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, {NUM_CLASSES} + {NUM_SUPERCLASSES} classes, "
          f"{name}, torch {torch.__version__}")
    context = multiprocessing.get_context("spawn")
    rows = {}
    for method in args.methods:
        queue = context.Queue()
        worker = context.Process(target=train_step_worker, args=(args, method, queue))
        worker.start()
        worker.join()  # its result is a small tuple: it fits the queue's pipe, so joining first cannot deadlock
        if worker.exitcode < 0:  # killed by a signal: it had no chance to say why
            raise SystemExit(f"the {method} benchmark was killed by signal {-worker.exitcode} (SIGKILL: most likely "
                             f"out of memory): try a smaller --batch-size or --model")
        if worker.exitcode != 0:
            raise SystemExit(f"the {method} benchmark failed (exit code {worker.exitcode}): its error is above")
        rows[method] = queue.get()
    full = rows.get("full", next(iter(rows.values()), None))
    if rows:
        mfu = device.type == "cuda"
        print("\n| method | images/s | vs full | peak memory (GiB) | vs full |" + (" MFU |" if mfu else "")
              + "\n|---|---:|---:|---:|---:|" + ("---:|" if mfu else ""))
    for method, (seconds, peak) in rows.items():
        line = (f"| {method} | {args.batch_size / seconds:.1f} | {full[0] / seconds:.2f}x | {peak:.2f} | "
                f"{peak / full[1]:.2f}x |")
        if device.type == "cuda":  # the FLOPs counted for this method's step (frozen weights: no weight gradients)
            work = counted_work(dit_config(args), method)
            flops = (work["forward"] + work["backward"]) * args.batch_size
            line += f" {100 * flops / seconds / (args.peak_tflops * 1e12):.1f}% |"
        print(line)
    if args.sample_steps:
        results = sampling_throughput(args, device)
        print(f"\nguided sampling ({args.sample_steps} DDPM steps, batch {args.batch_size}, scale 4.0):")
        print("| model | image-steps/s | vs base |\n|---|---:|---:|")
        for method, rate in results.items():
            print(f"| {method} | {rate:.1f} | {rate / results['base']:.2f}x |")
    if args.samplers:
        results = sampler_comparison(args, device)
        first = next(iter(results.values()))
        print(f"\nsamplers (FineDiffusion, guidance scale 4, batch {args.batch_size}, at their usual step counts):")
        print(f"| sampler | model calls | seconds | images/s | vs {next(iter(results))} |\n|---|---:|---:|---:|---:|")
        for name, (calls, seconds) in results.items():
            print(f"| {name} | {calls} | {seconds:.2f} | {args.batch_size / seconds:.2f} | {first[1] / seconds:.1f}x |")


if __name__ == "__main__":
    cli.run(main)
