"""The papers in miniature on a CPU (21 min on 2 cores): a tiny DiT (DiT-T/2, 16 px) pre-trained on
the toy source split for --base-steps, fine-tuned with --method on the target split (new classes,
a new superclass), then every class drawn (and Figure 7's t-SNE, if tiered). --table: Table 1 in
miniature on the toy taxonomy (120 species, 20 genera, 5 superclasses), every method from one base
at two seeds, judged by a real-image classifier, beside the base judged on its own species. The
flags of train.py apply; a finished run is reused, a stopped one resumed.

    python toy.py                    # pre-train a toy base, fine-tune it with FineDiffusion, draw
    python toy.py --method lora      # another method on the same base
    python toy.py --table            # Table 1 in miniature: every method, two seeds (49 min)
    python toy.py --table --quick    # 100 steps a run, a base of 1,000: to try the command
"""
import cli  # first: a quiet Ctrl-C while torch loads

import argparse
import os
import pathlib
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data
import evaluate
import sample
import train
from checkpoint import (SAMPLES_DIR, find_checkpoint, named_runs, open_run, read_checkpoint,
                        read_metrics, run_folder)
from peft import METHODS, parameter_table

# The fine-tune's settings; the base trains from scratch on the source split, its own lr and name.
TOY_FINE_TUNE = dict(data="toy", split="target", model="DiT-T/2", image_size=16, vae="none",
                     global_batch_size=64, max_steps=600, base_steps=1200, ema_decay=0.99,
                     num_workers=0, sample_every=100)
FINE_TUNE_LR = 1e-3  # full fine-tuning's; the others train at 10x (DiffFit's rule), every method
TOY_BASE = dict(TOY_FINE_TUNE, split="source", method="full", lr=3e-3, sample_every=0,
                run_name="toy-base")
SHARED = ("data", "data_path", "results_dir", "model", "image_size", "num_workers", "precision",
          "seed")  # what the base and the fine-tune share
SAME_BASE = ("data", "split", "method", "model", "image_size", "vae", "global_batch_size", "lr",
             "ema_decay", "seed", "data_path", "max_steps")  # an earlier base to reuse must match
TABLE = dict(data="taxa", model="DiT-T/4", image_size=32, max_steps=600, base_steps=3000,
             log_every=50, sample_every=0)  # --table's defaults; --quick: 100 steps, base 1000
TABLE_SEEDS, TABLE_SHOWN = (0, 1), 8  # seeds a method; classes in the figure


def toy_lr(args, method):
    """--lr, else the toy's (not peft.METHODS'): FINE_TUNE_LR for full, the others 10x."""
    return args.lr if "lr" in args.given else FINE_TUNE_LR * (1 if method == "full" else 10)


def own_flags(p):
    p.add_argument("--table", action="store_true", help="Table 1 in miniature, every method")
    p.add_argument("--base-steps", type=cli.POSITIVE, help="the base's pre-training steps")
    p.add_argument("--quick", action="store_true", help="with --table: 100 steps a run, to try it")
    p.add_argument("--samples-per-class", type=cli.number(int, 2, 1000), default=4,
                   help="with --table: to judge")


def parse_args(argv=None):
    args = train.parse_args(argv, __doc__, own_flags, **TOY_FINE_TUNE)
    if not args.table and (args.quick or "samples_per_class" in args.given):
        raise ValueError("--quick and --samples-per-class go with --table")
    if args.table:
        if "method" in args.given:
            raise ValueError("--table fine-tunes every method: give it without --method")
        table = dict(TABLE, max_steps=100, base_steps=1000) if args.quick else TABLE
        vars(args).update({k: v for k, v in table.items() if k not in args.given})
        if args.data in ("toy", "vegfru"):
            raise ValueError(f"--table scores accuracy at three ranks at least, and {args.data}'s "
                             f"classes have two (class, superclass): use --data taxa (the default)")
    if args.resume or "RANK" in os.environ:
        raise ValueError("toy.py starts a new experiment in one process: give it without --resume "
                         "and without torchrun (python train.py --resume continues a run)")
    args.lr = toy_lr(args, args.method)
    args.run_name = args.run_name or f"toy-{args.method}"
    return args


def trained(settings, same, label):
    """The newest run named settings.run_name whose settings agree on `same`: reused when
    finished, resumed when interrupted; else a new run of `settings` -> its checkpoint."""
    for run in named_runs(settings.run_name, settings.results_dir):
        try:
            saved = read_checkpoint(path := find_checkpoint(run))
        except (ValueError, FileNotFoundError):  # unreadable, or of an earlier format: passed over
            continue
        if all(saved.settings.get(k) == getattr(settings, k) for k in same):
            if saved.step == settings.max_steps:
                print(f"{label}: reusing {path}, trained for {saved.step} steps")
                return path
            print(f"{label}: resuming {path}, stopped at step {saved.step} of {settings.max_steps}")
            return find_checkpoint(train.main(train.parse_args(["--resume", path]))[1])
    print(f"{label}: training {settings.model} ({settings.method}) on the {settings.data} "
          f"{settings.split} split for {settings.max_steps} steps")
    return find_checkpoint(train.main(settings)[1])


def toy_base(args):
    """The base: trained from scratch on the source split for --base-steps -> its checkpoint."""
    base = {**vars(train.parse_args([])), **TOY_BASE, **{k: getattr(args, k) for k in SHARED},
            "max_steps": args.base_steps}
    return trained(argparse.Namespace(**base), SAME_BASE, "toy base")


# ------------------------------------------------------------------------------------------------
# Table 1 in miniature: every method from the same base at the same budget, two seeds each, judged.

def judge_path(kind, data_path, split, image_size):
    """Where --table keeps the judge of a split: beside the toy sets (cache/toy), made once."""
    folder = data_path or os.path.join("cache", "toy")
    return os.path.join(folder, f"judge-{kind}-{split}-{image_size}px.pt")


def judge_of(args, split):
    """The judge of a split's real images, trained once, reused while they are the same ones ->
    (its path, the split's dataset, its hierarchy)."""
    dataset, hierarchy = data.load_dataset(args.data, args.data_path, args.image_size, split,
                                           hflip=False)
    judge = judge_path(args.data, args.data_path, split, args.image_size)
    if not os.path.exists(judge):
        evaluate.main(["judge", "--data", args.data, "--split", split, "--image-size",
                       str(args.image_size), "--num-workers", str(args.num_workers), "--out",
                       judge] + ["--data-path", args.data_path] * (args.data_path is not None))
    elif evaluate.load_judge(judge)[1]["data"]["files"] != dataset.fingerprint():
        raise ValueError(f"{judge} judges other images than the {args.data} {split} split now "
                         f"in {args.data_path or 'cache/toy'}: move it away")
    else:
        print(f"judge: reusing {judge}")
    return judge, dataset, hierarchy


def judged(args, folder, judge, checkpoint, name, count):
    """`count` samples of a checkpoint, every class alike, scored by the judge -> (scores, .npz)."""
    samples = sample.main(sample.parse_args([
        "--ckpt", checkpoint, "--num-samples", str(count), "--guidance", "default", "--sampler",
        "dpm++", "--num-sampling-steps", str(10 if args.quick else 20),  # DPM-Solver++, for all
        "--out", os.path.join(folder, SAMPLES_DIR, name)])) + ".npz"
    path = os.path.join(folder, "scores", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    evaluate.main(["score", "--judge", judge, "--samples", samples, "--results", path])
    return data.read_json(path)["judge"], samples


def table_row(args, folder, judge, hierarchy, method, seed):
    """One method at one seed: fine-tuned, sampled, judged -> {trains, numbers, accuracy, ...}."""
    name, count = f"{method}-seed{seed}", args.samples_per_class * len(hierarchy.class_names)
    settings = argparse.Namespace(**{**vars(args), "method": method, "seed": seed,
                                     "lr": toy_lr(args, method), "run_name": f"toy-{name}"})
    checkpoint = trained(settings, SAME_BASE + ("ckpt",), f"{method} seed {seed}")
    scores, samples = judged(args, folder, judge, checkpoint, name, count)
    saved = read_checkpoint(checkpoint)
    counts = parameter_table(saved.dit, hierarchy.class_to_superclass, {method: saved.options})
    speeds = [record["images_per_s"] for record in read_metrics(run_folder(checkpoint))]
    return dict(trains=next(row[3] for row in counts if row[0] == method), samples=samples,
                accuracy=scores["accuracy"], chance=scores["chance"],
                numbers=[np.mean(speeds), *scores["accuracy"].values(), scores["fd"]["overall"],
                         scores["fd_mean"], scores["diversity"]])


def write_results(rows, ceiling, held_out, folder):
    """rows: {method: [table_row(), one per seed]}, the base's accuracy on its own source species ->
    table.md, Table 1 in miniature (returned), and accuracy.png: each rank's accuracy per method
    (mean over seeds) as bars, a group a method."""
    ranks = list(held_out)
    lines = ["| method | trains | train img/s | " + " | ".join(f"{r} acc.↑" for r in ranks)
             + " | judge FD↓ | FD per superclass↓ | diversity (1 = real) |",
             "|---|" + "---:|" * (len(ranks) + 5)]
    digits = [0] + [3] * len(ranks) + [2, 2, 3]
    for method, seeds in rows.items():  # mean ± sd over the seeds
        cols = zip(*(seed["numbers"] for seed in seeds))
        cells = [f"{np.mean(c):.{d}f} ± {np.std(c, ddof=len(c) > 1):.{d}f}"  # (one seed: 0)
                 for c, d in zip(cols, digits)]
        lines.append(f"| {method} | {seeds[0]['trains']:.2f}% | " + " | ".join(cells) + " |")
    chance = next(iter(rows.values()))[0]["chance"]
    for name, values in (("base, on its source species", ceiling),
                         ("real images (held out)", held_out), ("chance", chance)):
        lines.append(f"| {name} | | | {' | '.join(f'{values[r]:.3f}' for r in ranks)} | | | |")
    pathlib.Path(folder, "table.md").write_text("\n".join(lines) + "\n")
    colors = [(40, 90, 160), (90, 150, 210), (170, 200, 230), (200, 215, 235)]
    left, bar, scale, group = 130, 16, 900 - 130 - 60, 16 * len(ranks) + 14  # px
    canvas = Image.new("RGB", (900, 30 + group * len(rows)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    text = lambda xy, words: draw.text(xy, words, fill="black", font=font, anchor="lm")
    for k, rank in enumerate(ranks):  # the legend
        draw.rectangle([left + 150 * k, 6, left + 150 * k + 12, 18], fill=colors[k])
        text((left + 150 * k + 16, 12), f"{rank} accuracy")
    for m, (method, seeds) in enumerate(rows.items()):
        top = 30 + m * group
        text((8, top + group / 2 - 7), method)
        for k, rank in enumerate(ranks):
            value, y = float(np.mean([seed["accuracy"][rank] for seed in seeds])), top + k * bar
            draw.rectangle([left, y, left + value * scale, y + bar - 2], fill=colors[k])
            text((left + value * scale + 4, y + bar / 2), f"{value:.2f}")
    canvas.save(os.path.join(folder, "accuracy.png"))
    return "\n".join(lines)


def table(args):
    """Table 1 in miniature -> its folder (table.md, table.png, accuracy.png, scores/, samples/)."""
    started = time.time()
    with open_run(args.results_dir, "toy-table") as lock:
        folder = os.path.dirname(lock.path)
        args.ckpt = args.ckpt or toy_base(args)
        # the ceiling: how well the base draws its own species, the most a fine-tune can reach
        judge, _, source = judge_of(args, TOY_BASE["split"])
        count = args.samples_per_class * len(source.class_names)
        ceiling = judged(args, folder, judge, args.ckpt, "base-source", count)[0]["accuracy"]
        judge, dataset, hierarchy = judge_of(args, args.split)
        runs = [(method, seed) for method in METHODS for seed in TABLE_SEEDS]
        rows, first = {method: [] for method in METHODS}, time.time()
        for i, (method, seed) in enumerate(runs):  # to go: at the pace of the runs so far
            to_go = cli.duration((time.time() - first) / max(i, 1) * (len(runs) - i))
            print(f"\ntable: run {i + 1} of {len(runs)} ({method}, seed {seed}); "
                  f"{cli.duration(time.time() - started)} so far"
                  + (f", about {to_go} to go" if i else ""))
            rows[method].append(table_row(args, folder, judge, hierarchy, method, seed))
        held_out = evaluate.load_judge(judge)[1]["held_out"]
        markdown = write_results(rows, ceiling, held_out, folder)
        shown = np.linspace(0, len(hierarchy.class_names) - 1, TABLE_SHOWN).round().astype(int)
        real = [dataset.read(np.flatnonzero(dataset.labels == c)[0]) for c in shown]
        # each method's first seed: sample i is of class i mod C, so sample c is of class c
        drawn = [np.load(seeds[0]["samples"])["arr_0"][shown] for seeds in rows.values()]
        names = ["real"] + [f"{method} (seed {TABLE_SEEDS[0]})" for method in rows]
        data.save_grid(np.concatenate([np.stack(real), *drawn]), os.path.join(folder, "table.png"),
                       cols=len(shown), row_names=names)
    print(f"\nTable 1 in miniature, {cli.duration(time.time() - started)}:\n{markdown}\n-> "
          f"{folder}: table.md, table.png (samples, real images), accuracy.png, scores/, samples/")
    return folder


def main(args):
    """The base, the fine-tune, then the pictures in its run folder -> the run folder."""
    if args.table:
        return table(args)
    started = time.time()
    args.ckpt = args.ckpt or toy_base(args)
    print(f"fine-tuning with {args.method} on the toy target split for {args.max_steps} steps")
    run_dir = train.main(args)[1]
    outputs = [("samples", sample.main(sample.parse_args([
        "--ckpt", run_dir, "--class", "all", "--n", "6", "--with-data", "--guidance", "default",
        "none", "--sampler", "dpm++", "--out", os.path.join(run_dir, SAMPLES_DIR, "every-class.png")
    ])))]
    if METHODS[args.method].tiered:  # Figure 7 needs superclass rows
        outputs.append(("t-SNE", evaluate.main(["tsne", "--checkpoint", run_dir])))
    same_base = "".join(f" {cli.flag(k)} {getattr(args, k)}" for k in SHARED if k in args.given)
    print(f"\ntoy experiment done in {cli.duration(time.time() - started)}: {run_dir}\n"
          + "".join(f"  {name:8s} {os.path.relpath(path)}\n" for name, path in outputs) + "next:\n"
          f"  python sample.py --ckpt {run_dir} --class disc_e   # one class, by name or id\n"
          f"  python sample.py --ckpt {run_dir} --class all --sampler ddpm   # as in the papers\n"
          f"  python toy.py --method lora{same_base}      # another method on the same base")
    return run_dir


if __name__ == "__main__":
    cli.run(lambda: main(parse_args()))
