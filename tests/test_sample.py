"""sample.py on the toy FineDiffusion checkpoint: determinism, guidance modes, class names, bulk sampling."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
from conftest import ROOT


def run(toy_runs, tmp_path, *extra):
    ckpt = os.path.join(toy_runs["run_dir"], "checkpoints", "0000004.pt")
    out = str(tmp_path / f"grid{len(os.listdir(tmp_path))}.png")
    sample.main(sample.parse_args(["--ckpt", ckpt, "--n", "4", "--num-sampling-steps", "5", "--out", out, *extra]))
    return np.asarray(Image.open(out))


def test_same_seed_same_images_and_guidance_modes_differ(toy_runs, tmp_path):
    first = run(toy_runs, tmp_path, "--class", "3", "--seed", "1")
    assert np.array_equal(first, run(toy_runs, tmp_path, "--class", "3", "--seed", "1"))
    assert not np.array_equal(first, run(toy_runs, tmp_path, "--class", "3", "--seed", "2"))
    none = run(toy_runs, tmp_path, "--class", "3", "--seed", "1", "--guidance", "none")
    assert not np.array_equal(first, none)
    ddim = run(toy_runs, tmp_path, "--class", "3", "--seed", "1", "--sampler", "ddim")
    assert first.shape == none.shape == ddim.shape == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2), 3)  # a 2x2 grid


def test_class_by_name_and_bad_inputs(toy_runs, tmp_path):
    checkpoint = torch.load(os.path.join(toy_runs["run_dir"], "checkpoints", "0000004.pt"), weights_only=True)
    names = checkpoint["hierarchy"]["class_names"]
    by_name = run(toy_runs, tmp_path, "--class", names[3].upper(), "--seed", "1")
    assert np.array_equal(by_name, run(toy_runs, tmp_path, "--class", "3", "--seed", "1"))
    with pytest.raises(SystemExit, match=rf"valid ids are 0\.\.{len(names) - 1}"):
        run(toy_runs, tmp_path, "--class", "999")
    with pytest.raises(SystemExit, match=f"closest: .*{names[3]}"):
        run(toy_runs, tmp_path, "--class", names[3][:-1] + "z")
    with pytest.raises(SystemExit, match="no null label row"):
        run(toy_runs, tmp_path, "--class", "3", "--guidance", "cfg")


def test_bulk_sampling_on_two_processes(toy_runs, tmp_path):
    """torchrun with 2 CPU processes writes every PNG and one .npz with the right labels, which evaluate.py reads."""
    ckpt = os.path.join(toy_runs["run_dir"], "checkpoints", "0000004.pt")
    out = tmp_path / "bulk"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "sample.py", "--ckpt", ckpt, "--num-samples", "13", "--batch-size", "4",
                             "--num-sampling-steps", "3", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    hierarchy = torch.load(ckpt, weights_only=True)["hierarchy"]
    with np.load(str(out) + ".npz") as npz:
        images, labels = npz["arr_0"], npz["labels"]
        assert images.shape == (13, 16, 16, 3) and images.dtype == np.uint8
        assert list(labels) == [i % len(hierarchy["class_names"]) for i in range(13)]
        assert list(npz["superclass_labels"]) == [hierarchy["class_to_superclass"][c] for c in labels]
    assert len(os.listdir(out)) == 13
    read = evaluate.read_image_set(str(out) + ".npz")
    assert np.array_equal(read["labels"], labels) and read["superclass_names"] == hierarchy["superclass_names"]


def test_official_checkpoints_load_for_sampling(tmp_path):
    """An official DiT file (raw state dict) and an official FineDiffusion training checkpoint ({"model", "ema"},
    affine LayerNorms, fine + superclass rows, no null row) load by their shapes; the latter needs --hierarchy."""
    from data import Hierarchy
    from model import DIT_CONFIGS, DiT
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    official = DiT(input_size=8, num_classes=1000, **DIT_CONFIGS["DiT-S/8"]).eval()
    torch.save(official.state_dict(), tmp_path / "DiT-S-8.pt")
    hierarchy = Hierarchy(["a", "b", "c", "d", "e"], ["P", "Q"], [0, 0, 1, 1, 1])
    hierarchy.to_json(str(tmp_path / "classes.json"))
    tiered = DiT(input_size=8, num_classes=5, num_superclasses=2, class_to_superclass=[0, 0, 1, 1, 1],
                 null_row=False, norm_affine=True, **DIT_CONFIGS["DiT-S/8"]).eval()
    with torch.no_grad():
        for p in tiered.parameters():  # non-trivial weights everywhere, adaLN-zero layers included
            p.add_(0.01 * torch.randn_like(p))
    torch.save(dict(model=tiered.state_dict(), ema=tiered.state_dict()), tmp_path / "finediffusion.pt")
    for file, reference, labels, extra in [("DiT-S-8.pt", official, torch.tensor([1, 1000]), []),
                                           ("finediffusion.pt", tiered, torch.tensor([4, 6]),
                                            ["--hierarchy", str(tmp_path / "classes.json")])]:
        model, _, _ = sample.load_model(sample.parse_args(["--ckpt", str(tmp_path / file)] + extra))
        with torch.no_grad():
            assert torch.equal(model.eval()(x, t, labels), reference(x, t, labels))
    with pytest.raises(SystemExit, match="--hierarchy"):
        sample.load_model(sample.parse_args(["--ckpt", str(tmp_path / "finediffusion.pt")]))
