"""
The full-size path, end to end on any machine, a CPU too: DiT-XL/2 at 256 px fine-tuned with
FineDiffusion on iNat 2021's 10,000 classes in 11 superclasses, by the commands users run.

    python tests/fullsize.py   # into a new folder fullsize-check/ (20-25 min on 2 CPU cores, 12 GiB)

Random weights in the real formats; train.py on 2 processes (latent cache, bf16, compile) to step 2;
its resume from step 1, bit for bit; sample.py from the delta. It proves the path, not quality: a
test too slow for the suite, run by hand.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
sys.path.insert(0, ROOT)
import cli  # first: a quiet Ctrl-C while torch loads

import itertools
import json
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from checkpoint import checkpoint_file, load_model, read_checkpoint
from model import DIT_CONFIGS, AutoencoderKL, DiT
from peft import count_parameters

# iNat 2021's supercategories, each with a taxonomy whose folder names give it (data.inat_category)
TAXA = {"Amphibians": "Animalia_Chordata_Amphibia", "Animalia": "Animalia_Annelida_Clitellata",
        "Arachnids": "Animalia_Arthropoda_Arachnida", "Birds": "Animalia_Chordata_Aves",
        "Fungi": "Fungi_Basidiomycota_Agaricomycetes", "Insects": "Animalia_Arthropoda_Insecta",
        "Mammals": "Animalia_Chordata_Mammalia", "Mollusks": "Animalia_Mollusca_Gastropoda",
        "Plants": "Plantae_Tracheophyta_Magnoliopsida", "Reptiles": "Animalia_Chordata_Reptilia",
        "Ray-finned Fishes": "Animalia_Chordata_Actinopterygii"}
NUM_CLASSES, PAPER_PERCENT = 10_000, 1.77
MEASURED = ("import pathlib, resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "pathlib.Path(sys.argv[1]).write_text(str(usage.ru_maxrss)); sys.exit(code)")  # (POSIX)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--out", default="fullsize-check", help="a new folder for the files and runs")
    p.add_argument("--images", type=cli.number(int, 2, 64), default=8, help="training images")
    p.add_argument("--sampling-steps", type=cli.number(int, 2, 50), default=5, help="DPM++ steps")
    return p.parse_args(argv)


def write_inputs(root, images):
    """The base, the VAE and the iNat tree in real formats -> (base, VAE folder, data root)."""
    torch.manual_seed(0)
    dit = DiT(input_size=32, in_channels=4, num_classes=1000, **DIT_CONFIGS["DiT-XL/2"])
    torch.save(dit.state_dict(), base := os.path.join(root, "DiT-XL-2-256x256.pt"))
    os.makedirs(vae := os.path.join(root, "sd-vae"))
    torch.save(AutoencoderKL().state_dict(), os.path.join(vae, "diffusion_pytorch_model.bin"))
    data, rng, supers = os.path.join(root, "inat"), np.random.default_rng(0), sorted(TAXA)
    categories = [dict(id=c, name=f"Genus{c} species{c}", supercategory=s,
                       image_dir_name=f"{c:05d}_{TAXA[s]}_Order_Family_Genus{c}_species{c}")
                  for c, s in zip(range(NUM_CLASSES), itertools.cycle(supers))]
    for category in categories:
        os.makedirs(os.path.join(data, "train_mini", category["image_dir_name"]))
    files = [f"train_mini/{categories[i // 2]['image_dir_name']}/{i}.jpg" for i in range(images)]
    for file in files:  # 2 per class
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), np.uint8)).save(f"{data}/{file}")
    with open(os.path.join(data, "train_mini.json"), "w") as f:
        json.dump(dict(categories=categories,
                       images=[dict(id=i, file_name=n) for i, n in enumerate(files)],
                       annotations=[dict(id=i, image_id=i, category_id=i // 2)
                                    for i in range(images)]), f)
    return base, vae, data


def stage(name, command, report, root):
    """Run a script of ours in MEASURED and report its time and peak memory; a failure: the end."""
    start, peak_file = time.time(), os.path.join(root, "peak.txt")
    if code := subprocess.call([sys.executable, "-c", MEASURED, peak_file, *command], cwd=ROOT):
        raise ValueError(f"{name} failed (exit code {code}): its error is above")
    seconds, peak = time.time() - start, cli.max_rss_bytes(int(np.loadtxt(peak_file))) / 2**30
    os.remove(peak_file)
    report(f"{name}: {cli.duration(seconds)}, peak memory of its largest process {peak:.1f} GiB")


def main(args):
    root = os.path.abspath(cli.new_file(args.out, "--out" if "out" in args.given else None))
    os.makedirs(root)
    lines, start = [], time.time()
    report = lambda line: (print(line, flush=True), lines.append(line))
    base, vae, data = write_inputs(root, args.images)
    report(f"inputs (DiT-XL/2 of random weights, 2.7 GB; SD VAE; iNat tree of {NUM_CLASSES:,} "
           f"classes, {args.images} images): {cli.duration(time.time() - start)}")
    results, run = os.path.join(root, "results"), os.path.join(root, "results", "000-xl-fd")
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "train.py", "--max-steps", "2", "--results-dir", results, "--num-workers", "0",
             "--log-every", "1", "--ckpt-every", "1"]
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))  # half each
    stage("train, 2 processes: latent cache, bf16, --grad-checkpointing, --compile, steps 1-2", [
        *train, "--method", "finediffusion", "--data", "inat", "--data-path", data, "--ckpt", base,
        "--vae", vae, "--latent-cache", os.path.join(root, "cache"), "--image-size", "256",
        "--precision", "bf16", "--grad-checkpointing", "--compile", "--global-batch-size", "2",
        "--run-name", "xl-fd"], report, root)
    stage("resume from step 1 (as after a kill), 2 processes, to step 2",
          [*train, "--resume", checkpoint_file(run, 1)], report, root)
    uninterrupted, resumed = (read_checkpoint(checkpoint_file(f"{results}/00{k}-xl-fd", 2))
                              for k in (0, 1))
    same = all(torch.equal(resumed.tensors(w)[k], v) for w in ("raw", "ema")
               for k, v in uninterrupted.tensors(w).items())
    report(f"the resumed step 2 equals the uninterrupted one bit for bit: {same}")
    stage(f"sample.py: DPM-Solver++ {args.sampling_steps} steps, FineDiffusion guidance (Eq. 1)", [
        sys.executable, "sample.py", "--ckpt", run, "--class", "0", "--n", "1", "--sampler",
        "dpm++", "--num-sampling-steps", str(args.sampling_steps), "--guidance", "fine", "--out",
        os.path.join(root, "class-0.png")], report, root)
    total, trainable = count_parameters(load_model(checkpoint_file(run, 2), merged=False)[0])
    size = sum(t.numel() * t.element_size() for t in uninterrupted.model.values()) / 2**20
    report(f"the delta: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%; the "
           f"paper: {PAPER_PERCENT}%), {size:,.0f} MiB; all in {cli.duration(time.time() - start)}")
    with open(os.path.join(root, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not same:
        raise ValueError("the resumed run differs from the uninterrupted one: a bug, please report")
    return lines


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
