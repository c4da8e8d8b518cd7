"""bench.py: Table 2 from peft's counts and the runs' metrics.jsonl, and a whole benchmark on a tiny config (it runs
and reports every method; speed itself is never asserted)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import bench
from diffusion import SAMPLER_STEPS
from checkpoint import METRICS_FILE, load_model
from model import DiT
from peft import METHODS, count_parameters, prepare


def write_metrics(run_dir, method, images_per_s):
    """A train.py run folder's metrics.jsonl: one JSON line per logged step."""
    run_dir.mkdir()
    lines = [json.dumps(dict(step=100 * (i + 1), loss=0.15, steps_per_s=v / 256, images_per_s=v, lr=1e-4,
                             method=method)) for i, v in enumerate(images_per_s)]
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n")


def test_table2_from_peft_and_run_metrics(tmp_path, capsys):
    full, fine = [40.0, 100.0, 104.0, 98.0], [60.0, 150.0, 158.0]  # the first interval includes start-up
    write_metrics(tmp_path / "000-full", "full", full)
    write_metrics(tmp_path / "001-finediffusion", "finediffusion", fine)
    runs = [str(tmp_path / "000-full"), str(tmp_path / "001-finediffusion")]
    assert bench.training_throughput(runs) == {"full": np.median(full), "finediffusion": np.median(fine)}
    bench.main(["--table", "--model", "DiT-XL/2", "--image-size", "256", "--runs", *runs])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) == set(METHODS) | {"Method"} and out.startswith("DiT-XL/2, 256 px in the SD VAE's latent space")
    assert rows["finediffusion"].startswith("| finediffusion | 685,640,480 | 12,153,632 | 1.77% |")  # the paper's
    assert rows["finediffusion"].endswith(f"| {np.median(fine):.1f} | {np.median(fine) / np.median(full):.2f}× |")
    assert rows["full"].endswith(f"| {np.median(full):.1f} | 1.00× |")
    assert rows["lora"].endswith("| – | – |")  # no run
    bench.main(["--table", "--model", "DiT-S/2", "--image-size", "64"])
    assert "Images/s" not in capsys.readouterr().out  # without runs: parameters only
    (tmp_path / "002-not-a-run").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=f"002-not-a-run is not a train.py run folder: it has no {METRICS_FILE}"):
        bench.training_throughput(runs + [str(tmp_path / "002-not-a-run")])


def test_table2_counts_the_model_a_run_trained(toy_runs, capsys):
    """A pixel-space run's row is count_parameters of the model it trained (3 channels at 16 px, its 10 classes),
    not of an assumed 4-channel latent DiT; runs of different models are refused."""
    bench.main(["--table", "--runs", toy_runs["run_dir"]])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| finediffusion |"))
    total, trainable = count_parameters(load_model(toy_runs["checkpoint"])[0])
    assert row.startswith(f"| finediffusion | {total:,} | {trainable:,} |") and not row.endswith("| – | – |")
    assert out.startswith("DiT-T/4, 3 input channels at 16 px, as --runs trained it, 10 classes in 4 superclasses")
    with pytest.raises((ValueError, FileNotFoundError), match="different models or classes"):  # the base: other classes
        bench.main(["--table", "--runs", toy_runs["run_dir"], os.path.dirname(os.path.dirname(toy_runs["base"]))])


def test_benchmark_on_a_tiny_config(capsys):
    bench.main(["--model", "DiT-T/8", "--image-size", "64", "--batch-size", "2", "--steps", "1", "--sample-steps", "2"])
    training, sampling, samplers = ([line.split(" | ")[:2] for line in part.splitlines() if line.startswith("| ")][1:]
                                    for part in capsys.readouterr().out.split("\n\n")[1:])
    assert [row[0][2:] for row in training] == list(METHODS)
    assert [row[0][2:] for row in sampling] == ["base"] + [m for m in METHODS if m != "full"]
    assert {row[0][2:]: int(row[1]) for row in samplers} == SAMPLER_STEPS  # model calls of each sampler


def test_peak_memory_where_the_platform_can_tell(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS; without the `resource` module (Windows) the peak is NaN, not a
    crash at import."""
    usage = type("Usage", (), {"ru_maxrss": 1000})()
    resource = type("Resource", (), {"RUSAGE_SELF": 0, "getrusage": staticmethod(lambda who: usage)})
    monkeypatch.setitem(sys.modules, "resource", resource)
    for platform, peak in (("linux", 1000 * 1024), ("darwin", 1000)):
        monkeypatch.setattr(sys, "platform", platform)
        assert bench.peak_memory(torch.device("cpu")) == peak
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource raises ImportError
    assert math.isnan(bench.peak_memory(torch.device("cpu")))


TINY = dict(depth=2, hidden_size=64, patch_size=2, num_heads=4, input_size=8, in_channels=4)


def test_counted_flops_are_the_layers_multiply_adds():
    """bench's count (torch's FLOP counter, on the meta device) of a tiny DiT equals 2 x the multiply-adds of its
    layers, tallied by hooks on a real forward: every Linear and Conv2d (L), and attention's two T x T products per
    block (A). Backward: full fine-tuning takes both gradients of every layer, but no input gradient for the two
    that read data (F: the patches, the timestep frequencies); FineDiffusion, whose weights are frozen, takes input
    gradients only (its biases' and norms' gradients are sums, not products)."""
    model, macs = DiT(**TINY).eval(), {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):  # one dot product over weight[0] per output
            module.register_forward_hook(lambda m, i, out, name=name: macs.update({name: out.numel() *
                                                                                         m.weight[0].numel()}))
    model(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    tokens = (TINY["input_size"] // TINY["patch_size"]) ** 2
    L, A = sum(macs.values()), TINY["depth"] * 2 * tokens * tokens * TINY["hidden_size"]
    F = macs["x_embedder.proj"] + macs["t_embedder.mlp.0"]
    full, fine = (bench.counted_work(TINY, method) for method in ("full", "finediffusion"))
    assert full["forward"] == fine["forward"] == 2 * (L + A)
    assert full["backward"] == 2 * (2 * L - F + 2 * A) and fine["backward"] == 2 * (L - F + 2 * A)
    total, trainable = count_parameters(prepare(DiT(**TINY), "finediffusion", bench.PARENTS))
    assert fine["trainable"] == trainable / total and fine["activations"] < full["activations"]
    assert fine["weights"] == 4 * total and fine["adamw"] == 2 * fine["ema"] == 2 * fine["gradients"] == 8 * trainable
    assert fine["copies"] > 0 and fine["activations"] > 0
