"""
The toy experiment: what the papers do, in miniature, on a CPU, in one command (about 7 min on 2 cores).

    python toy.py                        # pre-train a toy base, fine-tune it with FineDiffusion, draw the results
    python toy.py --method lora          # another method on the same base (a finished base is reused)
    python toy.py --max-steps 300        # shorter (and a base of twice that)
    python toy.py --table                # Table 1 in miniature: every method, two seeds, judged (33 min)
    python toy.py --table --quick        # the same at 100 steps a run, to try the command (8 min)

1. Pre-train a tiny DiT (DiT-T/2, 16 px, pixels) on the toy source split (ImageNet's role) for 2x --max-steps, into
   results/NNN-toy-base; a finished one is reused, an interrupted one resumed.
2. Fine-tune it with --method on the target split (new classes, a new superclass) into results/NNN-toy-<method>.
3. Draw every target class (training images, the method's guidance, none) into its samples/every-class.png and,
   for a tiered label table, Figure 7's t-SNE into tsne.png. Every flag of train.py is taken; defaults: the toy's.
--table: the paper's Table 1 in miniature, on the toy taxonomy (superclass / genus / species, 120 target species,
   32 px, DiT-T/4): one base, then every method fine-tuned at the same steps with two seeds, sampled with its own
   default guidance (same sampler, steps, scale), scored by a judge classifier of the real target images: accuracy
   at every rank, judge FD, diversity. Into results/NNN-toy-table: table.md, table.png, scores/, samples/.
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import argparse
import os
import pathlib
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import cli
import data
import evaluate
import sample
import train
from checkpoint import (SAMPLES_DIR, find_checkpoint, named_runs, open_run, read_checkpoint, read_metrics,
                        run_folder)
from peft import METHODS, parameter_table

# The fine-tune's settings; the base trains from scratch on the source split with its own lr and name.
TOY_FINE_TUNE = dict(data="toy", split="target", model="DiT-T/2", image_size=16, vae="none", global_batch_size=64,
                     max_steps=600, ema_decay=0.99, num_workers=0, sample_every=100)
TOY_BASE = dict(TOY_FINE_TUNE, split="source", method="full", lr=1e-3, sample_every=0, run_name="toy-base")
SHARED = ("data", "data_path", "results_dir", "model", "image_size", "num_workers", "precision", "seed")  # both runs
TABLE = dict(data="taxa", model="DiT-T/4", image_size=32, max_steps=600, log_every=50, sample_every=0)  # --table
TABLE_QUICK = dict(max_steps=100)
TABLE_SEEDS, TABLE_SAMPLING_STEPS = (0, 1), dict(default=20, quick=10)  # DPM-Solver++ steps, the same for all
TABLE_SHOWN = 8  # classes in the figure, spread over the superclasses
SAME_BASE = ("data", "split", "method", "model", "image_size", "vae", "global_batch_size", "lr", "ema_decay", "seed",
             "data_path", "max_steps")  # what a base of an earlier toy run must match to be reused


def own_flags(p):
    p.add_argument("--table", action="store_true", help="Table 1 in miniature: every method, two seeds, judged")
    p.add_argument("--quick", action="store_true", help="with --table: 100 steps a run, to try it")
    p.add_argument("--samples-per-class", type=cli.number(int, 2, 1000), default=4, help="with --table: to judge")


def parse_args(argv=None):
    args = train.parse_args(argv, __doc__, own_flags, **TOY_FINE_TUNE)
    table = {name: args.__dict__.pop(name) for name in ("table", "quick", "samples_per_class")}  # not train.py's
    args.table, args.quick, args.samples_per_class = table.values()
    cli.check(not args.table and (args.quick or "samples_per_class" in args.given) and "--quick and "
              "--samples-per-class go with --table")
    for name, value in {**TABLE, **(TABLE_QUICK if args.quick else {})}.items() if args.table else ():
        if name not in args.given:
            setattr(args, name, value)
    cli.check(args.table and "method" in args.given and "--table fine-tunes every method: give it without --method",
              args.table and args.data in ("toy", "vegfru") and f"--table scores accuracy at three ranks at least, "
              f"and {args.data}'s classes have two (class, superclass): use --data taxa (the default), or a deeper "
              f"folder tree")
    if args.resume or "RANK" in os.environ:
        raise ValueError("toy.py starts a new experiment in one process: give it without --resume and without "
                         "torchrun (python train.py --resume continues a run)")
    if "lr" not in args.given:  # full fine-tuning takes the base's lr, the others 10x (DiffFit Table 4d)
        args.lr = 1e-3 if args.method == "full" else 1e-2
    args.run_name = args.run_name or f"toy-{args.method}"
    return args


def trained(settings, same, label):
    """The newest run named settings.run_name in --results-dir whose settings agree on `same`: reused when finished,
    resumed when interrupted; else a new run of `settings` -> its checkpoint."""
    for run in named_runs(settings.run_name, settings.results_dir):
        try:
            checkpoint = read_checkpoint(path := find_checkpoint(run))
        except (ValueError, FileNotFoundError):  # a run stopped before its first checkpoint
            continue
        if all(checkpoint.settings.get(k) == getattr(settings, k) for k in same):
            if checkpoint.step == settings.max_steps:
                print(f"{label}: reusing {path}, trained for {checkpoint.step} steps")
                return path
            print(f"{label}: resuming {path}, stopped at step {checkpoint.step} of {settings.max_steps}")
            return find_checkpoint(train.main(train.parse_args(["--resume", path]))[1])
    print(f"{label}: training {settings.model} ({settings.method}) on the {settings.data} {settings.split} split for "
          f"{settings.max_steps} steps")
    return find_checkpoint(train.main(settings)[1])


def toy_base(args):
    """The base to fine-tune: pre-trained from scratch on the source split for 2x --max-steps -> its checkpoint."""
    base = argparse.Namespace(**{**vars(train.parse_args([])), **TOY_BASE, **{k: getattr(args, k) for k in SHARED},
                                 "max_steps": 2 * args.max_steps})
    return trained(base, SAME_BASE, "toy base")


# -----------------------------------------------------------------------------------------------------------
# Table 1 in miniature: every method from the same base at the same budget, two seeds each, judged.

def judge_path(kind, data_path, split, image_size):
    """Where --table keeps the judge of a split: beside the toy sets (cache/toy), made once."""
    return os.path.join(data_path or os.path.join("cache", "toy"), f"judge-{kind}-{split}-{image_size}px.pt")


def table_judge(args, dataset):
    """The judge of the target split, reused while its images are the same ones (their fingerprint) -> its path."""
    path = judge_path(args.data, args.data_path, args.split, args.image_size)
    if os.path.exists(path):
        cli.check(evaluate.load_judge(path)[1]["data"]["files"] != dataset.fingerprint() and f"{path} is a judge of "
                  f"other images than the {args.data} {args.split} split now in {args.data_path or 'cache/toy'}: "
                  f"move it away to make a new one")
        print(f"judge: reusing {path}")
        return path
    evaluate.main(["judge", "--data", args.data, "--split", args.split, "--image-size", str(args.image_size),
                   "--num-workers", str(args.num_workers), "--out", path]
                  + ["--data-path", args.data_path] * (args.data_path is not None))
    return path


def mean_spread(values, digits):
    """'mean ± sd' over seeds."""
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.{digits}f}"


def write_table(rows, judge, path):
    """rows: {method: [{scores, trains, images_per_s}, one per seed]} -> Table 1 in miniature, as markdown."""
    ranks = list(judge["held_out"])
    lines = ["| method | trains | train img/s | " + " | ".join(f"{r} acc.↑" for r in ranks)
             + " | judge FD↓ | FD per superclass↓ | diversity (1 = real) |", "|---|" + "---:|" * (len(ranks) + 5)]
    for method, seeds in rows.items():
        scores = [seed["scores"] for seed in seeds]
        cells = ([f"{seeds[0]['trains']:.2f}%", mean_spread([seed["images_per_s"] for seed in seeds], 0)]
                 + [mean_spread([s["accuracy"][r] for s in scores], 3) for r in ranks]
                 + [mean_spread([s["fd"]["overall"] for s in scores], 2),
                    mean_spread([s["fd_mean"] for s in scores], 2), mean_spread([s["diversity"] for s in scores], 3)])
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    chance = next(iter(rows.values()))[0]["scores"]["chance"]
    lines += ["| real images (held out) | | | " + " | ".join(f"{judge['held_out'][r]:.3f}" for r in ranks) + " | | | |",
              "| chance | | | " + " | ".join(f"{chance[r]:.3f}" for r in ranks) + " | | | |"]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def draw_bars(rows, path, width=900, bar_height=16):
    """Fine, genus, ... accuracy per method as horizontal bars (mean over seeds), one group per method."""
    ranks = list(next(iter(rows.values()))[0]["scores"]["accuracy"])
    colors = [(40, 90, 160), (90, 150, 210), (170, 200, 230), (200, 215, 235)]
    font = ImageFont.load_default(size=14)
    left, group = 130, bar_height * len(ranks) + 14
    canvas = Image.new("RGB", (width, 30 + group * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, rank in enumerate(ranks):  # the legend
        draw.rectangle([left + 150 * k, 6, left + 150 * k + 12, 18], fill=colors[k])
        draw.text((left + 150 * k + 16, 12), f"{rank} accuracy", fill="black", font=font, anchor="lm")
    for m, (method, seeds) in enumerate(rows.items()):
        top = 30 + m * group
        draw.text((8, top + group / 2 - 7), method, fill="black", font=font, anchor="lm")
        for k, rank in enumerate(ranks):
            value = float(np.mean([seed["scores"]["accuracy"][rank] for seed in seeds]))
            y = top + k * bar_height
            draw.rectangle([left, y, left + value * (width - left - 60), y + bar_height - 2], fill=colors[k])
            draw.text((left + value * (width - left - 60) + 4, y + bar_height / 2), f"{value:.2f}", fill="black",
                      font=font, anchor="lm")
    canvas.save(path)


def fine_tune_settings(args, method, seed):
    """One row's run: --method and --seed set, each method at its own lr (as the toy's fine-tune)."""
    lr = args.lr if "lr" in args.given else 1e-3 if method == "full" else 1e-2
    return argparse.Namespace(**{**vars(args), "method": method, "seed": seed, "lr": lr,
                                 "run_name": f"toy-{method}-seed{seed}"})


def table(args):
    """Table 1 in miniature -> its folder (table.md, table.png, accuracy.png, scores/, samples/)."""
    started = time.time()
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, args.split, hflip=False)
    ranks = [rank for rank, _, _ in hierarchy.ranks()]
    cli.check(len(ranks) < 3 and f"--table scores accuracy at three ranks at least, and {args.data} {args.split} has "
                                 f"{len(ranks)} ({', '.join(ranks)}): use --data taxa (the default), or a deeper "
                                 f"folder tree")
    with open_run(args.results_dir, "toy-table") as lock:
        folder = os.path.dirname(lock.path)
        args.ckpt = args.ckpt or toy_base(args)
        judge = table_judge(args, dataset)
        runs, rows, first = [(method, seed) for method in METHODS for seed in TABLE_SEEDS], {}, time.time()
        for i, (method, seed) in enumerate(runs):
            per_run = (time.time() - first) / max(i, 1)  # the runs so far, without the base and the judge
            print(f"\ntable: run {i + 1} of {len(runs)} ({method}, seed {seed}); {cli.duration(time.time() - started)} "
                  f"so far" + (f", about {cli.duration(per_run * (len(runs) - i))} to go" if i else ""))
            checkpoint = trained(fine_tune_settings(args, method, seed), SAME_BASE + ("ckpt",), f"{method} seed {seed}")
            name = f"{method}-seed{seed}"
            samples = sample.main(sample.parse_args(
                ["--ckpt", checkpoint, "--num-samples", str(args.samples_per_class * len(hierarchy.class_names)),
                 "--guidance", "default", "--sampler", "dpm++", "--num-sampling-steps",
                 str(TABLE_SAMPLING_STEPS["quick" if args.quick else "default"]),
                 "--out", os.path.join(folder, SAMPLES_DIR, name)]))
            scores = os.path.join(folder, "scores", f"{name}.json")
            os.makedirs(os.path.dirname(scores), exist_ok=True)
            evaluate.main(["score", "--judge", judge, "--samples", samples + ".npz", "--method", method,
                           "--results", scores])
            saved = read_checkpoint(checkpoint)
            trains = next(percent for row_method, _, _, percent, _ in parameter_table(
                saved.dit, hierarchy.class_to_superclass, {method: saved.options}) if row_method == method)
            speeds = [record["images_per_s"] for record in read_metrics(run_folder(checkpoint))]
            rows.setdefault(method, []).append(dict(scores=data.read_json(scores)["judge"], trains=trains,
                                                    images_per_s=float(np.mean(speeds)), samples=samples + ".npz"))
        markdown = write_table(rows, evaluate.load_judge(judge)[1], os.path.join(folder, "table.md"))
        shown = np.linspace(0, len(hierarchy.class_names) - 1, TABLE_SHOWN).round().astype(int)
        real = [dataset.read(np.flatnonzero(dataset.labels == c)[0]) for c in shown]
        drawn = [np.load(seeds[0]["samples"])["arr_0"][c] for seeds in rows.values() for c in shown]  # sample c: of c
        data.save_grid(np.stack(real + drawn), os.path.join(folder, "table.png"), cols=len(shown),
                       row_names=["real"] + [f"{method} (seed {TABLE_SEEDS[0]})" for method in rows])
        draw_bars(rows, os.path.join(folder, "accuracy.png"))
    print(f"\nTable 1 in miniature, {cli.duration(time.time() - started)}:\n{markdown}\n-> {folder}: table.md, "
          f"table.png (samples beside real images), accuracy.png, scores/, samples/")
    return folder


def main(args):
    """The base, the fine-tune, then the pictures in its run folder -> the run folder."""
    if args.table:
        return table(args)
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
