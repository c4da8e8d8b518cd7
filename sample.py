"""
Images of a class from a trained model, with FineDiffusion's superclass guidance (Eq. 1):

    python sample.py --class 412                      # the newest checkpoint under results/
    python sample.py --list-classes monarch           # ids, names and superclasses of the classes that match
    python sample.py --class "Danaus plexippus" --n 16 --ckpt results/003-DiT-XL-2-finediffusion
    python sample.py --class all --n 6 --guidance fine none --with-data   # every class: data, fine, unguided
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --out samples/inat   # PNGs + .npz for evaluate.py

--ckpt takes our training checkpoints (a delta is combined with its base), a run folder or a run's name (its newest
checkpoint), official DiT-XL/2 files, and official FineDiffusion checkpoints (with --hierarchy, their class list).
Images go to the samples/ folder of the checkpoint's run unless --out says where; nothing is overwritten.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import cli
from checkpoint import SAMPLES_DIR, WEIGHTS_HELP, find_checkpoint, load_model, read_checkpoint, run_folder
from data import Hierarchy, load_dataset, save_grid, to_pixels
from diffusion import SAMPLER_STEPS, check_steps, default_guidance, sample
from model import load_vae

MAX_GRID_ROWS = 100  # --class all on iNat's 10,000 classes would be a picture no one can look at
BULK_COMPANIONS = (".npz",)  # a bulk run writes the folder of PNGs and, beside it, folder.npz


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--class", dest="cls", default=None,
                   help="class id or name (scientific or common); 'all': a grid with one row per class")
    p.add_argument("--ckpt", default=None, help="a checkpoint, run folder or run name (none: the newest in results/)")
    p.add_argument("--list-classes", nargs="?", const="", default=None, metavar="TEXT",
                   help="print the classes (id, name, superclass) whose names contain TEXT, and stop")
    p.add_argument("--base", default=None, help="base checkpoint of a delta (default: the path it recorded)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help=WEIGHTS_HELP)
    p.add_argument("--vae", default=None, help="SD VAE (default: the one the model was trained with)")
    p.add_argument("--hierarchy", default=None, help="class list (JSON) for official FineDiffusion checkpoints")
    p.add_argument("--n", type=cli.number(int, 1, 256), default=8,
                   help="images of --class (per class with --class all)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="the noise")
    p.add_argument("--cfg-scale", type=cli.number(float), default=4.0, help="guidance scale w of Eq. 1 (1: none)")
    p.add_argument("--guidance", nargs="+", default=["default"], choices=["default", "fine", "cfg", "none"],
                   help="fine: superclass guidance (Eq. 1); cfg: the null label; default: the model's own (fine for a "
                        "tiered label table, else cfg); several: side by side, from the same noise")
    p.add_argument("--with-data", action="store_true",
                   help="grids start with training images of each class (from the data the checkpoint names)")
    p.add_argument("--official-three-channels", action="store_true", help="guide eps channels 0..2 only, as DiT")
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLER_STEPS),
                   help="ddpm: the paper's; ddim: deterministic; dpm++: DPM-Solver++(2M), as diffusers' DiTPipeline")
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="model calls (default: " + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")")
    p.add_argument("--num-samples", type=cli.number(int, 0, 1_000_000), default=0,
                   help="bulk: this many images over all classes (the papers' FID: 50,000)")
    p.add_argument("--batch-size", type=cli.number(int, 1, 4096), default=32, help="images sampled at once, per "
                                                                                   "process")
    p.add_argument("--out", default=None, help="the grid PNG, or a bulk run's folder (none: the run's samples/)")
    args = p.parse_args(argv)
    if args.num_sampling_steps is None:
        args.num_sampling_steps = SAMPLER_STEPS[args.sampler]
    try:
        check_steps(args.sampler, args.num_sampling_steps)
    except ValueError as e:
        p.error(f"argument --num-sampling-steps: {e}")
    return args


def young_ema(checkpoint, args):
    """A warning, where the EMA sampled (constant decay d, no warm-up) has seen fewer than the ~1/(1-d) steps it
    averages over: it is then still mostly the base model."""
    settings = checkpoint.settings or {}
    decay = settings.get("ema_decay")
    if args.weights != "ema" or decay is None or settings.get("ema_warmup") or checkpoint.step * (1 - decay) >= 1:
        return ""
    return (f". Its EMA (decay {decay}, no warm-up) has seen {checkpoint.step} of the ~{1 / (1 - decay):,.0f} steps it "
            f"averages, so it is still mostly the base: --weights raw samples what was trained")


def output_path(args, name, companions=()):
    """--out, or `name` in the samples/ folder of the checkpoint's run (or of '.'); never a path that is taken."""
    if args.out:
        return cli.new_file(args.out.rstrip("/"), "--out", companions)
    return cli.new_file(os.path.join(run_folder(args.ckpt) or ".", SAMPLES_DIR, name), companions=companions)


@torch.no_grad()
def generate(model, vae, labels, args, guidance, progress=True):
    """(N,) fine labels -> (N, H, W, 3) uint8 images; the noise is drawn for all N at once, the sampler runs on
    --batch-size of them at a time."""
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, device=labels.device)
    return np.concatenate([to_pixels(sample(model, batch_z, batch_labels, guidance, args.cfg_scale, args.sampler,
                                            args.num_sampling_steps, 3 if args.official_three_channels else None,
                                            progress), vae)
                           for batch_labels, batch_z in zip(labels.split(args.batch_size), z.split(args.batch_size))])


def sample_grid(model, vae, hierarchy, checkpoint, args, device):
    """--class (an id, a name or 'all'): a row of --n images per class, a block per guidance (same noise in each),
    led by training images with --with-data."""
    num_classes = model.y_embedder.num_classes
    if args.cls == "all":  # one row per class
        cli.check(num_classes > MAX_GRID_ROWS and f"--class all: a grid has a row per class, and this model has "
                  f"{num_classes:,} classes (a grid takes at most {MAX_GRID_ROWS}): give one class, or --num-samples "
                  f"N for a bulk run over all of them")
        classes = list(range(num_classes))
    elif hierarchy is not None:
        classes = [hierarchy.lookup(args.cls)]
    else:
        cli.check((not args.cls.isdigit() or int(args.cls) >= num_classes) and f"--class {args.cls}: this model has "
                  f"no class names; give an id in 0..{num_classes - 1}")
        classes = [int(args.cls)]
    stem = "all" if args.cls == "all" else f"{classes[0]:05d}"
    out = output_path(args, "-".join([stem] + (["data"] if args.with_data else []) + args.guidance) + ".png")
    names = [hierarchy.class_names[c] if hierarchy is not None else f"class {c}" for c in classes]
    labels = torch.tensor(classes).repeat_interleave(args.n).to(device)
    blocks, titles = [], []
    if args.with_data:  # the first n training images of each class, as train.py read them (unmirrored)
        settings = checkpoint.data
        dataset, _ = load_dataset(settings["kind"], settings["path"], settings["image_size"], settings["split"])
        blank = np.full((settings["image_size"], settings["image_size"], 3), 255, dtype=np.uint8)  # too few: white
        first = [list(np.flatnonzero(dataset.labels == c)[:args.n]) for c in classes]
        blocks.append(np.stack([dataset.read(j) if j is not None else blank for js in first
                                for j in (js + [None] * args.n)[:args.n]]))
        titles.append("training images")
    for guidance in args.guidance:
        torch.manual_seed(args.seed)
        blocks.append(generate(model, vae, labels, args, guidance))
        titles.append("no guidance" if guidance == "none" else f"{guidance} guidance, w={args.cfg_scale:g}")
    rows = np.concatenate([b.reshape(len(classes), args.n, *b.shape[1:]) for b in blocks], axis=1)  # (C, B*n, ...)
    labelled = len(blocks) > 1 or len(classes) > 1
    save_grid(rows.reshape(-1, *rows.shape[2:]), out, cols=args.n * len(blocks) if labelled else None,
              row_names=names if labelled else None, titles=titles if len(blocks) > 1 else None)
    print(f"{args.n} images of {names[0] if len(classes) == 1 else 'every class'} ({', '.join(titles)}; "
          f"{args.sampler} {args.num_sampling_steps} steps; {args.weights} weights) -> {out}")
    return out


def sample_bulk(model, vae, hierarchy, args, device, rank, world_size):
    """Classes evenly over --num-samples; batch b is seeded by b, so the images do not depend on the world size."""
    out = output_path(args, "bulk", BULK_COMPANIONS)
    if world_size > 1:  # every rank chose the same free path before any rank takes it
        dist.barrier()
    os.makedirs(out, exist_ok=True)
    num_classes = model.y_embedder.num_classes
    num_batches = math.ceil(args.num_samples / args.batch_size)
    for b in tqdm(range(rank, num_batches, world_size), disable=rank != 0, desc="batches"):
        indices = torch.arange(b * args.batch_size, min((b + 1) * args.batch_size, args.num_samples))
        torch.manual_seed(args.seed * num_batches + b)
        images = generate(model, vae, (indices % num_classes).to(device), args, args.guidance[0], progress=False)
        for i, image in zip(indices.tolist(), images):
            Image.fromarray(image).save(os.path.join(out, f"{i:06d}.png"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:  # the layout of ADM's evaluation suite and DiT's sample_ddp.py, plus our labels
        labels = np.arange(args.num_samples) % num_classes
        images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png")))
                           for i in tqdm(range(args.num_samples), desc="npz")])
        extra = {} if hierarchy is None else dict(
            superclass_labels=np.asarray(hierarchy.class_to_superclass)[labels],
            class_names=np.asarray(hierarchy.class_names), superclass_names=np.asarray(hierarchy.superclass_names))
        with open(out + ".npz.tmp", "wb") as f:  # renamed when complete: a kill leaves no torn .npz
            np.savez(f, arr_0=images, labels=labels, **extra)
        os.replace(out + ".npz.tmp", out + ".npz")
        print(f"wrote {args.num_samples} samples ({args.weights} weights) to {out}/ and {out}.npz ({images.shape})")
    return out


def main(args):
    """-> the grid, or the folder of a bulk run, it wrote."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun: bulk runs share their batches out
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    args.ckpt = find_checkpoint(args.ckpt)
    hierarchy = Hierarchy.from_json(args.hierarchy) if args.hierarchy else None
    if args.list_classes is not None:  # the classes of --ckpt, or of --hierarchy
        source = args.hierarchy or args.ckpt
        lines = (hierarchy or Hierarchy.from_dict(read_checkpoint(args.ckpt).hierarchy)).listing(args.list_classes)
        cli.check(not lines and f"no class of {source} has {args.list_classes!r} in its name or superclass: try a "
                                f"part of it, or --list-classes alone for every class")
        print(f"classes of {source}" + (f" matching {args.list_classes!r}" if args.list_classes else "") + ":")
        print("\n".join(lines))
        return None
    cli.check(
        args.num_samples and len(args.guidance) > 1 and "--guidance: a bulk run (--num-samples) samples with one "
                                                        "guidance",
        args.num_samples and (args.cls is not None or args.with_data) and "--num-samples is a bulk run over every "
        "class; --class and --with-data make a grid: give one or the other",
        not args.num_samples and args.cls is None and "give --class (an id, a name or 'all'), or --num-samples for a "
                                                      "bulk run",
        not args.num_samples and world_size > 1 and "a grid (--class) is one process's work: run it with python, not "
                                                    "torchrun (torchrun is for bulk runs, --num-samples)")
    if args.out:  # a taken --out is refused now, before the model loads
        output_path(args, None, BULK_COMPANIONS if args.num_samples else ())
    model, checkpoint = load_model(args.ckpt, args.base, hierarchy and hierarchy.class_to_superclass,
                                   weights=args.weights)
    cli.check(args.with_data and checkpoint is None and "--with-data: an official checkpoint does not say what it "
                                                        "was trained on")
    if checkpoint is not None:  # ours: the class names and the VAE it was trained with
        hierarchy, args.vae = Hierarchy.from_dict(checkpoint.hierarchy), args.vae or checkpoint.vae
    if rank == 0:
        print(f"sampling {args.ckpt}: " + (f"step {checkpoint.step}, {args.weights} weights"
                                           f"{young_ema(checkpoint, args)}" if checkpoint else
                                           f"an official checkpoint, {args.weights} weights"))
    model.to(device).eval()
    args.guidance = [default_guidance(model) if g == "default" else g for g in args.guidance]
    vae = load_vae(args.vae, device) if args.vae not in (None, "none") else None
    cli.check(vae is None and model.in_channels != 3 and "this model works in the SD VAE's latent space: give --vae "
                                                         "(sd-vae-ft-ema)",
              vae is not None and vae.latent_channels != model.in_channels and f"--vae {args.vae} has "
              f"{vae.latent_channels} latent channels, the model takes {model.in_channels}: give the VAE it was "
              f"trained with")
    out = (sample_bulk(model, vae, hierarchy, args, device, rank, world_size) if args.num_samples
           else sample_grid(model, vae, hierarchy, checkpoint, args, device))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
