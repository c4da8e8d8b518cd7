"""
A run on disk: run folders and their names, the checkpoint format, and `load_model`, the one way every script
(sample, evaluate, bench, train's resume) turns a checkpoint into a model.

    results/NNN-<name>/              a run; NNN one above the highest number there, <name> its --run-name
        checkpoints/0040000.pt       the Checkpoint of step 40,000, written into a temporary file and renamed
        log.txt                      what train.py said
        metrics.jsonl                one JSON line per logged step: {step, loss, steps_per_s, images_per_s, lr, method}
        samples/                     grids and bulk samples, of the training and of sample.py
        lock                         while a process writes the run: who it is (data.Lock; one writer per run)

A name stands for its newest run, a run for its newest checkpoint (`find_checkpoint`). A delta (a method freezing part
of its base) names its base by path and sha256 (`fingerprint`); `load_model`: base -> prepare -> tensors -> merge.
"""
import dataclasses
import difflib
import glob
import json
import os
import shutil

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import LOCK_FILE, Lock, fingerprint, remove_temporaries
from model import LABEL_TABLE_KEY, DiT, dit_state_dict, load_dit, load_state_dict_file
from peft import merge, prepare, trainable_state_dict

CHECKPOINTS_DIR, SAMPLES_DIR, METRICS_FILE, LOG_FILE = "checkpoints", "samples", "metrics.jsonl", "log.txt"

# -----------------------------------------------------------------------------------------------------------
# The checkpoint format: the one place that knows its keys

FORMAT = 2  # 1: the unversioned files of the first versions
WEIGHTS_HELP = ("which weights of a training checkpoint (ours, or official {model, ema}): ema, their moving average "
                "(what the papers sample), or raw, the trained values themselves. Early in a short fine-tune the EMA "
                "is still mostly the base model")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint of train.py. On disk: a dict of these fields and `format`, plain data and tensors only, so
    torch.load(weights_only=True) reads it. The last four are what a resume needs (None in one made for sampling)."""
    method: str  # a key of peft.METHODS
    options: dict  # peft.prepare()'s keyword arguments: class_to_superclass, num_superclasses, p_parent, its own
    dit: dict  # the base's architecture: DiT(**dit) (model.DiT.config)
    base: dict  # {path, sha256}: the base checkpoint and its fingerprint; None where the file holds every tensor
    hierarchy: dict  # data.Hierarchy.to_dict(): class names, superclass names, the fine -> superclass map
    vae: str  # the VAE (a path) whose latent space the model works in; None: pixel space
    data: dict  # what it trained on: {kind, path, split, image_size, hflip (mirrored copies or not)}
    model: dict  # {name: tensor} of every parameter the method trains
    ema: dict  # the same names: their exponential moving average in float32, what sampling uses
    step: int  # optimizer steps taken
    optimizer: dict = None  # the AdamW state dict
    scaler: dict = None  # the fp16 GradScaler state dict
    rng: list = None  # every rank's RNG states: [{cpu, cuda}] in rank order
    settings: dict = None  # train.py's flags, {name: value}

    def tensors(self, weights="ema"):
        """The trained tensors to use: "ema", their moving average (what sampling uses by default), or "raw"."""
        return self.ema if weights == "ema" else self.model


def save_checkpoint(path, checkpoint):
    """Write a Checkpoint atomically: into a temporary file, then renamed (a kill never tears it; the run's lock
    holder removes what a killed writer left). A write that fails (a full disk) leaves nothing behind and says how
    much it needed: the files written before it are untouched."""
    contents = dict(format=FORMAT, **{f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(Checkpoint)})
    tmp = f"{path}.tmp"
    try:
        torch.save(contents, tmp)
    except (OSError, RuntimeError) as error:  # torch reports a short write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        size = sum(t.numel() * t.element_size() for t in tensors_of(contents)) / 2**20
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        raise OSError(f"could not write {path} ({str(error).splitlines()[0]}): it needs about {size:,.0f} MiB and "
                      f"its disk has {free:,.0f} MiB free. Nothing was left half-written; earlier checkpoints are "
                      f"untouched, so the run resumes from its newest once there is space") from None
    os.replace(tmp, path)


def tensors_of(contents):
    """Every tensor in nested dicts and lists."""
    if torch.is_tensor(contents):
        return [contents]
    if isinstance(contents, dict):
        contents = list(contents.values())
    values = contents if isinstance(contents, (list, tuple)) else []
    return [t for value in values for t in tensors_of(value)]


def as_checkpoint(contents, source):
    """What torch.load read from a file -> Checkpoint, or None when it is no checkpoint of train.py."""
    if not (isinstance(contents, dict) and "method" in contents):
        return None
    if contents.get("format", 1) != FORMAT:
        raise ValueError(f"{source} is a train.py checkpoint of format {contents.get('format', 1)}; this version "
                         f"reads format {FORMAT} only: sample or resume it with the version of this repository that "
                         f"wrote it, or train again")
    names = [f.name for f in dataclasses.fields(Checkpoint)]
    missing = [name for name in names if name not in contents]
    if missing:
        raise ValueError(f"{source} is an incomplete train.py checkpoint: it lacks {missing}")
    return Checkpoint(**{name: contents[name] for name in names})


def read_checkpoint(path):
    """A train.py checkpoint file -> Checkpoint."""
    if (checkpoint := as_checkpoint(load_state_dict_file(path), path)) is None:
        raise ValueError(f"{path} is not a checkpoint of train.py")
    return checkpoint


def load_base(path, input_size=None, num_heads=None):
    """A base to fine-tune, from any DiT file or train.py checkpoint (adapters merged) -> (model, {path, sha256})."""
    model, _ = load_model(path, input_size=input_size, num_heads=num_heads)
    return model, dict(path=os.path.abspath(path), sha256=fingerprint(model.state_dict()))


def load_model(path, base=None, class_to_superclass=None, input_size=None, num_heads=None, weights="ema", merged=True):
    """
    Any checkpoint file -> (model, Checkpoint or None). A train.py checkpoint is rebuilt: its base (from `base`, or
    the path it recorded, checked against its fingerprint; a fresh DiT(**dit) when the file holds every trained
    tensor), peft.prepare(method), then its trained tensors (`weights`: "ema" or "raw"), then peft.merge unless
    merged=False (to train on). Any other DiT file (official DiT, official FineDiffusion, safetensors) is read by
    model.load_dit; a tiered table needs `class_to_superclass`. `input_size`: another grid (DiT.resize).
    """
    contents = load_state_dict_file(path)
    checkpoint = as_checkpoint(contents, path)
    if checkpoint is None:
        return finite(load_dit(contents, path, input_size, class_to_superclass, num_heads, weights), path), None
    if num_heads and num_heads != checkpoint.dit["num_heads"]:
        raise ValueError(f"{path} records its model's {checkpoint.dit['num_heads']} attention heads, and "
                         f"{num_heads} were asked for: leave the heads unset for this file")
    if checkpoint.base is None:
        model = DiT(**checkpoint.dit)
    else:
        base = base or checkpoint.base["path"]
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{path} holds only what {checkpoint.method} trained, on top of its base {base}, "
                                    f"which is not there (moved?): give the base's new path (sample.py --base; "
                                    f"train.py --resume with --ckpt), it is checked by its fingerprint")
        model, _ = load_model(base, input_size=checkpoint.dit["input_size"], num_heads=checkpoint.dit["num_heads"])
        sha256 = fingerprint(model.state_dict())
        if sha256 != checkpoint.base["sha256"] or model.config != checkpoint.dit:
            raise ValueError(f"{base} is not the base {path} was trained on (that was {checkpoint.base['path']}, "
                             f"sha256 {checkpoint.base['sha256'][:16]}...; this one has {sha256[:16]}...)")
    prepare(model, checkpoint.method, **checkpoint.options)
    tensors, expected = checkpoint.tensors(weights), set(trainable_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(f"{path}: its tensors do not match method {checkpoint.method}: missing "
                         f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return finite(merge(model) if merged else model, path).resize(input_size), checkpoint


def finite(model, path):
    """The model, if its every weight is finite (a checkpoint saved after training diverged is not)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}, ...): it is "
                         f"no usable model (saved after its training diverged?); take an earlier checkpoint")
    return model


def read_label_table(path, weights="ema"):
    """(label table (rows, D), hierarchy dict or None) of any checkpoint file, without building its model."""
    contents = load_state_dict_file(path)
    checkpoint = as_checkpoint(contents, path)
    if checkpoint is not None:
        return checkpoint.tensors(weights)[LABEL_TABLE_KEY].float(), checkpoint.hierarchy
    state_dict = dit_state_dict(contents, weights)
    if not isinstance(state_dict, dict) or LABEL_TABLE_KEY not in state_dict:
        raise ValueError(f"{path} holds no {LABEL_TABLE_KEY}: it is no checkpoint of train.py, no official "
                         f"FineDiffusion checkpoint and no DiT state dict")
    return state_dict[LABEL_TABLE_KEY].float(), None


def rng_states(world_size):
    """Every rank's RNG states (CPU and CUDA), gathered so one file can resume all of them exactly."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    states = [state] * world_size
    if world_size > 1:
        dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world_size, seed):
    """This rank's saved random streams -> whether the run goes on bit-exactly. On another world size the streams
    start afresh from `seed` (the run goes on, not bit-exactly)."""
    if len(states) != world_size:
        torch.manual_seed(seed * world_size + rank)
        return False
    torch.set_rng_state(states[rank]["cpu"])
    if torch.cuda.is_available() and states[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[rank]["cuda"])
    return True


# -----------------------------------------------------------------------------------------------------------
# Run folders: the one place that knows their layout

def create_run_folder(results_dir, name):
    """results_dir/NNN-name, NNN one above the highest number there, made by this process alone: the exclusive mkdir
    fails when another run took the number first, and the next number is tried."""
    os.makedirs(results_dir, exist_ok=True)
    while True:
        taken = [int(e.split("-")[0]) for e in os.listdir(results_dir) if e.split("-")[0].isdigit()]
        run_dir = os.path.join(results_dir, f"{max(taken, default=-1) + 1:03d}-{name}")
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            continue
        os.mkdir(os.path.join(run_dir, CHECKPOINTS_DIR))
        return run_dir


def checkpoint_file(run_dir, step):
    """Where train.py saves a run's checkpoint of `step`."""
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"{step:07d}.pt")


def saved_checkpoints(run_dir):
    """A run folder's checkpoint files, the lowest step first ([] where there are none)."""
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), CHECKPOINTS_DIR, "*.pt")))


def run_folder(path):
    """The run folder a checkpoint file lies in, or None outside one."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == CHECKPOINTS_DIR else None


def named_runs(name, results_dir="results"):
    """The run folders results_dir/NNN-<name> that hold a checkpoint, newest (highest number) first: a run killed
    before its first checkpoint is left out (its folder, with what it logged, is kept)."""
    runs = [e for e in run_names(results_dir) if e.split("-", 1)[1] == name]
    return [os.path.join(results_dir, e) for e in sorted(runs, key=lambda e: -int(e.split("-", 1)[0]))
            if saved_checkpoints(os.path.join(results_dir, e))]


def run_names(results_dir):
    """The names of the run folders NNN-<name> in results_dir."""
    listed = os.listdir(results_dir) if os.path.isdir(results_dir) else []
    return [e for e in listed if e.split("-", 1)[0].isdigit() and "-" in e]


def find_checkpoint(path=None, results_dir="results"):
    """A checkpoint file; or a run folder, or a run's name (the newest results_dir/NNN-<name>) -> its newest
    checkpoint (the highest step); None -> the checkpoint written last by any run in results_dir."""
    if path is None:
        found = [p for run in glob.glob(os.path.join(glob.escape(results_dir), "*")) for p in saved_checkpoints(run)]
        if not found:
            raise FileNotFoundError(f"no checkpoint under {results_dir}/: train one (python toy.py) or give one")
        return max(found, key=os.path.getmtime)
    if not os.path.exists(path):
        runs = named_runs(path, results_dir)
        if not runs:
            names = sorted({e.split("-", 1)[1] for e in run_names(results_dir)})
            close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
            raise FileNotFoundError(f"{path}: no checkpoint file, run folder or run name with a checkpoint in "
                                    f"{results_dir}/" + (f"; did you mean {', '.join(close)}?" if close else
                                                         f" (its runs: {', '.join(names[:8]) or 'none'})"))
        path = runs[0]
    if not os.path.isdir(path):
        return path
    saved = saved_checkpoints(path)
    if not saved:
        raise FileNotFoundError(f"{path} holds no checkpoint ({CHECKPOINTS_DIR}/*.pt): not a run folder of train.py, "
                                f"or a run stopped before its first checkpoint")
    return saved[-1]


def continued_run(resume):
    """The run folder a resume from the checkpoint `resume` writes on in: its run's, where it is that run's newest
    checkpoint; None where the resume branches into a new folder (an earlier or copied checkpoint: no checkpoint is
    ever overwritten)."""
    folder = run_folder(resume)
    return folder if folder and os.path.samefile(find_checkpoint(folder), resume) else None


def lock_run(folder):
    """The Lock by which one process at a time writes a run folder (taken: a ValueError naming the process)."""
    return Lock(os.path.join(folder, LOCK_FILE), f"the run {folder}")


def open_run(results_dir, name, resume=None):
    """The folder a run writes into, locked by this process, so that no two processes write one run -> its Lock
    (.path: folder/lock): the run a resume continues (what a killed writer left half-written is removed), or a new
    results_dir/NNN-<name>."""
    folder = continued_run(resume) if resume else None
    if folder:
        lock = lock_run(folder)
        if continued_run(resume) == folder:  # (still its newest checkpoint, now that no other process writes there)
            remove_temporaries(os.path.join(glob.escape(folder), CHECKPOINTS_DIR, "*.tmp"))
            return lock
        lock.release()
    return lock_run(create_run_folder(results_dir, name))


class RunLog:
    """Rank 0 writes each message to the terminal and log.txt, and each logged step as a JSON line to metrics.jsonl;
    other ranks write nothing."""
    def __init__(self, run_dir, rank):
        self.files = [open(os.path.join(run_dir, n), "a") for n in (LOG_FILE, METRICS_FILE)] if rank == 0 else None

    def __call__(self, message, **metrics):
        if self.files:
            tqdm.write(message)  # above a progress bar, if one runs
            for file, line in zip(self.files, (message, json.dumps(metrics) if metrics else None)):
                if line is not None:
                    file.write(line + "\n")
                    file.flush()


def read_metrics(run):
    """A run folder -> its logged steps, each {step, loss, steps_per_s, images_per_s, lr, method}."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run} is not a train.py run folder: it has no {METRICS_FILE}")
    with open(path) as f:
        return [json.loads(line) for line in f]
