"""Shared test helpers: where the golden fixtures live, how to compare against them, how to build their models, and
two tiny toy training runs that several test files sample from."""
import contextlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")

from checkpoint import SAFETENSORS_DTYPES, load_dit_weights  # noqa: E402
from model import DiT  # noqa: E402  (after the path is set)


def fixture(name):
    """Load a golden fixture file from ../shared/fixtures (tensors and plain data only)."""
    path = os.path.join(FIXTURES, name)
    if name.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    return torch.load(path, weights_only=True)


def rel_err(ours, ref):
    """The fixtures' error measure: max|ours - ref| / max|ref|."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def dit_from_fixture(f):
    """Build a fixture's model from its own config and load its weights (eval mode, as recorded). The official
    FineDiffusion table is [fine | superclass] with no null row; which class sits in which superclass is not in the
    file (only the rows matter to it), so class c is put in superclass c mod S."""
    cfg = dict(f["config"])
    num_superclasses = cfg.pop("num_super_classes", 0)
    parents = torch.arange(cfg["num_classes"]) % num_superclasses if num_superclasses else None
    model = DiT(**cfg, learn_sigma=f.get("learn_sigma", True), num_superclasses=num_superclasses,
                class_to_superclass=parents, null_row=not num_superclasses, norm_affine=bool(num_superclasses))
    return load_dit_weights(model, f["state_dict"]).eval()


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file (the format model.read_safetensors reads): an 8-byte little-endian
    header size, a JSON header {name: {dtype, shape, data_offsets}}, 8-byte aligned, then the raw bytes."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = dict(dtype=dtype_names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# -----------------------------------------------------------------------------------------------------------
# Two tiny toy runs shared by the training and sampling tests: a base trained from scratch on the toy source
# split (the role ImageNet plays), then FineDiffusion on the target split's new classes. Tests read them and
# never write into them (a test that continues a run copies it first).

TOY = ["--data", "toy", "--model", "DiT-T/4", "--image-size", "16", "--vae", "none", "--global-batch-size", "8",
       "--num-workers", "0", "--log-every", "1", "--ema-decay", "0.9"]


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
    return dict(root=root, common=common, base=base, run_dir=run_dir,
                checkpoint=os.path.join(run_dir, "checkpoints", "0000004.pt"))


@pytest.fixture(scope="session")
def taxa(tmp_path_factory):
    """The toy taxonomy (32 px), and judges of its source and target splits trained through the command line,
    kept where toy.py --table looks for them."""
    import evaluate
    import toy
    root = tmp_path_factory.mktemp("taxa")
    judges = {split: toy.judge_path("taxa", str(root), split, 32) for split in ("source", "target")}
    for split, judge in judges.items():  # the tests ask the target judge to be right, the source one to exist
        training = ["--epochs", "6", "--width", "24"] if split == "target" else ["--epochs", "1", "--width", "8"]
        evaluate.main(["judge", "--data", "taxa", "--data-path", str(root), "--split", split, *training,
                       "--num-workers", "0", "--out", judge])
    return dict(root=root, judge=judges["target"], source_judge=judges["source"])


def write_tiny_vae(folder):
    """The fixture's tiny VAE as a diffusers folder (config.json + diffusion_pytorch_model.safetensors) -> its path."""
    f = fixture("vae_tiny.pt")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(f["state_dict"], os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as out:
        json.dump(dict(f["config"], scaling_factor=f["scaling_factor"]), out)
    return str(folder)


HOLD_LOCK = "import sys, time; from checkpoint import Lock; lock = Lock(sys.argv[1], 'x'); print('held', flush=True); " \
            "time.sleep(300)"


@contextlib.contextmanager
def lock_held_elsewhere(path):
    """Another process holding checkpoint.Lock(path) while the block runs (then killed, as a crashed writer is) -> its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
