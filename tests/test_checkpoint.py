"""checkpoint.py: the format (atomic, versioned, a delta rebuilt on its fingerprinted base), run folders and names."""
import os

import pytest
import torch

from checkpoint import (Checkpoint, checkpoint_file, create_run_folder, find_checkpoint, load_model, named_runs,
                        open_run, read_checkpoint, run_folder, save_checkpoint, saved_checkpoints)
from conftest import dit_from_fixture, fixture
from data import fingerprint
from peft import prepare, trainable_state_dict

PARENTS = [0, 0, 1, 1, 1, 2]  # target set: 6 fine classes in 3 superclasses


def fresh(method):
    f = fixture("dit_tiny.pt")
    return f, prepare(dit_from_fixture(f), method, PARENTS)


def test_delta_round_trip_and_wrong_base(tmp_path):
    """A delta written by save_checkpoint and read back on its base is the trained model; another base is refused."""
    f, model = fresh("finediffusion")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    base = dit_from_fixture(f)
    torch.save(f["state_dict"], tmp_path / "base.pt")
    trained = trainable_state_dict(model)
    checkpoint = Checkpoint(method="finediffusion", options=dict(class_to_superclass=PARENTS), dit=base.config,
                            base=dict(path=str(tmp_path / "base.pt"), sha256=fingerprint(base.state_dict())), hierarchy={},
                            vae=None, data={}, model=trained, ema=trained, step=1)
    save_checkpoint(str(tmp_path / "delta.pt"), checkpoint)
    read = read_checkpoint(str(tmp_path / "delta.pt"))
    assert (read.method, read.options, read.dit, read.base, read.step) == (
        checkpoint.method, checkpoint.options, checkpoint.dit, checkpoint.base, checkpoint.step)
    assert read.ema.keys() == trained.keys() and all(torch.equal(read.ema[k], v) for k, v in trained.items())
    rebuilt, read = load_model(str(tmp_path / "delta.pt"))  # heads: from the recorded base config
    assert read.method == "finediffusion" and read.base == checkpoint.base
    labels = torch.arange(len(f["y"])) % rebuilt.y_embedder.embedding_table.num_embeddings
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(f["x"], f["t"], labels), model.eval()(f["x"], f["t"], labels))
    other = dict(f["state_dict"])
    deep = f"blocks.{f['config']['depth'] - 1}.mlp.fc1.weight"
    other[deep] = other[deep] + 1e-3  # a frozen tensor deep inside
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not the base"):
        load_model(str(tmp_path / "delta.pt"), base=str(tmp_path / "other.pt"))
    (tmp_path / "base.pt").unlink()
    with pytest.raises(FileNotFoundError, match="which is not there"):
        load_model(str(tmp_path / "delta.pt"))


def test_old_checkpoint_format_is_refused_with_a_message(tmp_path):
    torch.save(dict(method="finediffusion", ema={}, model={}, args={}), tmp_path / "old.pt")
    with pytest.raises(ValueError, match="format 1; this version reads format 2"):
        read_checkpoint(str(tmp_path / "old.pt"))


def test_run_folders(tmp_path):
    """results/NNN-<name>: numbered above the highest there, found by name (newest first) and by their checkpoints
    (the highest step of one run; the newest written of all runs); a checkpoint leads back to its run."""
    results = str(tmp_path / "results[1]")  # a glob character in the path is taken literally
    os.makedirs(os.path.join(results, "007-someone-else"))
    runs = [create_run_folder(results, "fd") for _ in range(2)]
    assert [os.path.basename(r) for r in runs] == ["008-fd", "009-fd"] and named_runs("fd", results) == runs[::-1]
    assert saved_checkpoints(runs[0]) == []
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        find_checkpoint(None, results)
    for run, steps in ((runs[1], (20, 100)), (runs[0], (5,))):  # runs[0]'s is written last
        for step in steps:
            open(checkpoint_file(run, step), "w").close()
    assert saved_checkpoints(runs[1]) == [checkpoint_file(runs[1], 20), checkpoint_file(runs[1], 100)]
    assert find_checkpoint("fd", results) == checkpoint_file(runs[1], 100) == find_checkpoint(runs[1])
    os.utime(checkpoint_file(runs[0], 5), (2e9, 2e9))
    assert find_checkpoint(None, results) == checkpoint_file(runs[0], 5)
    assert os.path.samefile(run_folder(checkpoint_file(runs[1], 20)), runs[1]) and run_folder(__file__) is None
    stale, live = checkpoint_file(runs[1], 30) + ".999999999.tmp", checkpoint_file(runs[1], 40) + f".{os.getpid()}.tmp"
    for path in (stale, live):  # what a killed save leaves, and a save of this process still going on
        open(path, "w").close()
    assert open_run(results, "fd", checkpoint_file(runs[1], 100)) == runs[1]  # from the newest: on in place
    assert not os.path.exists(stale) and os.path.exists(live)
    branch = open_run(results, "fd", checkpoint_file(runs[1], 20))  # from an earlier one: a new folder
    assert os.path.basename(branch) == "010-fd" and saved_checkpoints(runs[1])[-1] == checkpoint_file(runs[1], 100)
