"""Images of a class from a trained model, with FineDiffusion's superclass guidance (Eq. 1):

    python sample.py --class 412                      # the newest checkpoint under results/
    python sample.py --list-classes monarch           # ids, names and superclasses that match
    python sample.py --class "Danaus plexippus" --n 16 --ckpt results/003-DiT-XL-2-finediffusion
    python sample.py --class all --n 6 --guidance fine none --with-data   # data, fine, unguided
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --out samples/inat   # PNGs + .npz

--ckpt: our checkpoints, a run folder or name, official DiT-XL/2 files or FineDiffusion ones (with
--hierarchy). Output: the run's samples/ or --out, never over a file; evaluate.py reads the .npz.
"""
import cli  # first: a quiet Ctrl-C while torch loads

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoint import (SAMPLES_DIR, WEIGHTS_HELP, find_checkpoint, load_model, load_vae,
                        read_checkpoint, run_folder, sample_classes, write_atomically)
from data import Hierarchy, load_dataset, save_grid, to_pixels
from diffusion import SAMPLER_STEPS, check_steps, default_guidance, sample

MAX_GRID_ROWS = 100  # --class all on iNat's 10,000 classes would be a picture no one can look at
BULK_COMPANIONS = (".npz",)  # a bulk run writes the folder of PNGs and, beside it, folder.npz
GUIDANCES = ["default", "fine", "cfg", "none"]


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--class", dest="cls", help="an id, a name (scientific or common) or all")
    p.add_argument("--ckpt", help="a checkpoint, run folder or run name (none: the newest)")
    p.add_argument("--list-classes", nargs="?", const="", metavar="TEXT",
                   help="print the classes (id, name, superclass) whose names have TEXT, and stop")
    p.add_argument("--base", help="a delta's base (default: the path it recorded)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help=WEIGHTS_HELP)
    p.add_argument("--vae", help="SD VAE (default: the one the model trained with)")
    p.add_argument("--hierarchy", help="class list (JSON) of an official FineDiffusion checkpoint")
    p.add_argument("--n", type=cli.number(int, 1, 256), default=8, help="images per class")
    p.add_argument("--seed", type=cli.SEED, default=0, help="the noise")
    p.add_argument("--cfg-scale", type=cli.number(float), default=4.0, help="w of Eq. 1 (1: none)")
    p.add_argument("--guidance", nargs="+", default=["default"], choices=GUIDANCES,
                   help="fine: Eq. 1; cfg: null row; default: the model's; several: side by side")
    p.add_argument("--with-data", action="store_true", help="grids start with training images")
    p.add_argument("--official-three-channels", action="store_true", help="as DiT: guide eps 0..2")
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLER_STEPS),
                   help="ddpm: the paper's; ddim; dpm++: DPM-Solver++(2M), as diffusers' DiT")
    p.add_argument("--num-sampling-steps", type=int, help="model calls (default: "
                   + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")")
    p.add_argument("--num-samples", type=cli.number(int, 0, 1_000_000), default=0,
                   help="bulk: this many images over all classes (the papers' FID: 50,000)")
    p.add_argument("--batch-size", type=cli.number(int, 1, 4096), default=32, help="per process")
    p.add_argument("--out", help="the grid PNG or a bulk run's folder (none: the run's samples/)")
    args = p.parse_args(argv)
    if args.num_sampling_steps is None:
        args.num_sampling_steps = SAMPLER_STEPS[args.sampler]
    try:
        check_steps(args.sampler, args.num_sampling_steps)
    except ValueError as e:
        p.error(f"argument --num-sampling-steps: {e}")
    return args


def young_ema(checkpoint, args):
    """A warning where the EMA (decay d, no warm-up) saw under the ~1/(1-d) steps it averages."""
    settings = checkpoint.settings or {}
    decay = settings.get("ema_decay")
    if (args.weights != "ema" or decay is None or settings.get("ema_warmup")
            or checkpoint.step * (1 - decay) >= 1):
        return ""
    return (f". Its EMA (decay {decay}) saw {checkpoint.step} of the ~{1 / (1 - decay):,.0f} steps "
            f"it averages (no warm-up): mostly the base; --weights raw samples what was trained")


def output_path(args, name, companions=()):
    """--out, or `name` in the samples/ folder of the checkpoint's run; never a taken path."""
    if args.out:
        return cli.new_file(args.out.rstrip("/"), "--out", companions)
    folder = os.path.join(run_folder(args.ckpt) or ".", SAMPLES_DIR)
    return cli.new_file(os.path.join(folder, name), companions=companions)


@torch.no_grad()
def generate(model, vae, labels, args, guidance, progress=True):
    """(N,) labels -> (N, H, W, 3) uint8 images: noise for all N, sampled --batch-size at once."""
    z = torch.randn(len(labels), model.in_channels, *[model.input_size] * 2, device=labels.device)
    channels = 3 if args.official_three_channels else None
    return np.concatenate([
        to_pixels(sample(model, z_part, y, guidance, args.cfg_scale, args.sampler,
                         args.num_sampling_steps, channels, progress), vae)
        for y, z_part in zip(labels.split(args.batch_size), z.split(args.batch_size))])


def sample_grid(model, vae, hierarchy, checkpoint, args, device):
    """--class: a row of --n images per class, a block per guidance (same noise), data first."""
    num_classes = model.y_embedder.num_classes
    if args.cls == "all" and num_classes > MAX_GRID_ROWS:
        raise ValueError(f"--class all: this model has {num_classes:,} classes (a grid takes at "
                         f"most {MAX_GRID_ROWS}): give one, or --num-samples for a bulk run")
    if args.cls == "all":
        classes = list(range(num_classes))
    elif hierarchy is not None:
        classes = [hierarchy.lookup(args.cls)]
    elif args.cls.isdigit() and int(args.cls) < num_classes:
        classes = [int(args.cls)]
    else:
        raise ValueError(f"--class {args.cls}: no class names; give an id in 0..{num_classes - 1}")
    stem = "all" if args.cls == "all" else f"{classes[0]:05d}"
    out = output_path(args, "-".join([stem] + ["data"] * args.with_data + args.guidance) + ".png")
    names = [hierarchy.class_names[c] if hierarchy is not None else f"class {c}" for c in classes]
    labels = torch.tensor(classes).repeat_interleave(args.n).to(device)
    blocks, titles = [], []
    if args.with_data:  # the first n training images of each class (white where there are fewer)
        data, images = checkpoint.data, []
        dataset, _ = load_dataset(data["kind"], data["path"], data["image_size"], data["split"])
        blank = np.full((data["image_size"], data["image_size"], 3), 255, dtype=np.uint8)
        for c in classes:
            found = [dataset.read(j) for j in np.flatnonzero(dataset.labels == c)[:args.n]]
            images += found + [blank] * (args.n - len(found))
        blocks.append(np.stack(images))
        titles.append("training images")
    for guidance in args.guidance:
        torch.manual_seed(args.seed)
        blocks.append(generate(model, vae, labels, args, guidance))
        titles.append(f"{guidance} guidance, w={args.cfg_scale:g}" if guidance != "none"
                      else "no guidance")
    rows = np.concatenate([b.reshape(len(classes), args.n, *b.shape[1:]) for b in blocks], axis=1)
    labelled = len(blocks) > 1 or len(classes) > 1  # rows: class by class
    save_grid(rows.reshape(-1, *rows.shape[2:]), out, args.n * len(blocks) if labelled else None,
              names if labelled else None, titles if len(blocks) > 1 else None)
    what = names[0] if len(classes) == 1 else "every class"
    print(f"{args.n} images of {what} ({', '.join(titles)}; {args.sampler} "
          f"{args.num_sampling_steps} steps; {args.weights} weights) -> {out}")
    return out


def sample_bulk(model, vae, hierarchy, args, device, rank, world_size):
    """--num-samples over all classes; batch b seeded by b, whatever the world size."""
    out = output_path(args, "bulk", BULK_COMPANIONS)
    if world_size > 1:  # every rank chose the same free path before any rank takes it
        dist.barrier()
    os.makedirs(out, exist_ok=True)
    labels = sample_classes(args.num_samples, model.y_embedder.num_classes)
    num_batches = math.ceil(args.num_samples / args.batch_size)
    for b in tqdm(range(rank, num_batches, world_size), disable=rank != 0, desc="batches"):
        first = b * args.batch_size
        batch = torch.from_numpy(labels[first:first + args.batch_size]).to(device)
        torch.manual_seed(args.seed * num_batches + b)
        images = generate(model, vae, batch, args, args.guidance[0], progress=False)
        for i, image in enumerate(images, first):
            Image.fromarray(image).save(os.path.join(out, f"{i:06d}.png"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:  # the layout of ADM's evaluation suite and DiT's sample_ddp.py, plus our labels
        images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png")))
                           for i in tqdm(range(args.num_samples), desc="npz")])
        extra = {} if hierarchy is None else dict(
            superclass_labels=np.asarray(hierarchy.class_to_superclass)[labels],
            class_names=np.asarray(hierarchy.class_names),
            superclass_names=np.asarray(hierarchy.superclass_names))
        write_atomically(out + ".npz", lambda f: np.savez(f, arr_0=images, labels=labels, **extra))
        print(f"wrote {images.shape} samples ({args.weights} weights) to {out}/ and {out}.npz")
    return out


def main(args):
    """-> the grid, or the folder of a bulk run, it wrote."""
    rank, world_size, device = cli.init_distributed()  # torchrun: bulk runs share their batches out
    args.ckpt = find_checkpoint(args.ckpt)
    hierarchy = Hierarchy.from_json(args.hierarchy) if args.hierarchy else None
    if args.list_classes is not None:  # the classes of --hierarchy, or of --ckpt
        source, text = args.hierarchy or args.ckpt, args.list_classes
        hierarchy = hierarchy or Hierarchy.from_dict(read_checkpoint(args.ckpt).hierarchy)
        if not (lines := hierarchy.listing(text)):
            raise ValueError(f"no class of {source} has {text!r} in its name or superclass: try a "
                             f"part of it, or --list-classes alone for every class")
        print(f"classes of {source}{f' matching {text!r}' if text else ''}:", *lines, sep="\n")
        return None
    if args.num_samples and (args.cls is not None or args.with_data or len(args.guidance) > 1):
        raise ValueError("--num-samples is a bulk run over every class with one --guidance; "
                         "--class and --with-data make a grid: give one or the other")
    if not args.num_samples and args.cls is None:
        raise ValueError("give --class (an id, a name or 'all'), or --num-samples for a bulk run")
    if not args.num_samples and world_size > 1:
        raise ValueError("a grid (--class) is one process's work: run it with python, not torchrun")
    if args.out:  # a taken --out is refused now, before the model loads
        output_path(args, None, BULK_COMPANIONS if args.num_samples else ())
    parents = hierarchy and hierarchy.class_to_superclass
    model, checkpoint = load_model(args.ckpt, args.base, parents, weights=args.weights)
    if args.with_data and checkpoint is None:
        raise ValueError("--with-data: an official checkpoint does not say what it was trained on")
    if checkpoint is not None:  # ours: the class names and the VAE it was trained with
        hierarchy, args.vae = Hierarchy.from_dict(checkpoint.hierarchy), args.vae or checkpoint.vae
    if rank == 0:
        print(f"sampling {args.ckpt}: " + (
            f"step {checkpoint.step}, {args.weights} weights{young_ema(checkpoint, args)}"
            if checkpoint else f"an official checkpoint, {args.weights} weights"))
    model.to(device).eval()
    args.guidance = [default_guidance(model) if g == "default" else g for g in args.guidance]
    vae = load_vae(args.vae, device) if args.vae not in (None, "none") else None
    if vae is None and model.in_channels != 3:
        raise ValueError("this model works in the SD VAE's latents: give --vae (sd-vae-ft-ema)")
    if vae is not None and vae.latent_channels != model.in_channels:
        raise ValueError(f"--vae {args.vae} has {vae.latent_channels} latent channels, the model "
                         f"takes {model.in_channels}: give the VAE it was trained with")
    out = (sample_bulk(model, vae, hierarchy, args, device, rank, world_size) if args.num_samples
           else sample_grid(model, vae, hierarchy, checkpoint, args, device))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
