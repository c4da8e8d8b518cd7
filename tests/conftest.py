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
