"""toy.py: the README's first run in one command, on a few steps: base, fine-tune, pictures, runs found by name."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import data
import sample
import toy
import train
from checkpoint import find_checkpoint, read_checkpoint
from peft import METHODS


def test_toy_is_one_command(toy_runs, tmp_path, monkeypatch, capsys):
    """toy.py on a few steps: pre-trains a base (for --base-steps), fine-tunes it, and leaves a grid of every
    target class and the t-SNE in the run folder; a second toy.py, with another method, reuses the finished base.
    Runs are found by name afterwards, whatever else results/ holds."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("results/000-something-else/checkpoints")  # another run, and a failed one, before ours
    common = ["--model", "DiT-T/4", "--max-steps", "4", "--base-steps", "8", "--data-path", str(toy_runs["root"] / "data")]
    run_dir = toy.main(toy.parse_args(common))
    base = os.path.join("results", "001-toy-base", "checkpoints", "0000008.pt")
    assert run_dir == os.path.join("results", "002-toy-finediffusion") and os.path.isfile(base)
    checkpoint = read_checkpoint(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    assert checkpoint.base["path"] == os.path.abspath(base) and checkpoint.settings["lr"] == 1e-2
    names = checkpoint.hierarchy["class_names"]
    layout = tmp_path / "layout.png"
    data.save_grid(np.zeros((len(names) * 18, 16, 16, 3), np.uint8), str(layout), cols=18, row_names=names,
                   titles=["training images", "fine guidance, w=4", "no guidance"])
    grid = Image.open(os.path.join(run_dir, "samples", "every-class.png"))
    assert grid.size == Image.open(layout).size and Image.open(os.path.join(run_dir, "tsne.png")).size == (1400, 1000)
    said = capsys.readouterr().out
    assert f"samples  {run_dir}/samples/every-class.png" in said and f"t-SNE    {run_dir}/tsne.png" in said
    with open(os.path.join("results", "001-toy-base", "log.txt")) as f:  # the cost, said once, early
        assert re.search(r"on this CPU: [\d.]+ images/s over steps 2-\d; the \d steps to go take about \d+ s",
                         f.read())

    other = toy.main(toy.parse_args(common + ["--method", "bitfit"]))
    assert sorted(os.listdir("results")) == ["000-something-else", "001-toy-base", "002-toy-finediffusion",
                                             "003-toy-bitfit"]
    assert "toy base: reusing" in capsys.readouterr().out
    assert os.listdir(other) and not os.path.exists(os.path.join(other, "tsne.png"))  # no superclass rows to show
    train.main(train.parse_args(["--resume", "toy-bitfit", "--max-steps", "5"]))  # by name: the newest such run
    assert read_checkpoint(find_checkpoint("toy-bitfit")).step == 5 and len(os.listdir("results")) == 4
    assert sample.main(sample.parse_args(["--ckpt", "toy-finediffusion", "--class", "disc_e", "--n", "2",
                                          "--sampler", "dpm++"])) == os.path.abspath(os.path.join(run_dir, "samples", "00004-fine.png"))


def test_table_1_in_miniature_runs_to_the_end(taxa, tmp_path, monkeypatch, capsys):
    """toy.py --table at its smallest: one base, every method at two seeds, sampled, judged (the judge of conftest,
    reused), then the markdown table, the figure of samples beside real images, and the accuracy bars."""
    monkeypatch.chdir(tmp_path)
    judged = os.stat(taxa["judge"]).st_mtime_ns, os.stat(taxa["source_judge"]).st_mtime_ns
    folder = toy.main(toy.parse_args(["--table", "--quick", "--max-steps", "2", "--base-steps", "4", "--samples-per-class", "2",
                                      "--model", "DiT-T/8", "--data-path", str(taxa["root"])]))
    assert folder == os.path.join("results", "000-toy-table") and judged == (
        os.stat(taxa["judge"]).st_mtime_ns, os.stat(taxa["source_judge"]).st_mtime_ns)
    runs = [f"toy-{method}-seed{seed}" for method in METHODS for seed in toy.TABLE_SEEDS]
    assert sorted(os.listdir("results")) == ["000-toy-table", "001-toy-base"] + [
        f"{n:03d}-{run}" for n, run in enumerate(runs, 2)]
    table = open(os.path.join(folder, "table.md")).read().splitlines()
    assert table[0].startswith("| method | trains | train img/s | fine acc.↑ | genus acc.↑ | superclass acc.↑ |")
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert list(rows) == list(METHODS) + ["base, on its source species", "real images (held out)", "chance"]
    ceiling = json.loads(open(os.path.join(folder, "scores", "base-source.json")).read())["judge"]
    assert rows["base, on its source species"][2:5] == [f"{v:.3f}" for v in ceiling["accuracy"].values()]
    assert ceiling["chance"]["fine"] == pytest.approx(1 / 96)  # judged against the 96 source species
    percent = {method: float(cells[0].rstrip("%")) for method, cells in list(rows.items())[:len(METHODS)]}
    assert percent["finediffusion"] < percent["lora"] < percent["diffscaler"] < percent["full"]
    assert rows["chance"][2:5] == [f"{1 / 120:.3f}", f"{1 / 20:.3f}", f"{1 / 5:.3f}"]
    for method in METHODS:  # every cell a mean and a spread over the two seeds, accuracies in [0, 1]
        assert all(" ± " in cell for cell in rows[method][1:])
        assert all(0 <= float(cell.split(" ± ")[0]) <= 1 for cell in rows[method][2:5])
        scores = json.loads(open(os.path.join(folder, "scores", f"{method}-seed1.json")).read())["judge"]
        assert list(scores["accuracy"]) == ["fine", "genus", "superclass"] and scores["diversity"] > 0
    assert np.load(os.path.join(folder, "samples", "finediffusion-seed0.npz"))["arr_0"].shape == (240, 32, 32, 3)
    layout = tmp_path / "layout.png"
    data.save_grid(np.zeros((8 * (1 + len(METHODS)), 32, 32, 3), np.uint8), str(layout), cols=8,
                   row_names=["real"] + [f"{method} (seed 0)" for method in METHODS])
    assert Image.open(os.path.join(folder, "table.png")).size == Image.open(layout).size
    assert Image.open(os.path.join(folder, "accuracy.png")).size[1] > 30 * len(METHODS)
    said = capsys.readouterr().out
    assert f"table: run {len(runs)} of {len(runs)} ({list(METHODS)[-1]}, seed {toy.TABLE_SEEDS[-1]})" in said
    assert "to go" in said and "judge: reusing" in said
