"""
Images of a class from a trained model, with FineDiffusion's superclass guidance (Eq. 1):

    python sample.py --class 412                      # the newest checkpoint under results/
    python sample.py --list-classes monarch           # ids, names and superclasses of the classes that match
    python sample.py --class "Danaus plexippus" --n 16 --ckpt results/003-DiT-XL-2-finediffusion
    python sample.py --class all --n 6 --guidance fine none --with-data   # every class: data, fine, unguided
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --out samples/inat   # PNGs + .npz for evaluate.py

--ckpt takes our training checkpoints (a delta is combined with its base) or a run folder (its newest
checkpoint), official DiT-XL/2 files, and official FineDiffusion checkpoints (with --hierarchy, their class list).
Images go to the samples/ folder of the checkpoint's run unless --out says where; nothing is overwritten.
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import peft
from data import (NON_NEGATIVE, POSITIVE, Hierarchy, Parser, load_dataset, new_file, number, run_script,
                  save_grid, to_pixels)
from diffusion import SAMPLER_STEPS, check_steps, run_sampler
from model import load_vae
from train import finish_distributed, setup_distributed


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--class", dest="cls", default=None,
                   help="class id or name (scientific or common); 'all': a grid with one row per class")
    p.add_argument("--ckpt", default=None, help="a checkpoint or a run folder (none: the newest under results/)")
    p.add_argument("--list-classes", nargs="?", const="", default=None, metavar="TEXT",
                   help="print the classes (id, name, superclass) whose names contain TEXT, and stop")
    p.add_argument("--base", default=None, help="base checkpoint of a delta (default: the path it recorded)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help=peft.WEIGHTS_HELP)
    p.add_argument("--vae", default=None, help="SD VAE (default: the one the model was trained with)")
    p.add_argument("--hierarchy", default=None, help="class list (JSON) for official FineDiffusion checkpoints")
    p.add_argument("--n", type=POSITIVE, default=8, help="images of --class (per class with --class all)")
    p.add_argument("--seed", type=int, default=0, help="the noise")
    p.add_argument("--cfg-scale", type=number(float), default=4.0, help="guidance scale w of Eq. 1 (1: no guidance)")
    p.add_argument("--guidance", nargs="+", default=None, choices=["fine", "cfg", "none"],
                   help="fine: superclass guidance (default for tiered models); cfg: the null label; several: side "
                        "by side, from the same noise")
    p.add_argument("--with-data", action="store_true",
                   help="grids start with training images of each class (from the data the checkpoint names)")
    p.add_argument("--official-three-channels", action="store_true", help="guide eps channels 0..2 only, as DiT")
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLER_STEPS),
                   help="ddpm: the paper's; ddim: deterministic; dpm++: DPM-Solver++(2M), as diffusers' DiTPipeline")
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="model calls (default: " + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")")
    p.add_argument("--num-samples", type=NON_NEGATIVE, default=0, help="bulk: this many images over all classes")
    p.add_argument("--batch-size", type=POSITIVE, default=32,
                   help="images sampled at once, per process (a grid of more is sampled in parts)")
    p.add_argument("--out", default=None,
                   help="the grid PNG, or the folder of a bulk run (none: in the samples/ folder of the run)")
    args = p.parse_args(argv)
    if args.num_sampling_steps is None:
        args.num_sampling_steps = SAMPLER_STEPS[args.sampler]
    try:
        check_steps(args.sampler, args.num_sampling_steps)
    except ValueError as e:
        p.error(f"argument --num-sampling-steps: {e}")
    return args


# -----------------------------------------------------------------------------------------------------------
# Loading any checkpoint into (model, hierarchy, vae path)


def load_model(args):
    """--ckpt (a delta on its base, our full checkpoints, official DiT and FineDiffusion files) -> (merged model,
    hierarchy or None, VAE path or None, our Checkpoint or None)."""
    try:
        hierarchy = Hierarchy.from_json(args.hierarchy) if args.hierarchy else None
        model, checkpoint = peft.load_model(args.ckpt, args.base, hierarchy.class_to_superclass if hierarchy else None,
                                            weights=args.weights)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e) if args.ckpt in str(e) else f"--ckpt {args.ckpt}: {e}")
    vae = args.vae
    if checkpoint is not None:  # ours: the class names and the VAE it was trained with
        hierarchy, vae = Hierarchy.from_dict(checkpoint.hierarchy), args.vae or checkpoint.vae
    return peft.merge(model), hierarchy, vae, checkpoint


def output_path(args, name, companions=()):
    """--out, or `name` in the samples/ folder of the checkpoint's run (of the working directory for a checkpoint
    outside any run); never a path that is taken."""
    if args.out:
        return new_file(args.out.rstrip("/"), "--out", companions)
    return new_file(os.path.join(peft.run_folder(args.ckpt) or ".", peft.SAMPLES_DIR, name), companions=companions)


def list_classes(args):
    """--list-classes [TEXT]: the classes of --ckpt (or of --hierarchy) whose names or superclass contain TEXT."""
    try:
        hierarchy = (Hierarchy.from_json(args.hierarchy) if args.hierarchy
                     else Hierarchy.from_dict(peft.read_checkpoint(args.ckpt).hierarchy))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--list-classes: {e} (an official checkpoint's classes come from --hierarchy)")
    lines = hierarchy.listing(args.list_classes)
    print("\n".join(lines) if lines else f"no class name contains {args.list_classes!r}")


def resolve_class(model, hierarchy, cls):
    """An id or a name -> a fine class id, with the valid range or the closest names when it is not one."""
    if hierarchy is not None:
        try:
            return hierarchy.lookup(cls)
        except ValueError as error:
            raise SystemExit(f"--class {cls}: {error}")
    if not str(cls).isdigit() or int(cls) >= model.y_embedder.num_classes:
        raise SystemExit(f"--class {cls}: this model has no class names; give an id in "
                         f"0..{model.y_embedder.num_classes - 1}")
    return int(cls)


# -----------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def generate(model, vae, labels, args, guidance, progress=True):
    """(N,) fine labels -> (N, H, W, 3) uint8 images, guided towards the parent (fine) or null (cfg) label; the
    noise is drawn for all N at once, the sampler runs on --batch-size of them at a time."""
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, device=labels.device)
    images = []
    for batch_labels, batch_z in zip(labels.split(args.batch_size), z.split(args.batch_size)):
        try:
            model_fn, copies = model.guided(batch_labels, guidance, args.cfg_scale,
                                            3 if args.official_three_channels else None)
        except ValueError as e:
            raise SystemExit(f"--guidance {guidance}: {e}")
        x = run_sampler(args.sampler, model_fn, batch_z.repeat(copies, 1, 1, 1), args.num_sampling_steps,
                        progress=progress)[: len(batch_labels)]
        images.append(to_pixels(x, vae))
    return np.concatenate(images)


def training_images(checkpoint, path, classes, n):
    """The first n training images of each class, as train.py read them (unmirrored) -> (len(classes) * n, H, W, 3);
    white where a class has fewer."""
    settings = checkpoint.data
    try:
        dataset, _ = load_dataset(settings["kind"], settings["path"], settings["image_size"], split=settings["split"])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--with-data: the training data of {path} cannot be read: {e}")
    blank = np.full((settings["image_size"], settings["image_size"], 3), 255, dtype=np.uint8)
    return np.stack([dataset.read(j) if j is not None else blank for c in classes
                     for j in (list(np.flatnonzero(dataset.labels == c)[:n]) + [None] * n)[:n]])


MAX_GRID_ROWS = 100  # --class all on iNat's 10,000 classes would be a picture no one can look at


def sample_grid(model, vae, hierarchy, checkpoint, args, guidances, device):
    """--class (an id, a name or 'all'): a row of --n images per class, a block per guidance (same noise in each),
    led by training images with --with-data."""
    if args.cls == "all":  # one row per class
        if model.y_embedder.num_classes > MAX_GRID_ROWS:
            raise SystemExit(f"--class all: a grid has a row per class, and this model has "
                             f"{model.y_embedder.num_classes:,} classes (a grid takes at most {MAX_GRID_ROWS}): give "
                             f"one class, or --num-samples N for a bulk run over all of them")
        classes, stem = list(range(model.y_embedder.num_classes)), "all"
    else:
        classes = [resolve_class(model, hierarchy, args.cls)]
        stem = f"{classes[0]:05d}"
    if args.with_data and checkpoint is None:
        raise SystemExit("--with-data: an official checkpoint does not say what it was trained on")
    out = output_path(args, "-".join([stem] + (["data"] if args.with_data else []) + guidances) + ".png")
    names = [hierarchy.class_names[c] if hierarchy is not None else f"class {c}" for c in classes]
    labels = torch.tensor(classes).repeat_interleave(args.n).to(device)
    blocks, titles = [], []
    if args.with_data:
        blocks.append(training_images(checkpoint, args.ckpt, classes, args.n))
        titles.append("training images")
    for guidance in guidances:
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


BULK_COMPANIONS = (".npz",)  # a bulk run writes the folder of PNGs and, beside it, folder.npz


def sample_bulk(model, vae, hierarchy, args, guidance, device, rank, world_size):
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
        images = generate(model, vae, (indices % num_classes).to(device), args, guidance, progress=False)
        for i, image in zip(indices.tolist(), images):
            Image.fromarray(image).save(os.path.join(out, f"{i:06d}.png"))
    if world_size > 1:
        dist.barrier()
    if rank == 0:  # the layout of ADM's evaluation suite and DiT's sample_ddp.py, plus our labels
        labels = np.arange(args.num_samples) % num_classes
        images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png")))
                           for i in tqdm(range(args.num_samples), desc="npz")])
        extra = {}
        if hierarchy is not None:
            extra = dict(superclass_labels=np.asarray(hierarchy.class_to_superclass)[labels],
                         class_names=np.asarray(hierarchy.class_names),
                         superclass_names=np.asarray(hierarchy.superclass_names))
        np.savez(out + ".npz", arr_0=images, labels=labels, **extra)
        print(f"wrote {args.num_samples} samples ({args.weights} weights) to {out}/ and {out}.npz ({images.shape})")
    return out


def main(args):
    """-> the grid, or the folder of a bulk run, it wrote."""
    rank, world_size, device = setup_distributed()
    try:
        args.ckpt = peft.checkpoint_path(args.ckpt) if args.ckpt else peft.newest_checkpoint()
    except FileNotFoundError as e:
        raise SystemExit(f"--ckpt: {e}")
    if args.ckpt is None:
        raise SystemExit("no checkpoint under results/: train one (python train.py --toy) or pass --ckpt")
    if args.list_classes is not None:
        return list_classes(args)
    if args.num_samples and len(args.guidance or []) > 1:
        raise SystemExit("--guidance: a bulk run (--num-samples) samples with one guidance")
    if args.num_samples and (args.cls is not None or args.with_data):
        raise SystemExit("--num-samples is a bulk run over every class; --class and --with-data make a grid: give "
                         "one or the other")
    if not args.num_samples and args.cls is None:
        raise SystemExit("give --class (an id, a name or 'all'), or --num-samples for a bulk run")
    if not args.num_samples and world_size > 1:
        raise SystemExit("a grid (--class) is one process's work: run it with python, not torchrun (torchrun is for "
                         "bulk runs, --num-samples)")
    if args.out:  # a taken --out is refused now, before the model loads
        output_path(args, None, BULK_COMPANIONS if args.num_samples else ())
    model, hierarchy, vae_path, checkpoint = load_model(args)
    model.to(device).eval()
    try:
        vae = load_vae(vae_path, device) if vae_path not in (None, "none") else None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--vae: {e}")
    if vae is None and model.in_channels != 3:
        raise SystemExit("this model works in the SD VAE's latent space: give --vae (sd-vae-ft-ema)")
    if vae is not None and vae.latent_channels != model.in_channels:
        raise SystemExit(f"--vae {vae_path} has {vae.latent_channels} latent channels, the model takes "
                         f"{model.in_channels}: give the VAE it was trained with")
    guidances = args.guidance or ["fine" if model.y_embedder.num_superclasses else "cfg"]
    if args.num_samples:
        out = sample_bulk(model, vae, hierarchy, args, guidances[0], device, rank, world_size)
    else:
        out = sample_grid(model, vae, hierarchy, checkpoint, args, guidances, device)
    finish_distributed(world_size)
    return out


if __name__ == "__main__":
    run_script(lambda: main(parse_args()))
