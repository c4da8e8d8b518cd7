"""Training: exact resume, torchrun DDP on CPU, clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT


def test_resume_is_bit_identical(toy_runs):
    """A run stopped at step 2 and resumed reaches the uninterrupted run's step-4 state bit for bit."""
    checkpoints = os.path.join(toy_runs["run_dir"], "checkpoints")
    uninterrupted = torch.load(os.path.join(checkpoints, "0000004.pt"), weights_only=True)
    train.main(train.parse_args(["--resume", os.path.join(checkpoints, "0000002.pt"), "--max-steps", "4"]))
    resumed = torch.load(os.path.join(checkpoints, "0000004.pt"), weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 4
    for key in ("model", "ema"):
        assert resumed[key].keys() == uninterrupted[key].keys()
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}/{name} differs after resume"
    for a, b in zip(resumed["opt"]["state"].values(), uninterrupted["opt"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_only_what_trained(toy_runs):
    checkpoint = torch.load(os.path.join(toy_runs["run_dir"], "checkpoints", "0000004.pt"), weights_only=True)
    assert checkpoint["method"] == "finediffusion" and checkpoint["base"]["path"] == os.path.abspath(toy_runs["base"])
    assert all(name.startswith("y_embedder.") or name.endswith(("bias", "weight")) and ".norm" in name
               or name.endswith(".bias") for name in checkpoint["model"])
    rows = checkpoint["model"]["y_embedder.embedding_table.weight"].shape[0]
    hierarchy = checkpoint["hierarchy"]
    assert rows == len(hierarchy["class_names"]) + len(hierarchy["superclass_names"])  # no null row


def test_torchrun_two_processes_stay_in_sync(toy_runs, tmp_path):
    """gloo DDP on CPU: both ranks end with identical weights and the log is written once."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\n"
        "from peft import trainable_state_dict\n"
        "model, run_dir = train.main(train.parse_args(sys.argv[1:]))\n"
        f"torch.save(trainable_state_dict(model), {str(tmp_path)!r} + f'/rank{{train.os.environ[\"RANK\"]}}.pt')\n"
        "print('RUN_DIR', run_dir)\n")
    args = toy_runs["common"][:] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                    "--max-steps", "2", "--results-dir", str(tmp_path / "results")]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker)] + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    base_table = torch.load(toy_runs["base"], weights_only=True)["ema"]["y_embedder.embedding_table.weight"]
    assert not torch.equal(rank0["y_embedder.embedding_table.weight"][: len(base_table)], base_table)
    log = open(next((tmp_path / "results").glob("*/log.txt"))).read()
    assert log.count("step 0000002") == 1 and "2 process(es)" in log


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "7"], None),  # one process: any batch size divides
    (["--method", "bitfit"], "give its --ckpt"),
    (["--vae", None], "--vae"),
])
def test_clear_errors(toy_runs, extra, message):
    args = toy_runs["common"] + ["--split", "source", "--method", "full", "--max-steps", "0"]
    if extra[-1] is None:
        args = [a for i, a in enumerate(args) if a != extra[0] and args[i - 1] != extra[0]]
    else:
        args += extra
    if message is None:
        train.main(train.parse_args(args))
        return
    with pytest.raises(SystemExit, match=message):
        train.main(train.parse_args(args))


def test_base_checkpoint_that_does_not_fit(toy_runs):
    args = toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                 "--model", "DiT-S/4", "--max-steps", "0"]
    with pytest.raises(SystemExit, match="not --model DiT-S/4"):
        train.main(train.parse_args(args))


def test_latent_training_from_the_cache(toy_runs, tmp_path):
    """--vae with --latent-cache: the data is encoded once, then each step samples the cached posterior."""
    import json
    from conftest import fixture
    from model import write_safetensors
    f = fixture("vae_tiny.pt")
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    write_safetensors(f["state_dict"], str(vae_dir / "diffusion_pytorch_model.safetensors"))
    (vae_dir / "config.json").write_text(json.dumps(dict(f["config"], scaling_factor=f["scaling_factor"])))
    args = [a if a != "none" else str(vae_dir) for a in toy_runs["common"]]
    args += ["--split", "source", "--method", "full", "--max-steps", "2", "--model", "DiT-T/2",
             "--latent-cache", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    model, run_dir = train.main(train.parse_args(args))
    assert model.in_channels == f["config"]["latent_channels"] and (tmp_path / "cache" / "latents.npy").exists()
    assert "step 0000002" in open(os.path.join(run_dir, "log.txt")).read()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(toy_runs, tmp_path):
    """A learning rate that blows the weights up: the run stops with a clear message before saving them."""
    args = toy_runs["common"] + ["--split", "source", "--method", "full", "--max-steps", "20", "--lr", "1e12",
                                 "--ckpt-every", "1", "--results-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        train.main(train.parse_args(args))
    log = open(next(tmp_path.glob("*/log.txt"))).read()
    assert "stopping before it reaches the weights" in log
    saved = sorted(tmp_path.glob("*/checkpoints/*.pt"))
    last = torch.load(saved[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
