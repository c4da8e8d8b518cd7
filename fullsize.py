"""
The full-size path, run end to end on any machine, a CPU too: DiT-XL/2 at 256 px fine-tuned with FineDiffusion on
iNat 2021's 10,000 classes in 11 superclasses, through the very commands users run.

    python fullsize.py                  # into a new folder fullsize-check/ (20-25 min on 2 CPU cores, 12 GiB)

1. Files in the real formats: a DiT-XL/2 of random weights as the official checkpoint is (a state dict, 1,001 label
   rows), a VAE of random weights in the SD VAE's architecture (a diffusers .bin), and an iNat 2021 tree
   (train_mini.json with 10,000 categories in iNat's 11 supercategories, 10,000 class folders, images in a few).
2. torchrun, two processes (gloo): train.py encodes the latent cache, then trains at bf16 autocast with
   --grad-checkpointing and --compile, a checkpoint every step, to step 2.
3. The resume from step 1 (as after a kill there), two processes again: its step 2 equals the uninterrupted one.
4. sample.py from the delta: DPM-Solver++ with FineDiffusion's guidance (Eq. 1).
Each stage says its wall time and the peak memory of its largest process; the delta is set against the paper's 1.77%.
Random weights draw noise: this proves the path (formats, sizes, processes, resume), not image quality.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import cli
from checkpoint import checkpoint_file, load_model, read_checkpoint
from model import DIT_CONFIGS, AutoencoderKL, DiT
from peft import count_parameters

# iNat 2021's supercategories, each with a taxonomy whose folder names give it (data.inat_category)
TAXA = {"Amphibians": "Animalia_Chordata_Amphibia", "Animalia": "Animalia_Annelida_Clitellata",
        "Arachnids": "Animalia_Arthropoda_Arachnida", "Birds": "Animalia_Chordata_Aves",
        "Fungi": "Fungi_Basidiomycota_Agaricomycetes", "Insects": "Animalia_Arthropoda_Insecta",
        "Mammals": "Animalia_Chordata_Mammalia", "Mollusks": "Animalia_Mollusca_Gastropoda",
        "Plants": "Plantae_Tracheophyta_Magnoliopsida", "Ray-finned Fishes": "Animalia_Chordata_Actinopterygii",
        "Reptiles": "Animalia_Chordata_Reptilia"}
NUM_CLASSES, PAPER_PERCENT = 10_000, 1.77


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--out", default="fullsize-check", help="a new folder for the files and runs")
    p.add_argument("--images", type=cli.number(int, 2, 64), default=8, help="training images (in classes 0, 1, ...)")
    p.add_argument("--sampling-steps", type=cli.number(int, 2, 50), default=5, help="DPM-Solver++ steps")
    return p.parse_args(argv)


def write_inputs(root, images):
    """The base, the VAE and the iNat tree, in their real formats -> (base path, VAE folder, data root)."""
    torch.manual_seed(0)
    base = os.path.join(root, "DiT-XL-2-256x256.pt")
    torch.save(DiT(input_size=32, in_channels=4, num_classes=1000, **DIT_CONFIGS["DiT-XL/2"]).state_dict(), base)
    os.makedirs(vae := os.path.join(root, "sd-vae"))
    torch.save(AutoencoderKL().state_dict(), os.path.join(vae, "diffusion_pytorch_model.bin"))
    data, rng = os.path.join(root, "inat"), np.random.default_rng(0)
    supers = sorted(TAXA)
    categories = [dict(id=c, name=f"Genus{c} species{c}", supercategory=supers[c % len(supers)],
                       image_dir_name=f"{c:05d}_{TAXA[supers[c % len(supers)]]}_Order_Family_Genus{c}_species{c}")
                  for c in range(NUM_CLASSES)]
    for c in categories:
        os.makedirs(os.path.join(data, "train_mini", c["image_dir_name"]))
    files = [f"train_mini/{categories[i // 2]['image_dir_name']}/{i}.jpg" for i in range(images)]  # 2 per class
    for file in files:
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(os.path.join(data, file))
    with open(os.path.join(data, "train_mini.json"), "w") as f:
        json.dump(dict(categories=categories, images=[dict(id=i, file_name=n) for i, n in enumerate(files)],
                       annotations=[dict(id=i, image_id=i, category_id=i // 2) for i in range(images)]), f)
    return base, vae, data


ROOT = os.path.dirname(os.path.abspath(__file__))
MEASURED = ("import pathlib, resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "  # (POSIX)
            "pathlib.Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def stage(name, command, report, root):
    """Run a script of this repository (its output shown as it comes) in a wrapper that reads the peak memory of its
    processes, and report its time and that peak; a failure ends the check."""
    start, peak_file = time.time(), os.path.join(root, "peak.txt")
    code = subprocess.call([sys.executable, "-c", MEASURED, peak_file, *command], cwd=ROOT)
    seconds = time.time() - start
    cli.check(code != 0 and f"{name} failed (exit code {code}): its error is above")
    with open(peak_file) as f:
        peak = int(f.read()) * (1 if sys.platform == "darwin" else 1024) / 2**30
    os.remove(peak_file)
    report(f"{name}: {cli.duration(seconds)}, peak memory of its largest process {peak:.1f} GiB")


def main(args):
    root = os.path.abspath(cli.new_file(args.out, "--out" if "out" in args.given else None))
    os.makedirs(root)
    lines = []
    report = lambda line: (print(line, flush=True), lines.append(line))
    start = time.time()
    base, vae, data = write_inputs(root, args.images)
    report(f"inputs (DiT-XL/2 of random weights, 2.7 GB; SD VAE; iNat tree of {NUM_CLASSES:,} classes, "
           f"{args.images} images): {cli.duration(time.time() - start)}")
    results, threads = os.path.join(root, "results"), str(max(1, (os.cpu_count() or 2) // 2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = ["--results-dir", results, "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1"]
    os.environ["OMP_NUM_THREADS"] = threads  # each of the two processes gets half the cores
    stage("train, 2 processes: latent cache, bf16, --grad-checkpointing, --compile, steps 1-2", torchrun + [
        "train.py", "--method", "finediffusion", "--data", "inat", "--data-path", data, "--ckpt", base, "--vae", vae,
        "--latent-cache", os.path.join(root, "cache"), "--image-size", "256", "--precision", "bf16",
        "--grad-checkpointing", "--compile", "--global-batch-size", "2", "--max-steps", "2", "--run-name", "xl-fd",
        *common], report, root)
    run = os.path.join(results, "000-xl-fd")
    stage("resume from step 1 (as after a kill), 2 processes, to step 2", torchrun + [
        "train.py", "--resume", checkpoint_file(run, 1), "--max-steps", "2", *common], report, root)
    uninterrupted, resumed = (read_checkpoint(checkpoint_file(os.path.join(results, f"00{k}-xl-fd"), 2))
                              for k in (0, 1))
    same = all(torch.equal(getattr(resumed, w)[k], v) for w in ("model", "ema")
               for k, v in getattr(uninterrupted, w).items())
    report(f"the resumed step 2 equals the uninterrupted one bit for bit: {same}")
    stage(f"sample.py: DPM-Solver++ {args.sampling_steps} steps, FineDiffusion guidance (Eq. 1)", [
        sys.executable, "sample.py", "--ckpt", run, "--class", "0", "--n", "1", "--sampler", "dpm++",
        "--num-sampling-steps", str(args.sampling_steps), "--guidance", "fine",
        "--out", os.path.join(root, "class-0.png")], report, root)
    total, trainable = count_parameters(load_model(checkpoint_file(run, 2), merged=False)[0])
    size = sum(t.numel() * t.element_size() for t in uninterrupted.model.values()) / 2**20
    report(f"the delta: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%; the paper: "
           f"{PAPER_PERCENT}%), {size:,.0f} MiB; all in {cli.duration(time.time() - start)}")
    with open(os.path.join(root, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    cli.check(not same and "the resumed run differs from the uninterrupted one: a bug, please report it")
    return lines


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
