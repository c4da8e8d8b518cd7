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
