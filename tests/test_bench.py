"""bench.py: Table 2 from peft's counts and the runs' metrics.jsonl, and a whole benchmark on a tiny config (it runs
and reports every method; speed itself is never asserted)."""
import json

import numpy as np

import bench
from diffusion import SAMPLER_STEPS
from peft import METHODS


def write_metrics(run_dir, method, images_per_s):
    """A train.py run folder's metrics.jsonl: one JSON line per logged step."""
    run_dir.mkdir()
    lines = [json.dumps(dict(step=100 * (i + 1), loss=0.15, steps_per_s=v / 256, images_per_s=v, lr=1e-4,
                             method=method)) for i, v in enumerate(images_per_s)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_table2_from_peft_and_run_metrics(tmp_path, capsys):
    full, fine = [40.0, 100.0, 104.0, 98.0], [60.0, 150.0, 158.0]  # the first interval includes start-up
    write_metrics(tmp_path / "000-full", "full", full)
    write_metrics(tmp_path / "001-finediffusion", "finediffusion", fine)
    runs = [str(tmp_path / "000-full"), str(tmp_path / "001-finediffusion")]
    assert bench.training_throughput(runs) == {"full": np.median(full), "finediffusion": np.median(fine)}
    bench.main(["--table", "--model", "DiT-XL/2", "--image-size", "256", "--runs", *runs])
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(METHODS)
    assert rows["finediffusion"].startswith("| finediffusion | 685,640,480 | 12,153,632 | 1.77% |")  # the paper's
    assert rows["finediffusion"].endswith(f"| {np.median(fine):.1f} | {np.median(fine) / np.median(full):.2f}× |")
    assert rows["full"].endswith(f"| {np.median(full):.1f} | 1.00× |")
    assert rows["lora"].endswith("| – | – |")  # no run
    bench.main(["--table", "--model", "DiT-S/2", "--image-size", "64"])
    assert "Images/s" not in capsys.readouterr().out  # without runs: parameters only


def test_table2_reads_a_real_run(toy_runs, capsys):
    bench.main(["--table", "--runs", toy_runs["run_dir"]])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| finediffusion |"))
    assert not row.endswith("| – | – |")


def test_benchmark_on_a_tiny_config(capsys):
    bench.main(["--model", "DiT-T/8", "--image-size", "64", "--batch-size", "2", "--steps", "1", "--sample-steps", "2"])
    training, sampling, samplers = ([line.split(" | ")[:2] for line in part.splitlines() if line.startswith("| ")][1:]
                                    for part in capsys.readouterr().out.split("\n\n")[1:])
    assert [row[0][2:] for row in training] == list(METHODS)
    assert [row[0][2:] for row in sampling] == ["base"] + [m for m in METHODS if m != "full"]
    assert {row[0][2:]: int(row[1]) for row in samplers} == SAMPLER_STEPS  # model calls of each sampler
