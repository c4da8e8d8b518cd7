"""Every script's answer to bad input: one line (what is wrong, what is valid), a non-zero exit, no traceback and
nothing written. In-process for the table (fast), and through a real process for one case of each script."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import cli
import evaluate
import fullsize
import sample
import toy
import train
from conftest import ROOT

SCRIPTS = dict(train=lambda argv: train.main(train.parse_args(argv)), sample=lambda argv: sample.main(
    sample.parse_args(argv)), evaluate=evaluate.main, data=lambda argv: evaluate.main(["data", *argv]),
    bench=bench.main, fullsize=lambda argv: fullsize.main(fullsize.parse_args(argv)),
    toy=lambda argv: toy.main(toy.parse_args(argv)))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint")
    (root / "broken.json").write_text('{"class_names": [')
    (root / "list.json").write_text('[1, 2]')
    torch.save(torch.zeros(3), root / "tensor.pt")
    np.savez(root / "labels.npz", labels=np.zeros(4, dtype=np.int64))
    np.savez(root / "small.npz", arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8), labels=np.zeros(4, dtype=np.int64))
    (root / "truncated.npz").write_bytes((root / "small.npz").read_bytes()[:300])
    np.savez(root / "other8.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8), labels=np.zeros(2, dtype=np.int64),
             class_names=np.array(["a", "b"]))
    (root / "pngs").mkdir()
    Image.new("RGB", (8, 8)).save(root / "pngs" / "cat.png")
    evaluate.main(["judge", "--data", "toy", "--data-path", str(root / "toy"), "--image-size", "8", "--epochs", "1",
                   "--width", "4", "--num-workers", "0", "--out", str(root / "judge8.pt")])  # a toy set's, at 8 px
    return root


def cases(toy):
    """(script, argv, what the one line must say); toy: the toy runs' paths."""
    train_toy = toy["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy["base"]]
    latent = ["--data", "toy", "--method", "full", "--vae", "sd-vae", "--latent-cache"]
    return [
        ("sample", ["--n", "0"], ">= 1"), ("sample", ["--n", "-1"], ">= 1"),
        ("sample", ["--num-samples", "-3"], ">= 0"), ("sample", ["--batch-size", "0"], ">= 1"),
        ("sample", ["--cfg-scale", "nan"], "finite"), ("sample", ["--cfg-scale", "inf"], "finite"),
        ("sample", ["--num-sampling-steps", "0"], "2 to 1000"), ("sample", ["--num-sampling-steps", "-5"], "2 to 1000"),
        ("sample", ["--num-sampling-steps", "5000"], "2 to 1000"),
        ("sample", ["--sampler", "dpm++", "--num-sampling-steps", "1000"], "1 to 999"),
        ("sample", ["--sampler", "ddim", "--num-sampling-steps", "333"], "integer stride"),
        ("sample", ["--ckpt", "{bad}/empty.pt", "--class", "1"], "cannot be read as a checkpoint"),
        ("sample", ["--ckpt", "{bad}/text.pt", "--class", "1"], "cannot be read as a checkpoint"),
        ("sample", ["--ckpt", "{bad}/missing.pt", "--class", "1"], "no checkpoint file"),
        ("sample", ["--class", "1"], "no checkpoint under results/"),
        ("sample", ["--ckpt", toy["checkpoint"], "--num-samples", "4", "--class", "1"], "give one or the other"),
        ("sample", ["--ckpt", toy["checkpoint"], "--class", "1", "--out", "{bad}/text.pt/grid.png"], "a file, not a"),
        ("evaluate", ["tsne", "--checkpoint", toy["checkpoint"], "--out", "{bad}/text.pt/t.png"], "is a file, not a"),
        ("sample", ["--ckpt", toy["checkpoint"], "--hierarchy", "{bad}/broken.json", "--class", "1"],
         "broken.json is not valid JSON"),
        ("sample", ["--ckpt", toy["checkpoint"], "--class", "999"], "valid ids are 0.."),
        ("sample", ["--ckpt", toy["checkpoint"], "--class", "1", "--vae", "{bad}/novae"], "no VAE at"),
        ("train", ["--vae", "none", "--method", "full"], "no inat data path given"),
        ("train", ["--max-steps", "0"], ">= 1"), ("train", ["--max-steps", "-5"], ">= 1"),
        ("train", ["--global-batch-size", "0"], ">= 1"), ("train", ["--global-batch-size", "-8"], ">= 1"),
        ("train", ["--ckpt-every", "0"], ">= 1"), ("train", ["--log-every", "0"], ">= 1"),
        ("train", ["--lora-rank", "16"], "--lora-rank (lora): not an option of --method finediffusion, which has none"),
        ("train", ["--lora-rank", "0"], ">= 1"), ("train", ["--ema-decay", "2"], "<= 1.0"),
        ("train", ["--p-parent", "1.5"], "<= 1.0"), ("train", ["--lr", "-1"], "> 0.0"),
        ("train", ["--lr", "nan"], "> 0.0"),
        ("train", ["--num-workers", "-1"], ">= 0"), ("train", ["--image-size", "abc"], "not an integer"),
        ("train", ["--num-workers", "100000"], "it must be >= 0 and <= "), ("train", ["--seed", "-1"], ">= 0"),
        ("train", ["--seed", "99999999999999999999999"], "<= 4294967295"),
        ("sample", ["--seed", "99999999999999999999999"], "<= 4294967295"),
        ("data", ["--save-hierarchy", "{bad}/broken.json"], "broken.json exists and is not overwritten"),
        ("train", train_toy + ["--split", "nope"], "toy split 'nope'"),
        ("train", train_toy + ["--data-path", "{bad}/text.pt"], "is a file; the toy set is generated into a folder"),
        ("train", train_toy + ["--results-dir", "{bad}/text.pt"], "text.pt is a file, not a folder"),
        ("train", train_toy + ["--image-size", "18"], "do not split into the model's 4 px patches"),
        ("train", train_toy[:-2] + ["--ckpt", "{bad}/empty.pt"], "cannot be read as a checkpoint"),
        ("train", train_toy[:-2] + ["--ckpt", toy["checkpoint"], "--method", "lora"], "null label row from the base"),
        ("train", ["--resume", "{bad}/text.pt"], "cannot be read as a checkpoint"),
        ("train", ["--resume", toy["checkpoint"], "--max-steps", "3"], "at step 4 already"),
        ("train", ["--resume", toy["checkpoint"], "--method", "full"], "cannot change --method"),
        ("train", train_toy + ["--latent-cache", "{bad}/cache"], "with --vae none (pixel space) there are none"),
        ("train", latent + ["{bad}"], "holds other files and no"),
        ("train", latent + ["{bad}/text.pt"], "a file, not a folder"),
        ("evaluate", ["fid", "--samples", "x.npz", "--ref", "y.npz", "--batch-size", "0"], ">= 1"),
        ("evaluate", ["tsne", "--checkpoint", "{bad}/missing.pt"], "no checkpoint file"),
        ("evaluate", ["tsne", "--checkpoint", "{bad}/empty.pt"], "cannot be read as a checkpoint"),
        ("evaluate", ["tsne", "--checkpoint", toy["checkpoint"], "--perplexity", "0"], "> 0.0"),
        ("evaluate", ["tsne", "--checkpoint", toy["base"]], "superclass rows of a tiered table"),
        ("evaluate", ["table", "{bad}/broken.json"], "broken.json is not valid JSON"),
        ("evaluate", ["fid", "--samples", "{bad}/none.npz", "--ref", "{bad}", "--inception", "{bad}/empty.pt"],
         "none.npz: no such file or folder"),
        ("evaluate", ["lpips", "--samples", "{bad}/empty.pt", "--lpips-weights", "a", "b", "--results",
                      "{bad}/broken.json"], "broken.json is not valid JSON"),
        ("evaluate", ["fid", "--samples", "{bad}/empty.pt", "--ref", "{bad}", "--inception", "{bad}/none.pth"],
         "pytorch-fid"),
        ("data", ["--split", "nope"], "toy split 'nope'"), ("data", ["--image-size", "0"], ">= 8"),
        ("train", train_toy + ["--run-name", "a/b"], "must be one plain folder name"),
        ("train", ["--lr", "1e30"], "<= 1.0"), ("train", ["--image-size", "100000"], "<= 2048"),
        ("train", ["--method", "lora", "--lora-rank", "1000000000"], "<= 4096"),
        ("train", ["--global-batch-size", "1000000000"], "<= 65536"),
        ("train", train_toy + ["--method", "lora", "--lora-rank", "1000"], "a rank is at most the model's width"),
        ("train", train_toy + ["--num-heads", "3"], "attention heads, and 3 were asked for"),
        ("sample", ["--n", "1000000000"], "<= 256"), ("sample", ["--num-samples", "1000000000"], "<= 1000000"),
        ("sample", ["--ckpt", "{bad}/tensor.pt", "--class", "1"], "tensor.pt is not a DiT checkpoint: it holds a Tensor"),
        ("sample", ["--ckpt", toy["checkpoint"], "--hierarchy", "{bad}", "--class", "1"], "is a folder: a JSON file"),
        ("sample", ["--ckpt", toy["checkpoint"], "--list-classes", "zzzz"], "no class of"),
        ("sample", ["--ckpt", "toy-finediffuson", "--class", "1"], "no checkpoint file, run folder or run name"),
        ("evaluate", ["lpips", "--samples", "{bad}/labels.npz", "--lpips-weights", "a", "b"], "it has no arr_0"),
        ("evaluate", ["lpips", "--samples", "{bad}/truncated.npz", "--lpips-weights", "a", "b"], "not a readable .npz"),
        ("evaluate", ["lpips", "--samples", "{bad}/small.npz", "--lpips-weights", "a", "b"], "needs at least 32 px"),
        ("evaluate", ["fid", "--samples", "{bad}/small.npz", "--ref", "{bad}", "--results", "{bad}/list.json"],
         "no results object"),
        ("evaluate", ["fid", "--samples", "{bad}/small.npz", "--ref", "{bad}", "--results", "{bad}"], "is a folder"),
        ("evaluate", ["score", "--judge", "{bad}/text.pt", "--samples", "{bad}/small.npz"], "not a readable judge"),
        ("evaluate", ["score", "--judge", "{bad}/tensor.pt", "--samples", "{bad}/small.npz"], "no judge file of this"),
        ("evaluate", ["score", "--judge", "{bad}/judge8.pt", "--samples", "{bad}/small.npz"],
         "its images are 16x16 px, and the judge judges 8x8 px images: sample at --image-size 8"),
        ("evaluate", ["score", "--judge", "{bad}/judge8.pt", "--samples", "{bad}/other8.npz"],
         "give a judge of the data the model learned"),
        ("evaluate", ["score", "--judge", "{bad}/judge8.pt", "--samples", "{bad}/pngs"], "carry no class"),
        ("evaluate", ["score", "--judge", "{bad}/judge8.pt", "--samples", "{bad}/labels.npz"], "it has no arr_0"),
        ("evaluate", ["score", "--judge", "{bad}/judge8.pt", "--samples", "{bad}/none.npz"], "no such file"),
        ("evaluate", ["judge", "--epochs", "0", "--out", "j.pt"], ">= 1"),
        ("evaluate", ["judge", "--out", "{bad}/text.pt"], "exists and is not overwritten"),
        ("evaluate", ["judge", "--data", "toy", "--split", "nope", "--out", "j.pt"], "toy split 'nope'"),
        ("toy", ["--table", "--data", "toy"], "three ranks at least, and toy's classes have two"),
        ("toy", ["--quick"], "go with --table"), ("toy", ["--table", "--method", "lora"], "without --method"),
        ("toy", ["--table", "--samples-per-class", "1"], ">= 2"),
        ("fullsize", ["--images", "1"], ">= 2"), ("fullsize", ["--out", "{bad}/text.pt"], "exists and is not "),
        ("bench", ["--steps", "0"], ">= 1"), ("bench", ["--methods", "adapter"], "unknown ['adapter']"),
        ("bench", ["--image-size", "100"], "multiple of 16"), ("bench", ["--samplers", "euler"], "unknown ['euler']"),
    ]


def test_bad_arguments_get_one_line_and_write_nothing(toy_runs, bad_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where every default output would go
    for script, argv, message in cases(toy_runs):
        argv = [a.replace("{bad}", str(bad_files)) for a in argv]
        with pytest.raises(SystemExit) as stop:
            cli.run(lambda: SCRIPTS[script](argv))
        err = capsys.readouterr().err
        said = stop.value.code if isinstance(stop.value.code, str) else err.strip()
        assert stop.value.code not in (0, None), (script, argv)
        assert message in said and "\n" not in said and "Traceback" not in err, (script, argv, said, err)
        assert os.listdir(tmp_path) == [], (script, argv, os.listdir(tmp_path))


@pytest.mark.parametrize("script, argv", [("train.py", ["--lr", "nan"]), ("sample.py", ["--ckpt", "{bad}/empty.pt"]),
                                          ("evaluate.py", ["tsne", "--checkpoint", "{bad}/text.pt"])])
def test_a_real_process_prints_one_line(bad_files, tmp_path, script, argv):
    argv = [a.replace("{bad}", str(bad_files)) for a in argv]
    out = subprocess.run([sys.executable, os.path.join(ROOT, script)] + argv, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and not out.stdout, out.stderr
    assert os.listdir(tmp_path) == []


SCRIPT_FILES = ["train.py", "sample.py", "evaluate.py", "bench.py", "toy.py", "tests/fullsize.py"]


@pytest.mark.parametrize("script", SCRIPT_FILES)
def test_help_shows_every_default(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                         timeout=120)
    flags = out if script != "evaluate.py" else subprocess.run(  # its flags are its commands'
        [sys.executable, os.path.join(ROOT, script), "fid", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == flags.returncode == 0 and flags.stdout.count("(default: ") >= 2, flags.stdout
    description = out.stdout.split("\n\n", 1)[1].split("\noptions:")[0].split("\npositional arguments:")[0]
    assert f"python {script}" in description and not description.rstrip().endswith(":")  # examples kept whole


def test_under_torchrun_a_mistake_is_said_once(toy_runs, tmp_path):
    """Every rank meets the same bad flag (argparse) or setting (main): rank 0 alone says it, every rank exits
    non-zero, and no traceback of ours follows (torchrun's own report of failed workers does)."""
    toy = toy_runs["common"] + ["--split", "source", "--method", "full", "--results-dir", str(tmp_path / "results")]
    for script, argv, message in (
            ("train.py", ["--lr", "nan"], "--lr: nan is out of range"),
            ("train.py", toy + ["--global-batch-size", "3"], "--global-batch-size 3 is not divisible by 2 processes"),
            ("sample.py", ["--ckpt", toy_runs["checkpoint"], "--class", "1"], "a grid (--class) is one process's")):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, script)] + argv, capture_output=True, text=True, cwd=tmp_path,
                             timeout=300)
        assert out.returncode != 0 and out.stderr.count(message) == 1, out.stderr[-2000:]
        assert f"{script}\", line" not in out.stderr and os.listdir(tmp_path) == []


def test_durations_read_as_people_say_them():
    assert [cli.duration(s) for s in (40, 420, 5 * 3600 + 12 * 60, 86400 + 3 * 3600, 3 * 86400 + 4 * 3600)] == [
        "40 s", "7 min", "5 h 12 min", "1 day 3 h", "3 days 4 h"]


def test_given_flags_are_those_of_the_command_line():
    """`given` names what the command line set, not defaults, not even those a script sets (toy.py's settings)."""
    args = toy.parse_args(["--method", "lora", "--seed", "3"])
    assert args.given == ["method", "seed"] and (args.model, args.image_size, args.lr) == ("DiT-T/2", 16, 1e-2)
    assert train.parse_args([]).given == [] and train.parse_args(["--model", "DiT-T/2"]).given == ["model"]


WITHOUT_LINUX_ONLY = """
import builtins, os, runpy, sys
import torch  # (not ours: torch may read what it likes)
del os.sched_getaffinity  # absent on macOS and Windows
sys.modules["resource"] = None  # import resource: an ImportError, as on Windows

def without_proc(call):
    def guarded(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return call(path, *args, **kwargs)
    return guarded
builtins.open, os.path.exists, os.listdir, os.stat = map(without_proc, (open, os.path.exists, os.listdir, os.stat))
sys.argv, sys.path[0] = sys.argv[1:], os.path.dirname(sys.argv[1])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, argv", [(s, ["--help"]) for s in SCRIPT_FILES] + [("train.py", "toy")])
def test_no_linux_only_call(script, argv, tmp_path):
    """Every script answers --help, and trains on the toy set it draws, without os.sched_getaffinity, `resource`
    and /proc (as on macOS and Windows, or nodes whose process tables differ)."""
    if argv == "toy":
        argv = ["--data", "toy", "--data-path", str(tmp_path / "data"), "--model", "DiT-T/4", "--image-size", "16",
                "--vae", "none", "--method", "full", "--global-batch-size", "8", "--max-steps", "1",
                "--results-dir", str(tmp_path / "results")]
    out = subprocess.run([sys.executable, "-c", WITHOUT_LINUX_ONLY, os.path.join(ROOT, script), *argv],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--help" in argv or glob.glob(str(tmp_path / "results" / "*" / "checkpoints" / "0000001.pt"))
