"""Shared test helpers: where the golden fixtures live and how to compare against them."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")


def fixture(name):
    """Load a golden fixture file from ../shared/fixtures (tensors and plain data only)."""
    path = os.path.join(FIXTURES, name)
    if name.endswith(".json"):
        import json
        with open(path) as f:
            return json.load(f)
    return torch.load(path, weights_only=True)


def rel_err(ours, ref):
    """The fixtures' error measure: max|ours - ref| / max|ref|."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# -----------------------------------------------------------------------------------------------------------
# Two tiny toy runs shared by the training and sampling tests: a base trained from scratch on the toy source
# split (the role ImageNet plays), then FineDiffusion on the target split's new classes.

TOY = ["--data", "toy", "--model", "DiT-T/4", "--image-size", "16", "--vae", "none", "--global-batch-size", "8",
       "--num-workers", "0", "--log-every", "1", "--ema-decay", "0.9"]

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_runs(tmp_path_factory):
    import train
    root = tmp_path_factory.mktemp("toy")
    common = TOY + ["--data-path", str(root / "data"), "--results-dir", str(root / "results")]
    _, base_dir = train.main(train.parse_args(common + ["--split", "source", "--method", "full", "--max-steps", "3"]))
    base = os.path.join(base_dir, "checkpoints", "0000003.pt")
    args = train.parse_args(common + ["--split", "target", "--method", "finediffusion", "--ckpt", base,
                                      "--max-steps", "4", "--ckpt-every", "2"])
    _, run_dir = train.main(args)
    return dict(root=root, common=common, base=base, run_dir=run_dir)
