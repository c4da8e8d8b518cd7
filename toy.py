"""
The toy experiment: what the papers do, in miniature, on a CPU, in one command (about 7 min on 2 cores).

    python toy.py                        # pre-train a toy base, fine-tune it with FineDiffusion, draw the results
    python toy.py --method lora          # another method on the same base (a finished base is reused)
    python toy.py --max-steps 300        # shorter (and a base of twice that)

1. Pre-train a tiny DiT (DiT-T/2, 16 px, pixels) on the toy source split (ImageNet's role) for 2x --max-steps, into
   results/NNN-toy-base; a finished one is reused, an interrupted one resumed.
2. Fine-tune it with --method on the target split (new classes, a new superclass) into results/NNN-toy-<method>.
3. Draw every target class (training images, the method's guidance, none) into its samples/every-class.png and,
   for a tiered label table, Figure 7's t-SNE into tsne.png. Every flag of train.py is taken; defaults: the toy's.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import argparse
import os
import time

import cli
import evaluate
import sample
import train
from checkpoint import SAMPLES_DIR, find_checkpoint, named_runs, read_checkpoint
from peft import METHODS

# The fine-tune's settings; the base trains from scratch on the source split with its own lr and name.
TOY_FINE_TUNE = dict(data="toy", split="target", model="DiT-T/2", image_size=16, vae="none", global_batch_size=64,
                     max_steps=600, ema_decay=0.99, num_workers=0, sample_every=100)
TOY_BASE = dict(TOY_FINE_TUNE, split="source", method="full", lr=1e-3, sample_every=0, run_name="toy-base")
SHARED = ("data_path", "results_dir", "model", "image_size", "num_workers", "precision", "seed")  # flags: both runs
SAME_BASE = ("data", "split", "method", "model", "image_size", "vae", "global_batch_size", "lr", "ema_decay", "seed",
             "data_path", "max_steps")  # what a base of an earlier toy run must match to be reused


def parse_args(argv=None):
    args = train.parse_args(argv, __doc__, **TOY_FINE_TUNE)
    if args.resume or "RANK" in os.environ:
        raise ValueError("toy.py starts a new experiment in one process: give it without --resume and without "
                         "torchrun (python train.py --resume continues a run)")
    if "lr" not in args.given:  # full fine-tuning takes the base's lr, the others 10x (DiffFit Table 4d)
        args.lr = 1e-3 if args.method == "full" else 1e-2
    args.run_name = args.run_name or f"toy-{args.method}"
    return args


def toy_base(args):
    """The base to fine-tune: the newest run named toy-base in --results-dir with the same settings (reused when
    finished, resumed when interrupted), else a new one -> its checkpoint."""
    base = argparse.Namespace(**{**vars(train.parse_args([])), **TOY_BASE, **{k: getattr(args, k) for k in SHARED},
                                 "max_steps": 2 * args.max_steps})
    for run in named_runs(TOY_BASE["run_name"], args.results_dir):
        try:
            checkpoint = read_checkpoint(path := find_checkpoint(run))
        except (ValueError, FileNotFoundError):  # a run stopped before its first checkpoint
            continue
        if all(checkpoint.settings.get(k) == getattr(base, k) for k in SAME_BASE):
            if checkpoint.step == base.max_steps:
                print(f"toy base: reusing {path}, pre-trained for {checkpoint.step} steps")
                return path
            print(f"toy base: resuming {path}, stopped at step {checkpoint.step} of {base.max_steps}")
            return find_checkpoint(train.main(train.parse_args(["--resume", path]))[1])
    print(f"toy base: pre-training {base.model} from scratch on the toy source split for {base.max_steps} steps")
    return find_checkpoint(train.main(base)[1])


def main(args):
    """The base, the fine-tune, then the pictures in its run folder -> the run folder."""
    started = time.time()
    args.ckpt = args.ckpt or toy_base(args)
    print(f"fine-tuning with {args.method} on the toy target split for {args.max_steps} steps")
    run_dir = train.main(args)[1]
    grid = sample.main(sample.parse_args([
        "--ckpt", run_dir, "--class", "all", "--n", "6", "--with-data", "--guidance", "default", "none",
        "--sampler", "dpm++", "--out", os.path.join(run_dir, SAMPLES_DIR, "every-class.png")]))
    outputs = [("samples", grid)]
    if METHODS[args.method].tiered:  # Figure 7 needs superclass rows
        outputs.append(("t-SNE", evaluate.main(["tsne", "--checkpoint", run_dir])))  # into the run folder
    same_base = "".join(f" {cli.flag(k)} {getattr(args, k)}" for k in SHARED if k in args.given)
    print(f"\ntoy experiment done in {cli.duration(time.time() - started)}: {run_dir}\n"
          + "".join(f"  {name:8s} {os.path.relpath(path)}\n" for name, path in outputs) + "next:\n"
          f"  python sample.py --ckpt {run_dir} --class disc_e          # one class, by name or id\n"
          f"  python sample.py --ckpt {run_dir} --class all --sampler ddpm   # the papers' 250-step sampler\n"
          f"  python toy.py --method lora{same_base}      # another method on the same base")
    return run_dir


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
