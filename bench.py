"""Speed and memory of every fine-tuning method, measured in one run so the ratios are fair:

    python bench.py --model DiT-XL/2 --image-size 256 --batch-size 32         # on a GPU
    python bench.py --model DiT-S/4 --image-size 64 --batch-size 8 --steps 5  # on a CPU

Training steps (images/s, peak memory, MFU on CUDA) and guided sampling; `--table`: the paper's
Table 2; `--estimates`: the counted FLOPs and bytes of a step, and GPU estimates from them.
"""
import cli  # first: a quiet Ctrl-C while torch loads

import multiprocessing
import os
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from checkpoint import dit_name, find_checkpoint, read_checkpoint, read_metrics, saved_checkpoints
from diffusion import SAMPLER_STEPS, create_diffusion, sample
from model import DIT_CONFIGS, AutoencoderKL, DiT, superclass_count
from peft import METHODS, count_parameters, merge, parameter_table, prepare
from train import precision_for, train_step

NUM_CLASSES, NUM_SUPERCLASSES = 10000, 11  # iNat 2021's label table
PARENTS = [c % NUM_SUPERCLASSES for c in range(NUM_CLASSES)]  # the split changes no count or speed
with torch.device("meta"):
    SD_VAE = AutoencoderKL()  # only its geometry: 4 latent channels, 1/8 of the image size
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default="DiT-XL/2", choices=list(DIT_CONFIGS), help="the DiT to time")
    p.add_argument("--image-size", type=cli.POSITIVE, default=256, help="pixels (the DiT: latents)")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=32, help="images per step")
    p.add_argument("--steps", type=cli.POSITIVE, default=20, help="timed steps (+3 warm-up)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to time ('': none)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="none: bf16 on CUDA")
    p.add_argument("--sample-steps", type=cli.NON_NEGATIVE, default=10, help="DDPM steps (0: none)")
    p.add_argument("--samplers", default=",".join(SAMPLER_STEPS), help="to time ('': none)")
    p.add_argument("--peak-tflops", type=cli.number(float, 0.0, low_open=True), default=989.0,
                   help="the GPU's dense bf16 peak, for the MFU (H100 SXM: 989)")
    p.add_argument("--estimates", action="store_true", help="print counted work and GPU estimates")
    p.add_argument("--mfu", type=cli.number(float, 0.0, 1.0, low_open=True), default=0.4,
                   help="the model FLOPs utilisation --estimates assumes")
    p.add_argument("--table", action="store_true", help="print Table 2 (and the --runs' speed)")
    p.add_argument("--runs", nargs="*", default=[], help="train.py run folders for --table")
    args = p.parse_args(argv)
    for flag, known in (("methods", METHODS), ("samplers", SAMPLER_STEPS)):
        setattr(args, flag, [name for name in getattr(args, flag).split(",") if name])
        if unknown := sorted(set(getattr(args, flag)) - set(known)):
            p.error(f"argument --{flag}: unknown {unknown}")
    if args.sample_steps == 1:
        p.error("argument --sample-steps: DDPM takes at least 2 steps")
    multiple = SD_VAE.downsample_factor * DIT_CONFIGS[args.model]["patch_size"]  # whole patches
    if args.image_size % multiple:
        p.error(f"argument --image-size: {args.model} needs a multiple of {multiple}")
    args.config = dict(DIT_CONFIGS[args.model], in_channels=SD_VAE.latent_channels,
                       input_size=args.image_size // SD_VAE.downsample_factor)
    return args


def build(args, method, merged=False):
    """A random DiT for `method` ("base": none; merged: to sample) and inputs (N, C, H, W), (N,)."""
    torch.manual_seed(0)
    model = DiT(**args.config).to(DEVICE)
    model = model if method == "base" else prepare(model, method, PARENTS)
    model = merge(model).eval() if merged else model
    z = torch.randn(args.batch_size, model.in_channels, *[model.input_size] * 2, device=DEVICE)
    return model, z, torch.randint(0, model.y_embedder.num_classes, z.shape[:1], device=DEVICE)


def markdown(header, rows):
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [header] + rows]
    return "\n".join(lines[:1] + ["|---|" + "---:|" * (len(header) - 1)] + lines[1:])


def timed(fn, steps, warmup=3, desc=None):
    """Seconds per call of fn after `warmup` calls; desc: a progress bar (a CPU takes minutes)."""
    sync = torch.cuda.synchronize if CUDA else lambda: None
    for i in tqdm(range(warmup + steps), desc=desc, disable=desc is None, leave=False):
        if i == warmup:
            sync()
            start = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def peak_memory(device):
    """Peak bytes: CUDA's allocator's, else the process's; NaN without `resource` (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    return cli.max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# --------------------------------------------------------------------------------------------------
# Measured: training steps (a fresh process per method), sampling

def train_step_worker(args, method, queue):
    """One method in a fresh process (so that peaks do not mix): seconds per step, peak GiB."""
    precision = precision_for(DEVICE, args.precision)
    model, x, y = build(args, method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4,
                            weight_decay=0)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")
    diffusion = create_diffusion("")
    step = lambda: train_step(model, diffusion, opt, scaler, x, y, precision)  # train.py's own
    if CUDA:  # the steps' peak, not the building's
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, args.steps, desc=f"{method}: training steps")
    queue.put((seconds, peak_memory(DEVICE) / 2**30))


def training_table(args):
    """Each method's training step against full fine-tuning's (or the first method's)."""
    context, measured = multiprocessing.get_context("spawn"), {}
    for method in args.methods:
        queue = context.Queue()
        worker = context.Process(target=train_step_worker, args=(args, method, queue))
        worker.start()
        worker.join()  # its result is a small tuple: it fits the queue's pipe, so no deadlock
        if worker.exitcode:  # -N: killed by signal N, with no chance to say why (9: out of memory?)
            raise SystemExit(f"the {method} benchmark failed (exit code {worker.exitcode}; -9: out "
                             f"of memory?): its error is above, or try a smaller --batch-size")
        measured[method] = queue.get()
    full_seconds, full_peak = measured.get("full", next(iter(measured.values())))
    rows = []
    for method, (seconds, peak) in measured.items():
        rows.append([method, f"{args.batch_size / seconds:.1f}", f"{full_seconds / seconds:.2f}x",
                     f"{peak:.2f}", f"{peak / full_peak:.2f}x"])
        if CUDA:  # the MFU, from the counted FLOPs of this method's step
            work = counted_work(args.config, method)
            flops = (work["forward"] + work["backward"]) * args.batch_size
            rows[-1].append(f"{100 * flops / seconds / (args.peak_tflops * 1e12):.1f}%")
    header = ["method", "images/s", "vs full", "peak memory (GiB)", "vs full"] + ["MFU"] * CUDA
    return markdown(header, rows)


def sampling_tables(args):
    """Guided DDPM steps of the base DiT and each merged method; each sampler on FineDiffusion."""
    if args.sample_steps:
        rates, methods = {}, ["base"] + [m for m in args.methods if m != "full"]
        for method in tqdm(methods, desc="guided sampling", leave=False):
            model, z, labels = build(args, method, merged=True)
            with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=CUDA):
                run = lambda: sample(model, z, labels, steps=args.sample_steps, progress=False)
                rates[method] = args.batch_size * args.sample_steps / timed(run, 1)
        rows = [[m, f"{rate:.1f}", f"{rate / rates['base']:.2f}x"] for m, rate in rates.items()]
        yield (f"guided sampling ({args.sample_steps} DDPM steps, batch {args.batch_size}, "
               f"scale 4.0):\n" + markdown(["model", "image-steps/s", "vs base"], rows))
    if args.samplers:
        model, z, labels = build(args, "finediffusion", merged=True)
        calls, measured = [], {}
        model.register_forward_pre_hook(lambda module, x: calls.append(1))
        with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=CUDA):
            sample(model, z, labels, steps=4, progress=False)  # warm-up
            for name in tqdm(args.samplers, desc="samplers", leave=False):
                calls.clear()
                run = lambda: sample(model, z, labels, sampler=name, progress=False)
                measured[name] = (timed(run, 1, warmup=0), len(calls))
        first, (first_seconds, _) = next(iter(measured.items()))
        rows = [[name, calls, f"{seconds:.2f}", f"{args.batch_size / seconds:.2f}",
                 f"{first_seconds / seconds:.1f}x"] for name, (seconds, calls) in measured.items()]
        header = ["sampler", "model calls", "seconds", "images/s", f"vs {first}"]
        yield (f"samplers (FineDiffusion, guidance scale 4, batch {args.batch_size}, at "
               f"their usual step counts):\n" + markdown(header, rows))


# --------------------------------------------------------------------------------------------------
# Counted, not run: FLOPs by torch's counter and saved bytes by hooks, on the meta device

GPUS = {"A100 80GB": (312e12, 80e9), "H100 SXM": (989e12, 80e9), "H200": (989e12, 141e9)}
STATE = ("weights", "gradients", "adamw", "ema", "copies")  # what a step holds whatever its batch


def counted_work(config, method):
    """Per image (2 images less 1, under bf16 autocast): FLOPs and bytes saved for the backward;
    per step: fp32 weights, gradients, AdamW moments and EMA, and autocast's bf16 weight copies."""
    counts = []
    for batch in (1, 2):
        with torch.device("meta"):
            model = prepare(DiT(**config).to("meta"), method, PARENTS)  # (pos_embed: on the CPU)
            x = torch.zeros(batch, config["in_channels"], *[config["input_size"]] * 2)
            t = y = torch.zeros(batch, dtype=torch.long)
        saved = []

        def keep(tensor):  # what autograd saves for the backward, but the weights
            if not isinstance(tensor, torch.nn.Parameter):
                saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with (FlopCounterMode(display=False) as forward, torch.autocast("cpu", torch.bfloat16),
              torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)):
            out = model(x, t, y)
        with FlopCounterMode(display=False) as backward:
            out.float().mean().backward()
        counts.append((forward.get_total_flops(), backward.get_total_flops(), sum(saved)))
    (f1, b1, a1), (f2, b2, a2), (total, trainable) = *counts, count_parameters(model)
    return dict(forward=f2 - f1, backward=b2 - b1, activations=a2 - a1, weights=4 * total,
                gradients=4 * trainable, adamw=8 * trainable, ema=4 * trainable,
                copies=2 * a1 - a2, trainable=trainable / total)


def estimates_markdown(args):
    """--estimates: counted work per method, then each GPU's batch in 90% of memory and images/s."""
    work = {m: counted_work(args.config, m) for m in tqdm(args.methods, "counting", leave=False)}
    counted = [[method, f"{100 * w['trainable']:.2f}%", f"{w['forward'] / 1e9:,.1f}",
                f"{w['backward'] / 1e9:,.1f}", *(f"{w[k] / 2**30:.2f} GiB" for k in STATE),
                f"{w['activations'] / 2**20:,.0f} MiB"] for method, w in work.items()]
    estimated = []
    for method, w in work.items():
        estimated.append([method])
        for peak, memory in GPUS.values():
            batch = int((0.9 * memory - sum(w[k] for k in STATE)) // w["activations"])
            speed = args.mfu * peak / (w["forward"] + w["backward"])
            estimated[-1].append(f"{batch}, {speed:,.0f}" if batch > 0 else "does not fit")
    header = ["method", "trains", "GFLOPs/image forward", "backward", "weights", "gradients",
              "AdamW", "EMA", "bf16 copies", "activations/image"]
    return (f"{args.model} at {args.image_size} px, bf16 autocast, counted per training step "
            f"(frozen weights need no weight gradients):\n\n{markdown(header, counted)}\n\n"
            f"ESTIMATES, not measurements: images/s at {args.mfu:.0%} MFU of each GPU's "
            f"published dense bf16 peak, and the batch that fits 90% of its memory:\n\n"
            + markdown(["method"] + [f"{gpu}: batch, images/s" for gpu in GPUS], estimated))


# --------------------------------------------------------------------------------------------------
# Table 2: parameters per method, and what finished runs measured

def training_throughput(runs):
    """{method: median images/s} of train.py runs' logged steps (the median: start-up aside)."""
    speeds = {}
    for run in runs:
        for record in read_metrics(run):
            speeds.setdefault(record["method"], []).append(record["images_per_s"])
    return {method: float(np.median(values)) for method, values in speeds.items()}


def parameter_markdown(args):
    """Table 2: parameters of the model the --runs trained (else --model), and the runs' speed."""
    speeds = training_throughput(args.runs)
    found = {run: read_checkpoint(find_checkpoint(run)) for run in args.runs
             if os.path.isfile(run) or saved_checkpoints(run)}  # (without: metrics only)
    config, parents, options = args.config, PARENTS, {}
    what = f"{args.model}, {args.image_size} px in the SD VAE's latent space"
    if found:
        config, parents = next((c.dit, c.options["class_to_superclass"]) for c in found.values())
        if other := [run for run, c in found.items()
                     if (c.dit, c.options["class_to_superclass"]) != (config, parents)]:
            raise ValueError(f"--runs trained different models or classes ({', '.join(other)} "
                             f"and {next(iter(found))}): give the runs of one experiment")
        options = {c.method: c.options for c in found.values()}
        what = (f"{dit_name(config) or 'DiT'}, {config['in_channels']} input channels at "
                f"{config['input_size']} px, as --runs trained it")
    rows = []
    for method, total, trainable, percent, mib in parameter_table(config, parents, options):
        rows.append([method, f"{total:,}", f"{trainable:,}", f"{percent:.2f}%", f"{mib:,.1f}"])
        if args.runs:
            speed, full = speeds.get(method), speeds.get("full")
            rows[-1] += [f"{speed:,.1f}" if speed else "–",
                         f"{speed / full:.2f}×" if speed and full else "–"]
    header = ["Method", "Total", "Trainable", "%", "Delta (MiB)", "Images/s", "Speed-up"]
    return (f"{what}, {len(parents):,} classes in {superclass_count(parents)} superclasses:\n\n"
            + markdown(header[:len(rows[0])], rows))  # the speeds: with --runs


def main(argv=None):
    args = parse_args(argv)
    if args.table or args.estimates:
        print(parameter_markdown(args) if args.table else estimates_markdown(args))
        return
    name = torch.cuda.get_device_name() if CUDA else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, {NUM_CLASSES} + "
          f"{NUM_SUPERCLASSES} classes, {name}, torch {torch.__version__}")
    if args.methods:
        print("\n" + training_table(args))
    for table in sampling_tables(args):
        print("\n" + table)


if __name__ == "__main__":
    cli.run(main)
