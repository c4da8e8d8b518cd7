"""checkpoint.py: the format (atomic, versioned, a delta rebuilt on its fingerprinted base), run folders and names."""
import dataclasses
import math
import os

import pytest
import torch

from checkpoint import (LOCK_FILE, Checkpoint, checkpoint_file, create_run_folder, find_checkpoint,
                        fingerprint, load_model, named_runs, open_run, read_checkpoint, run_folder,
                        save_checkpoint, saved_checkpoints)
from conftest import dit_from_fixture, fixture, lock_held_elsewhere
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
    """results/NNN-<name>: numbered above the highest there, found by name (newest first, once it holds a checkpoint)
    and by their checkpoints (the highest step of one run; the newest written of all runs); a checkpoint leads back
    to its run; a mistyped name is answered with the names there are."""
    results = str(tmp_path / "results[1]")  # a glob character in the path is taken literally
    os.makedirs(os.path.join(results, "007-someone-else"))
    runs = [create_run_folder(results, "fd") for _ in range(2)]
    assert [os.path.basename(r) for r in runs] == ["008-fd", "009-fd"] and saved_checkpoints(runs[0]) == []
    assert named_runs("fd", results) == []  # killed before a first checkpoint: no run to take up
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        find_checkpoint(None, results)
    for run, steps in ((runs[1], (20, 100)), (runs[0], (5,))):  # runs[0]'s is written last
        for step in steps:
            open(checkpoint_file(run, step), "w").close()
    assert named_runs("fd", results) == runs[::-1] and saved_checkpoints(runs[1]) == [
        checkpoint_file(runs[1], 20), checkpoint_file(runs[1], 100)]
    assert find_checkpoint("fd", results) == checkpoint_file(runs[1], 100) == find_checkpoint(runs[1])
    with pytest.raises(FileNotFoundError, match="did you mean fd"):
        find_checkpoint("fdd", results)
    os.utime(checkpoint_file(runs[0], 5), (2e9, 2e9))
    assert find_checkpoint(None, results) == checkpoint_file(runs[0], 5)
    assert os.path.samefile(run_folder(checkpoint_file(runs[1], 20)), runs[1]) and run_folder(__file__) is None
    torn = checkpoint_file(runs[1], 110) + ".tmp"  # what a killed save leaves
    open(torn, "w").close()
    owner = open_run(results, "fd", checkpoint_file(runs[1], 100))  # from the newest: on in place, locked
    assert os.path.dirname(owner.path) == runs[1] and not os.path.exists(torn)
    owner.release()
    branch = open_run(results, "fd", checkpoint_file(runs[1], 20))  # from an earlier one: a new folder
    assert os.path.basename(os.path.dirname(branch.path)) == "010-fd"
    assert saved_checkpoints(runs[1])[-1] == checkpoint_file(runs[1], 100)


def test_a_run_is_written_by_one_process(tmp_path):
    """A run folder another process holds is refused, naming that process; once it is killed the lock is free, with no
    process table read (the OS drops a dead process's locks)."""
    run = create_run_folder(str(tmp_path), "fd")
    open(checkpoint_file(run, 10), "w").close()
    with lock_held_elsewhere(os.path.join(run, LOCK_FILE)) as pid:
        with pytest.raises(ValueError, match=f"in use by process {pid} on .* wait for that one to end"):
            open_run(str(tmp_path), "fd", checkpoint_file(run, 10))
    owner = open_run(str(tmp_path), "fd", checkpoint_file(run, 10))  # the killed holder's lock is taken over
    assert os.path.dirname(owner.path) == run
    with pytest.raises(ValueError, match="in use"):  # and now held: a second open in this process is refused too
        open_run(str(tmp_path), "fd", checkpoint_file(run, 10))
    owner.release()
    assert not os.path.exists(owner.path)


def test_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A save that fails part-way (torch's short-write RuntimeError, as on a full disk) says what it needed in one
    OSError, leaves no temporary, and the checkpoint written before it is untouched and readable."""
    f, model = fresh("finediffusion")
    trained = trainable_state_dict(model)
    checkpoint = Checkpoint(method="finediffusion", options=dict(class_to_superclass=PARENTS), dit=model.config,
                            base=None, hierarchy={}, vae=None, data={}, model=trained, ema=trained, step=1)
    save_checkpoint(str(tmp_path / "0000001.pt"), checkpoint)
    before = (tmp_path / "0000001.pt").read_bytes()

    def short_write(contents, out):
        out.write(b"PK" + bytes(100))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=r"could not write .*0000002.pt \(\[enforce fail.*it needs about .* MiB and its "
                                      r"disk has .* MiB free.*earlier checkpoints are untouched"):
        save_checkpoint(str(tmp_path / "0000002.pt"), dataclasses.replace(checkpoint, step=2))
    assert sorted(os.listdir(tmp_path)) == ["0000001.pt"] and (tmp_path / "0000001.pt").read_bytes() == before


def test_non_finite_weights_are_refused(tmp_path):
    """A checkpoint whose weights went NaN (saved after a divergence) is no model: refused by name, not sampled."""
    f, model = fresh("finediffusion")
    trained = {k: torch.full_like(v, math.nan) for k, v in trainable_state_dict(model).items()}
    checkpoint = Checkpoint(method="finediffusion", options=dict(class_to_superclass=PARENTS), dit=model.config,
                            base=None, hierarchy={}, vae=None, data={}, model=trained, ema=trained, step=1)
    save_checkpoint(str(tmp_path / "nan.pt"), checkpoint)
    with pytest.raises(ValueError, match=r"nan.pt: \d+ tensors hold NaN or infinite values .* take an earlier"):
        load_model(str(tmp_path / "nan.pt"))
