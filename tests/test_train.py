"""Training: exact resume, torchrun DDP on CPU, precision and checkpointing, bases of any shape, clear errors."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import ROOT, fixture, write_tiny_vae
from model import DiT
from checkpoint import METRICS_FILE, find_checkpoint, load_model, read_checkpoint, read_metrics
from peft import trainable_state_dict


def toy_args(toy_runs, tmp_path, *extra, base=None):
    """The toy fine-tuning run's flags (on the toy base, or `base`), writing into this test's own results folder."""
    return train.parse_args(toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--results-dir",
                                                  str(tmp_path), "--ckpt", str(base or toy_runs["base"]), *extra])


def test_resume_is_bit_identical(toy_runs, tmp_path):
    """A run stopped at step 2 and resumed reaches the uninterrupted run's step-4 state bit for bit."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    uninterrupted = read_checkpoint(toy_runs["checkpoint"])
    os.remove(run_dir / "checkpoints" / "0000004.pt")
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000002.pt"), "--max-steps", "4"]))
    resumed = read_checkpoint(str(run_dir / "checkpoints" / "0000004.pt"))
    assert resumed.step == uninterrupted.step == 4
    for name in ("model", "ema"):
        ours, theirs = getattr(resumed, name), getattr(uninterrupted, name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), f"{name} differs after resume"
    for a, b in zip(resumed.optimizer["state"].values(), uninterrupted.optimizer["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_fused_ema_is_the_per_tensor_loop_bit_for_bit():
    """train.update_ema (one _foreach_lerp_ over the trained tensors) equals lerp_ on each, in float32 from bf16 and
    float32 weights of odd sizes alike."""
    generator = torch.Generator().manual_seed(0)
    trained = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in
               (((7, 3), torch.float32), ((1001,), torch.bfloat16), ((4, 5, 6), torch.float32), ((1,), torch.float32))]
    averaged = [torch.randn(p.shape, generator=generator) for p in trained]
    loop = [a.clone() for a in averaged]
    for decay in (0.1, 0.9999):
        train.update_ema(averaged, trained, decay)
        for a, p in zip(loop, trained):
            a.lerp_(p.float(), 1 - decay)
    assert all(torch.equal(a, b) for a, b in zip(averaged, loop))


def test_checkpoint_holds_exactly_what_trained(toy_runs):
    """The delta's tensors are the prepared model's trainable ones, and its label table has no null row."""
    checkpoint = read_checkpoint(toy_runs["checkpoint"])
    model, _ = load_model(toy_runs["checkpoint"])
    assert checkpoint.method == "finediffusion" and checkpoint.base["path"] == os.path.abspath(toy_runs["base"])
    assert set(checkpoint.model) == set(checkpoint.ema) == set(trainable_state_dict(model))
    rows = model.y_embedder.embedding_table.num_embeddings
    assert rows == len(checkpoint.hierarchy["class_names"]) + len(checkpoint.hierarchy["superclass_names"])
    assert [m["step"] for m in read_metrics(toy_runs["run_dir"])] == [1, 2, 3, 4]


def test_torchrun_two_processes_stay_in_sync(toy_runs, tmp_path):
    """gloo DDP on CPU: both ranks end with identical weights and the log is written once."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\n"
        "from peft import trainable_state_dict\n"
        "model, run_dir = train.main(train.parse_args(sys.argv[1:]))\n"
        f"torch.save(trainable_state_dict(model), {str(tmp_path)!r} + f'/rank{{train.os.environ[\"RANK\"]}}.pt')\n")
    args = toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                 "--max-steps", "2", "--results-dir", str(tmp_path / "results")]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker)] + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    base_bias = read_checkpoint(toy_runs["base"]).ema["blocks.0.attn.qkv.bias"]
    assert not torch.equal(rank0["blocks.0.attn.qkv.bias"], base_bias)  # it trained
    log = open(next((tmp_path / "results").glob("*/log.txt"))).read()
    assert log.count("step 0000002") == 1 and "2 process(es)" in log


def test_sigterm_to_torchrun_saves_and_names_the_torchrun_command(toy_runs, tmp_path):
    """A scheduler's SIGTERM to torchrun reaches both ranks: they finish the step, save one checkpoint, and the log
    says how to continue, with the torchrun command the run was launched with."""
    args = toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                 "--max-steps", "100000", "--ckpt-every", "100000", "--results-dir", str(tmp_path)]
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "000-DiT-T-4-finediffusion" / METRICS_FILE
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        assert run.poll() is None, run.stderr.read()[-2000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    saved = os.listdir(metrics_file.parent / "checkpoints")
    hint = f"continue with: torchrun --nproc_per_node=2 train.py --resume {metrics_file.parent / 'checkpoints'}/"
    assert len(saved) == 1 and hint + saved[0] in (metrics_file.parent / "log.txt").read_text()


def test_resume_on_another_world_size(toy_runs, tmp_path):
    """A one-process checkpoint continues on two processes: fresh random streams, said in the log."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    os.remove(run_dir / "checkpoints" / "0000004.pt")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--resume", str(run_dir / "checkpoints" / "0000002.pt"), "--max-steps", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming on 2 processes, not 1" in (run_dir / "log.txt").read_text()
    resumed = read_checkpoint(str(run_dir / "checkpoints" / "0000004.pt"))
    assert resumed.step == 4 and len(resumed.rng) == 2
    assert all(torch.isfinite(v).all() for v in resumed.ema.values())


@pytest.mark.parametrize("extra, message", [
    (["--method", "bitfit"], "give its --ckpt"),
    (["--vae", None], "--vae"),
    (["--global-batch-size", "1000"], "cannot fill one batch"),
])
def test_clear_errors(toy_runs, tmp_path, extra, message):
    args = toy_runs["common"] + ["--split", "source", "--method", "full", "--max-steps", "1",
                                 "--results-dir", str(tmp_path)]
    if extra[-1] is None:
        args = [a for i, a in enumerate(args) if a != extra[0] and args[i - 1] != extra[0]]
    else:
        args += extra
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.main(train.parse_args(args))


def test_any_batch_size_on_one_process(toy_runs, tmp_path):
    _, run_dir = train.main(train.parse_args(toy_runs["common"] + [
        "--split", "source", "--method", "full", "--max-steps", "1", "--global-batch-size", "7",
        "--results-dir", str(tmp_path)]))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "0000001.pt"))


def test_base_checkpoint_that_does_not_fit(toy_runs, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="not --model DiT-S/4"):
        train.main(toy_args(toy_runs, tmp_path, "--model", "DiT-S/4", "--max-steps", "1"))


def test_a_base_of_any_shape_fine_tunes_with_ckpt_alone(toy_runs, tmp_path):
    """A DiT trained elsewhere with a shape no named configuration has (depth 6, width 256, patch 4): --ckpt alone."""
    other = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=256, depth=6, num_heads=4, num_classes=5)
    torch.save(other.state_dict(), tmp_path / "fast-dit.pt")
    args = [a for a in toy_runs["common"] if a not in ("--model", "DiT-T/4")]
    model, run_dir = train.main(train.parse_args(args + [
        "--split", "target", "--method", "finediffusion", "--ckpt", str(tmp_path / "fast-dit.pt"),
        "--max-steps", "1", "--results-dir", str(tmp_path / "results")]))
    checkpoint = read_checkpoint(os.path.join(run_dir, "checkpoints", "0000001.pt"))
    assert {k: checkpoint.dit[k] for k in ("depth", "hidden_size", "patch_size", "num_heads")} == dict(
        depth=6, hidden_size=256, patch_size=4, num_heads=4)
    assert os.path.basename(run_dir) == "000-DiT-6x256-finediffusion"


def test_difffit_positional_trick_through_train(toy_runs, tmp_path):
    """Fine-tuning at twice the base's size: positions (i/2, j/2), recorded so that sampling rebuilds it."""
    _, run_dir = train.main(toy_args(toy_runs, tmp_path, "--image-size", "32", "--max-steps", "1"))
    model, checkpoint = load_model(os.path.join(run_dir, "checkpoints", "0000001.pt"))
    base, _ = load_model(toy_runs["base"])
    assert checkpoint.dit["input_size"] == 32 and checkpoint.dit["pos_embed_scale"] == 0.5
    grid = 32 // model.patch_size
    every_other = model.pos_embed.reshape(grid, grid, -1)[::2, ::2].reshape(base.pos_embed.shape)
    assert torch.equal(every_other, base.pos_embed)


def test_bf16_on_cpu_is_close_to_fp32(toy_runs, tmp_path):
    """Autocast runs on the CPU too: the first step's loss (same weights, data and noise) within 2%."""
    losses = {}
    for precision in ("fp32", "bf16"):
        _, run_dir = train.main(toy_args(toy_runs, tmp_path / precision, "--precision", precision, "--max-steps", "1"))
        losses[precision] = read_metrics(run_dir)[0]["loss"]
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * losses["fp32"]


def test_compile_trains_as_eager_and_resumes(toy_runs, tmp_path):
    """--compile with FineDiffusion: the losses of 2 steps equal eager's within 1e-4 (inductor fuses and reorders
    float32 arithmetic: equal up to rounding; its random ops fall back to eager's, so the same labels are dropped),
    and a compiled run resumed compiled goes on from its checkpoint. The
    compiled graph is the network alone: the EMA, the non-finite guard and the checkpoints run eagerly around it, so
    they cause no graph breaks."""
    losses = {}
    for mode in ("eager", "compile"):
        _, run_dir = train.main(toy_args(toy_runs, tmp_path / mode, "--max-steps", "2", "--ckpt-every", "2",
                                         *(["--compile"] if mode == "compile" else [])))
        losses[mode] = [record["loss"] for record in read_metrics(run_dir)]
    torch.testing.assert_close(losses["compile"], losses["eager"], rtol=1e-4, atol=0)
    train.main(train.parse_args(["--resume", run_dir, "--max-steps", "3"]))
    resumed = read_checkpoint(find_checkpoint(run_dir))
    assert resumed.step == 3 and resumed.settings["compile"]
    assert all(torch.isfinite(v).all() for v in resumed.ema.values())
    model = load_model(find_checkpoint(run_dir), merged=False)[0].train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 1]))
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_grad_checkpointing_gives_the_same_gradients(toy_runs):
    model, _ = load_model(toy_runs["checkpoint"])
    model.train()
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 1, 2, 3])
    grads = {}
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)  # the same label dropout in both passes
        model(x, t, y).square().mean().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7)


def test_latent_training_from_the_cache(toy_runs, tmp_path):
    """--vae with --latent-cache: the data is encoded once, then each step samples the cached posterior."""
    f = fixture("vae_tiny.pt")
    vae_dir = write_tiny_vae(tmp_path / "vae")
    args = [a if a != "none" else vae_dir for a in toy_runs["common"]]
    args += ["--split", "source", "--method", "full", "--max-steps", "2", "--model", "DiT-T/2",
             "--latent-cache", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    model, run_dir = train.main(train.parse_args(args))
    assert model.in_channels == f["config"]["latent_channels"] and (tmp_path / "cache" / "latents.npy").exists()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    with pytest.raises((ValueError, FileNotFoundError), match="stale: it was built from a different hflip"):  # the other flip setting
        train.main(train.parse_args(args + ["--no-hflip"]))


def test_no_hflip_sees_each_image_once(toy_runs, tmp_path):
    """--no-hflip: one item per image in the dataset and in the latent cache, and the checkpoint says so."""
    toy_set = data.make_toy_dataset(str(toy_runs["root"] / "data"), image_size=16)  # made already: found
    images = len(glob.glob(os.path.join(toy_set, "target", "*", "*", "*.png")))
    _, run_dir = train.main(toy_args(toy_runs, tmp_path / "pixels", "--no-hflip", "--max-steps", "1"))
    assert read_checkpoint(find_checkpoint(run_dir)).data["hflip"] is False
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert f"{images:,} training items (no mirrors)" in f.read()
    args = [a if a != "none" else write_tiny_vae(tmp_path / "vae") for a in toy_runs["common"]]
    train.main(train.parse_args(args + ["--split", "target", "--method", "full", "--max-steps", "1", "--no-hflip",
                                        "--latent-cache", str(tmp_path / "cache"), "--results-dir",
                                        str(tmp_path / "latent")]))
    assert np.load(tmp_path / "cache" / "latents.npy", mmap_mode="r").shape[0] == images


def test_divergence_stops_before_a_checkpoint_and_names_the_last_good_one(toy_runs, tmp_path, monkeypatch):
    """A weight beyond the bound after a step (the bound lowered below the LayerNorm scales of 1, so the first step
    crosses it): the run stops before saving it and names the checkpoint to go back to, which is finite."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    monkeypatch.setattr(train, "MAX_WEIGHT", 0.5)
    with pytest.raises(SystemExit) as stop:
        train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000004.pt"), "--max-steps", "10",
                                     "--ckpt-every", "1"]))
    assert stop.value.code == 1
    last = str(run_dir / "checkpoints" / "0000004.pt")
    assert f"The last good checkpoint is {last}" in (run_dir / "log.txt").read_text()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000002.pt", "0000004.pt"]
    assert all(torch.isfinite(v).all() for v in read_checkpoint(last).model.values())


def test_resume_changes_what_is_safe_and_refuses_the_rest(toy_runs, tmp_path):
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    start = str(run_dir / "checkpoints" / "0000004.pt")
    with pytest.raises((ValueError, FileNotFoundError), match="cannot change --method, --seed"):
        train.main(train.parse_args(["--resume", start, "--method", "bitfit", "--seed", "3"]))
    train.main(train.parse_args(["--resume", start, "--lr", "5e-3", "--max-steps", "5"]))
    assert "changed on resume: --lr None -> 0.005, --max-steps 4 -> 5" in (run_dir / "log.txt").read_text()
    assert read_checkpoint(str(run_dir / "checkpoints" / "0000005.pt")).optimizer["param_groups"][0]["lr"] == 5e-3
    assert read_metrics(run_dir)[-1] == dict(read_metrics(run_dir)[-1], step=5, lr=5e-3)


def test_resume_follows_a_moved_base(toy_runs, tmp_path):
    """A base that moved: the resume says how to point at it, and takes it with --ckpt (checked by fingerprint)."""
    base = shutil.copy(toy_runs["base"], tmp_path / "base.pt")
    _, run_dir = train.main(toy_args(toy_runs, tmp_path / "results", "--max-steps", "1", base=base))
    moved = shutil.move(base, tmp_path / "moved.pt")
    start = os.path.join(run_dir, "checkpoints", "0000001.pt")
    with pytest.raises((ValueError, FileNotFoundError), match="train.py --resume with --ckpt"):
        train.main(train.parse_args(["--resume", start, "--max-steps", "2"]))
    train.main(train.parse_args(["--resume", start, "--max-steps", "2", "--ckpt", str(moved)]))
    assert read_checkpoint(os.path.join(run_dir, "checkpoints", "0000002.pt")).step == 2


def test_resume_follows_moved_data_and_refuses_other_classes(tmp_path):
    """Data that moved: --resume with --data-path at its new place goes on bit for bit as if it had not; data whose
    classes changed is refused before any step (the label table's rows are the run's classes)."""
    images, rng = tmp_path / "images", np.random.default_rng(0)
    for superclass, name in (("a", "a0"), ("a", "a1"), ("b", "b0")):
        (images / superclass / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / superclass / name / f"{i}.png")
    common = ["--data", "folder", "--data-path", str(images), "--method", "full", "--model", "DiT-T/4", "--image-size",
              "16", "--vae", "none", "--global-batch-size", "4", "--num-workers", "0", "--ckpt-every", "2"]
    _, whole = train.main(train.parse_args(common + ["--max-steps", "4", "--results-dir", str(tmp_path / "whole")]))
    _, run_dir = train.main(train.parse_args(common + ["--max-steps", "2", "--results-dir", str(tmp_path / "run")]))
    moved = shutil.move(images, tmp_path / "moved")
    with pytest.raises((ValueError, FileNotFoundError), match="is not a folder"):
        train.main(train.parse_args(["--resume", run_dir, "--max-steps", "4"]))
    train.main(train.parse_args(["--resume", run_dir, "--max-steps", "4", "--data-path", str(moved)]))
    resumed, uninterrupted = (read_checkpoint(os.path.join(r, "checkpoints", "0000004.pt")) for r in (run_dir, whole))
    assert all(torch.equal(resumed.ema[k], uninterrupted.ema[k]) for k in uninterrupted.ema)
    shutil.copytree(moved / "b" / "b0", moved / "b" / "b1")
    with pytest.raises((ValueError, FileNotFoundError), match="now has 4 classes in 2 superclasses, where the run trained on 3 in 2"):
        train.main(train.parse_args(["--resume", run_dir, "--max-steps", "6"]))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000002.pt", "0000004.pt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_the_resume_is_bit_identical(toy_runs, tmp_path, signum):
    """SIGTERM (a scheduler preempting) or SIGINT (Ctrl-C) mid-run: the step finishes, a checkpoint is written, the
    process exits non-zero, and resuming from that checkpoint gives an uninterrupted run's weights bit for bit."""
    args = toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                 "--max-steps", "100000", "--ckpt-every", "100000"]
    run = subprocess.Popen([sys.executable, "train.py", *args, "--results-dir", str(tmp_path / "stopped")], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "stopped" / "000-DiT-T-4-finediffusion" / METRICS_FILE
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
        assert run.poll() is None, run.stderr.read()[-2000:]
        time.sleep(0.05)
    run.send_signal(signum)
    assert run.wait(timeout=120) == 128 + signum
    run_dir = metrics_file.parent
    saved = os.listdir(run_dir / "checkpoints")
    assert len(saved) == 1 and "continue with: python train.py --resume" in (run_dir / "log.txt").read_text()
    step = read_checkpoint(str(run_dir / "checkpoints" / saved[0])).step
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / saved[0]), "--max-steps", str(step + 2)]))
    resumed = read_checkpoint(str(run_dir / "checkpoints" / f"{step + 2:07d}.pt"))
    _, reference_dir = train.main(train.parse_args(args[:-4] + ["--max-steps", str(step + 2),
                                                                "--results-dir", str(tmp_path / "reference")]))
    reference = read_checkpoint(os.path.join(reference_dir, "checkpoints", f"{step + 2:07d}.pt"))
    assert all(torch.equal(resumed.ema[k], v) for k, v in reference.ema.items())
    assert all(torch.equal(resumed.model[k], v) for k, v in reference.model.items())


def test_two_resumes_of_one_run_the_second_is_refused(toy_runs, tmp_path):
    """A run being continued by one process (here in the background) is refused to a second --resume at once, in one
    line naming the first, before any data is read and with nothing written; the first goes on, unaffected, until a
    signal stops it with a checkpoint; its lock, freed by the OS as it exits, is then taken by the next resume."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    first = subprocess.Popen([sys.executable, "train.py", "--resume", str(run_dir), "--max-steps", "100000",
                              "--ckpt-every", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    logged = len(read_metrics(run_dir))
    while len(read_metrics(run_dir)) < logged + 2:  # it holds the run and trains on
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.05)
    before = sorted(os.listdir(run_dir / "checkpoints")), sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=f"the run {run_dir} is in use by process {first.pid} on .* wait for that"):
        train.main(train.parse_args(["--resume", str(run_dir), "--max-steps", "100"]))
    assert (sorted(os.listdir(run_dir / "checkpoints")), sorted(os.listdir(tmp_path))) == before
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM
    stopped = read_checkpoint(find_checkpoint(str(run_dir))).step
    assert stopped > 4 and not (run_dir / "lock").exists()
    train.main(train.parse_args(["--resume", str(run_dir), "--max-steps", str(stopped + 1)]))
    assert read_checkpoint(find_checkpoint(str(run_dir))).step == stopped + 1


def test_short_runs_are_safe_by_default(toy_runs, tmp_path):
    """A checkpoint every --ckpt-minutes as well as every --ckpt-every steps (here at every step); the EMA warm-up:
    after one step at decay 0.9999 it has moved 0.9 of the way (decay (1 + 0) / (10 + 0)), with --no-ema-warmup
    1e-4 of it, from the same start to the same trained weights."""
    _, timed = train.main(toy_args(toy_runs, tmp_path / "timed", "--max-steps", "3", "--ckpt-every", "100",
                                   "--ckpt-minutes", "1e-9"))
    assert sorted(os.listdir(os.path.join(timed, "checkpoints"))) == ["0000001.pt", "0000002.pt", "0000003.pt"]
    runs = [read_checkpoint(find_checkpoint(train.main(toy_args(toy_runs, tmp_path / flag, "--max-steps", "1",
                                                                "--ema-decay", "0.9999", flag))[1]))
            for flag in ("--ema-warmup", "--no-ema-warmup")]
    for name, raw in runs[0].model.items():
        assert torch.equal(raw, runs[1].model[name])
        warm, constant = runs[0].ema[name].double(), runs[1].ema[name].double()
        # constant = start + 1e-4 (raw - start), warm = start + 0.9 (raw - start)
        torch.testing.assert_close(warm - constant, (0.9 - 1e-4) / (1 - 1e-4) * (raw.double() - constant),
                                   rtol=1e-5, atol=1e-7)


def test_a_full_disk_mid_run_loses_nothing(toy_runs, tmp_path, monkeypatch):
    """The step-4 checkpoint meets a full disk part-way (torch's short-write error): one OSError saying what it
    needed, no temporary left, the step-2 checkpoint intact and the run's lock freed; once there is space, the resume
    from step 2 reaches the uninterrupted run's step-4 weights bit for bit."""
    real_save = torch.save

    def full_disk_at_step_4(contents, f):  # f: the open temporary (checkpoint.write_atomically)
        if f.name.endswith("0000004.pt.tmp"):
            f.write(bytes(1000))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 0")
        return real_save(contents, f)
    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    with pytest.raises(OSError, match="could not write .*0000004.pt .* earlier checkpoints are untouched"):
        train.main(toy_args(toy_runs, tmp_path, "--max-steps", "4", "--ckpt-every", "2"))
    monkeypatch.undo()
    run_dir = tmp_path / "000-DiT-T-4-finediffusion"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000002.pt"] and not (run_dir / "lock").exists()
    train.main(train.parse_args(["--resume", str(run_dir), "--max-steps", "4"]))
    resumed, uninterrupted = (read_checkpoint(p) for p in (find_checkpoint(str(run_dir)), toy_runs["checkpoint"]))
    assert resumed.step == 4 and all(torch.equal(resumed.model[k], v) for k, v in uninterrupted.model.items())
    assert all(torch.equal(resumed.ema[k], v) for k, v in uninterrupted.ema.items())


def test_a_set_of_unreadable_images_is_refused_before_a_run_folder(tmp_path):
    for name in ("a0", "a1"):
        (tmp_path / "images" / "a" / name).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "images" / "a" / name / f"{i}.png").write_text("not an image")
    with pytest.raises(ValueError, match="no image under .* can be read"):
        train.main(train.parse_args(["--data", "folder", "--data-path", str(tmp_path / "images"), "--vae", "none",
                                     "--model", "DiT-T/4", "--image-size", "16", "--method", "full",
                                     "--global-batch-size", "4", "--num-workers", "0",
                                     "--results-dir", str(tmp_path / "results")]))
    assert not (tmp_path / "results").exists()


# ---- Nothing a user made is overwritten: run folders, resumes that branch, stale temporaries ----

def test_a_new_run_never_reuses_a_folder(toy_runs, tmp_path):
    """Numbers go on above the highest one there: with 000 deleted, the next run is 002, and 001 is untouched."""
    for name in ("000-DiT-T-4-full", "001-DiT-T-4-full"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "0000001.pt").write_text(name)
    shutil.rmtree(tmp_path / "000-DiT-T-4-full")
    _, run_dir = train.main(toy_args(toy_runs, tmp_path, "--max-steps", "1"))
    assert os.path.basename(run_dir) == "002-DiT-T-4-finediffusion"
    assert (tmp_path / "001-DiT-T-4-full" / "checkpoints" / "0000001.pt").read_text() == "001-DiT-T-4-full"


def test_two_runs_started_together_get_their_own_folders(toy_runs, tmp_path):
    args = toy_runs["common"] + ["--split", "target", "--method", "finediffusion", "--ckpt", toy_runs["base"],
                                 "--max-steps", "2", "--results-dir", str(tmp_path)]
    runs = [subprocess.Popen([sys.executable, "train.py"] + args, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(run.wait(timeout=300) == 0 for run in runs), [run.stderr.read()[-2000:] for run in runs]
    folders = sorted(os.listdir(tmp_path))
    assert folders == ["000-DiT-T-4-finediffusion", "001-DiT-T-4-finediffusion"]
    for folder in folders:
        assert (tmp_path / folder / "log.txt").read_text().count("step 0000002") == 1
        assert sorted(os.listdir(tmp_path / folder / "checkpoints")) == ["0000002.pt"]


def test_resume_from_an_earlier_or_copied_checkpoint_branches(toy_runs, tmp_path):
    """From a checkpoint that is not its run's newest, or one copied out of its run: a new folder; the old run's
    checkpoints stay byte for byte."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "results" / "000-run")
    newest = (run_dir / "checkpoints" / "0000004.pt").read_bytes()
    shutil.copy(run_dir / "checkpoints" / "0000002.pt", tmp_path / "copied.pt")
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000002.pt"), "--max-steps", "3"]))
    train.main(train.parse_args(["--resume", str(tmp_path / "copied.pt"), "--max-steps", "3",
                                 "--results-dir", str(tmp_path / "results")]))
    assert (run_dir / "checkpoints" / "0000004.pt").read_bytes() == newest
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0000002.pt", "0000004.pt"]
    branches = sorted(p for p in os.listdir(tmp_path / "results") if p != "000-run")
    assert len(branches) == 2
    for branch in branches:
        assert os.listdir(tmp_path / "results" / branch / "checkpoints") == ["0000003.pt"]
        assert "into the new run folder" in (tmp_path / "results" / branch / "log.txt").read_text()


def test_stale_temporaries_are_removed_on_resume(toy_runs, tmp_path):
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    stale = run_dir / "checkpoints" / "0000006.pt.999999999.tmp"  # no such process
    stale.write_bytes(b"half a checkpoint")
    train.main(train.parse_args(["--resume", str(run_dir / "checkpoints" / "0000004.pt"), "--max-steps", "5"]))
    assert not stale.exists() and (run_dir / "checkpoints" / "0000005.pt").exists()


def test_sample_grids_are_comparable_and_leave_training_alone(toy_runs, tmp_path):
    """--sample-every: grids from fixed noise, the same in two runs of the same seed; the weights trained are those of
    a run without grids (the grids draw nothing from the training's random stream)."""
    grids, weights = [], []
    for name, extra in (("a", ["--sample-every", "2"]), ("b", ["--sample-every", "2"]), ("c", [])):
        _, run_dir = train.main(toy_args(toy_runs, tmp_path / name, "--max-steps", "3", *extra))
        weights.append(read_checkpoint(os.path.join(run_dir, "checkpoints", "0000003.pt")).ema)
        if extra:
            assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["0000002.png", "0000003.png"]
            assert "samples at step 2: " in open(os.path.join(run_dir, "log.txt")).read()
            grids.append(open(os.path.join(run_dir, "samples", "0000002.png"), "rb").read())
    assert grids[0] == grids[1]
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[2])


@pytest.mark.parametrize("step_times, said", [
    ([1.0, 1.5, 2.0, 2.5, 3.0, 3.5], "256.0 images/s over steps 2-6; the 199,994 steps to go take about 1 day 3 h; "
                                     "a job for GPUs"),  # a warm-up step, then 5 steps at 0.5 s
    ([30.0], "4.3 images/s over step 1; the 199,999 steps to go take about 69 days 10 h")])  # too slow to wait
def test_the_cost_on_a_cpu_is_said_once_and_early(monkeypatch, step_times, said):
    clock = iter([0.0] + step_times + [99.0] * 10)
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    lines = []
    args = train.parse_args(["--global-batch-size", "128", "--log-every", "1000"])
    meter = train.Meter(args, 0, 1e-4, torch.device("cpu"), lambda message, **metrics: lines.append(message))
    for step in range(1, 9):
        meter.update(step, 0.1)
    assert len(lines) == 1 and lines[0].startswith("on this CPU: " + said), lines
