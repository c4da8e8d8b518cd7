"""Files on disk: runs and their checkpoints, official weight files, locks and fingerprints.

    results/NNN-<name>/          a run: NNN one above the highest number there
        checkpoints/0040000.pt   the Checkpoint of step 40,000
        log.txt, metrics.jsonl   what train.py said; each logged step's metrics (read_metrics)
        samples/                 grids and bulk samples (sample i is of class i mod C)
        lock                     while a process writes the run: who it is (Lock)
"""
import contextlib
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import DIT_CONFIGS, AutoencoderKL, DiT, superclass_count
from peft import merge, prepare, trainable_state_dict

CHECKPOINTS_DIR, SAMPLES_DIR = "checkpoints", "samples"
METRICS_FILE, LOG_FILE, LOCK_FILE = "metrics.jsonl", "log.txt", "lock"

# -------------------------------------------------------------------------------------------------
# Plain files: JSON a user gives, atomic writes, the samples' classes, fingerprints

def read_json(path):
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: a JSON file is expected here")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None


def write_atomically(path, write, size=None):
    """write(f) on `path`.tmp, then renamed: a kill or a full disk (`size` needed) tears no file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
    except (OSError, RuntimeError) as error:  # torch reports a short write as a RuntimeError
        remove_temporaries(glob.escape(tmp))
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        needs = f"it needs about {size / 2**20:,.0f} MiB and " if size is not None else ""
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise OSError(f"could not write {path} ({why}): {needs}its disk "
                      f"has {free:,.0f} MiB free. Nothing was left half-written") from None
    os.replace(tmp, path)


def sample_classes(count, num_classes):
    return np.arange(count) % num_classes


def fingerprint(tensors):
    """The sha256 of {name: tensor or array}'s names, shapes, dtypes and bytes: its identity."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor):
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            tensor = data = np.ascontiguousarray(tensor)  # hashed through the buffer protocol
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def remove_temporaries(pattern):
    """Remove the files or folders matching `pattern`: a killed writer's, by the lock's holder."""
    for path in glob.glob(pattern):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


# -------------------------------------------------------------------------------------------------
# One writer at a time: an OS file lock, freed however its process ends (no process table read)

class Lock(contextlib.AbstractContextManager):
    """The file `path` locked till release() or this process ends; held: a ValueError naming who."""
    def __init__(self, path, what):
        self.path = path
        while True:
            self.file = open(path, "a+")
            try:
                if os.name == "nt":
                    import msvcrt
                    self.file.seek(2**20)  # a byte far past the holder's name, which stays readable
                    msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl
                    fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise ValueError(f"{what} is in use by {holder} (lock {path}): one process writes "
                                 f"it at a time; wait for that one to end, or stop it") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(self.file.fileno()),
                                                         os.stat(path)):
                break
            self.file.close()  # the last holder removed the file as we opened it: lock the new one
        self.file.truncate(0)
        print(f"process {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M')}", file=self.file, flush=True)

    def release(self):
        """Free the lock; the file goes first, while held, so none locks a file about to vanish."""
        with contextlib.suppress(OSError):  # Windows removes no open file: it stays, unlocked
            os.remove(self.path)
        self.file.close()

    def __exit__(self, *exc):
        self.release()


# -------------------------------------------------------------------------------------------------
# Weight files: .safetensors read by hand, others by torch.load(weights_only=True); strict loads

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file (u64 header size, JSON header, raw bytes) -> {name: CPU tensor}."""
    with open(path, "rb") as f:
        blob = f.read()
    bad = f"{path} is not a valid .safetensors file:"
    header_size = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 or 8 + header_size > len(blob):
        raise ValueError(f"{bad} {len(blob)} bytes: no 8-byte header size and header (truncated?)")
    try:
        header = json.loads(blob[8:8 + header_size].decode("utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{bad} the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} the header is not a JSON object")
    header.pop("__metadata__", None)
    data, tensors = memoryview(blob)[8 + header_size:], {}
    for name, info in header.items():
        fields = info if isinstance(info, dict) else {}
        dtype, shape, span = (fields.get(k) for k in ("dtype", "shape", "data_offsets"))
        if not (dtype in SAFETENSORS_DTYPES and isinstance(shape, list) and isinstance(span, list)
                and len(span) == 2 and all(isinstance(n, int) and n >= 0 for n in shape + span)):
            raise ValueError(f"{bad} bad header entry for {name!r}: {info!r} (supported dtypes: "
                             f"{', '.join(SAFETENSORS_DTYPES)})")
        dtype, (begin, end) = SAFETENSORS_DTYPES[dtype], span
        if not begin <= end <= len(data):
            raise ValueError(f"{bad} {name!r} lies outside the {len(data)} data bytes (truncated?)")
        size = math.prod(shape) * dtype.itemsize
        if end - begin != size:
            raise ValueError(f"{bad} {name!r} has {end - begin} bytes, not {size} (shape {shape})")
        tensors[name] = torch.empty(shape, dtype=dtype)
        tensors[name].view(-1).view(torch.uint8).numpy()[:] = data[begin:end]  # its bytes, copied
    spans = sorted((*info["data_offsets"], name) for name, info in header.items())
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise ValueError(f"{bad} the data of {prev_name!r} and {name!r} overlap")
    return tensors


def load_state_dict_file(path, where_to_get=""):
    """A weight file's contents (.safetensors, .pt, .pth, .bin); errors end with `where_to_get`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}. {where_to_get}".strip())
    if os.fspath(path).endswith(".safetensors"):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or a pickle that would run code
        reason = ": ".join([type(e).__name__, *str(e).strip().splitlines()[:1]])
        raise ValueError(f"{path} cannot be read as a checkpoint ({reason[:200]}). "
                         f"{where_to_get}".strip()) from None


def load_checked(model, state_dict, source, where_to_get, assign=False):
    """A strict load -> model; a mismatch: a ValueError naming the keys, then `where_to_get`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
             for k, v in state_dict.items()}
    problems = {"missing keys": [k for k in expected if k not in found],
                "unexpected keys": [k for k in found if k not in expected],
                "mis-shaped keys": [f"{k} (file {found[k]}, model {expected[k]})"
                                    for k in expected if k in found and found[k] != expected[k]]}
    if lines := [f"{kind} ({len(keys)}): " + ", ".join(keys[:10]) + ", ..." * (len(keys) > 10)
                 for kind, keys in problems.items() if keys]:
        raise ValueError(f"{source} does not match {type(model).__name__}:\n  "
                         + "\n  ".join(lines) + f"\n{where_to_get}")
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


# -------------------------------------------------------------------------------------------------
# DiT files: official .pt, DiT and FineDiffusion training checkpoints {model, ema}, .safetensors

LABEL_TABLE_KEY = "y_embedder.embedding_table.weight"
DIT_SOURCE = ("The official DiT checkpoints: https://dl.fbaipublicfiles.com/DiT/models/"
              "DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt (github.com/facebookresearch/DiT).")


def dit_state_dict(checkpoint, weights="ema"):
    """A file's DiT weights: a training checkpoint's "ema" or "raw" (model) ones, else it."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    keys = ("ema", "model") if weights == "ema" else ("model", "ema")
    return next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), checkpoint)


def read_dit_shape(state_dict, source="this file"):
    """The architecture a DiT state dict's shapes say (input_size None: it has no pos_embed)."""
    if not isinstance(state_dict, dict) or "x_embedder.proj.weight" not in state_dict:
        keys = (f"keys {list(state_dict)[:5]}" if isinstance(state_dict, dict)
                else f"a {type(state_dict).__name__}")
        raise ValueError(f"{source} is not a DiT checkpoint: it holds {keys}, not a state dict "
                         f"with x_embedder.proj.weight. {DIT_SOURCE}")
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = int(state_dict["pos_embed"].shape[1] ** 0.5) if "pos_embed" in state_dict else None
    heads = {c["hidden_size"]: c["num_heads"] for c in DIT_CONFIGS.values()}  # files record none
    return dict(depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
                hidden_size=hidden, patch_size=patch, in_channels=channels,
                num_heads=heads.get(hidden, max(1, hidden // 64)), learn_sigma=out == 2 * channels,
                mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                input_size=grid and grid * patch, table_rows=state_dict[LABEL_TABLE_KEY].shape[0],
                norm_affine="final_layer.norm_final.weight" in state_dict)


def dit_name(shape):
    return next((name for name, c in DIT_CONFIGS.items()
                 if all(shape[k] == c[k] for k in ("depth", "hidden_size", "patch_size"))), None)


def describe_dit(shape):
    """One line a user can act on: which model, image size and label table a DiT fits."""
    side, name = shape["input_size"], dit_name(shape) or "a DiT of another shape"
    size = ("any image size" if side is None else f"{side * 8} px images"
            if shape["in_channels"] == 4 else f"{side} px in pixel space")
    return (f"{name} (depth {shape['depth']}, hidden {shape['hidden_size']}, patch "
            f"{shape['patch_size']}), {size}, {shape['table_rows']} label rows (ImageNet's: 1000 + "
            f"null), {'affine' if shape['norm_affine'] else 'plain'} LayerNorms")


def load_dit_weights(model, state_dict, source="the checkpoint"):
    """load_checked, its errors saying what the file fits; pos_embed (fixed) is ours if off-grid."""
    if state_dict.get("pos_embed", model.pos_embed[:0]).shape != model.pos_embed.shape:
        state_dict = {**state_dict, "pos_embed": model.pos_embed.detach()}
    try:
        fits = f"The file holds {describe_dit(read_dit_shape(state_dict))}."
    except (ValueError, KeyError):
        fits = "The file is not a DiT checkpoint."
    return load_checked(model, state_dict, source, fits + " " + DIT_SOURCE)


def load_dit(checkpoint, source=None, input_size=None, class_to_superclass=None, num_heads=None,
             weights="ema"):
    """Any DiT in a file (a path, or contents read from `source`), resized to input_size."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source, checkpoint = checkpoint, load_state_dict_file(checkpoint)
    state_dict = dit_state_dict(checkpoint, weights)
    config = read_dit_shape(state_dict, source)
    rows, parents = config.pop("table_rows"), class_to_superclass  # the rest: DiT's arguments
    config.update(input_size=config["input_size"] or input_size,
                  num_heads=num_heads or config["num_heads"])
    if not config["input_size"]:
        raise ValueError(f"{source} has no pos_embed, so its grid is unknown: give the input size")
    if config["hidden_size"] % config["num_heads"]:
        raise ValueError(f"{source}: its width {config['hidden_size']} does not split into "
                         f"{config['num_heads']} heads (DiT-XL/2: 16 heads of 72)")
    if not config["norm_affine"]:  # official DiT: classes + the null row
        config.update(num_classes=rows - 1)
    elif parents is None or rows - len(parents) < superclass_count(parents):
        given = "" if parents is None else f" (not one of {len(parents)} classes)"
        raise ValueError(f"{source}: a FineDiffusion table of {rows} rows (classes, superclasses); "
                         f"its class list is needed{given}: a hierarchy JSON or train_mini.json")
    else:  # official FineDiffusion: [fine | superclass] rows, no null row
        config.update(num_classes=len(parents), num_superclasses=rows - len(parents),
                      class_to_superclass=parents, null_row=False)
    return load_dit_weights(DiT(**config), state_dict, source).resize(input_size)


# -------------------------------------------------------------------------------------------------
# The SD VAE (sd-vae-ft-ema, sd-vae-ft-mse) from diffusers files

SD_VAE_SOURCE = ("Get the Stable Diffusion VAE from https://huggingface.co/stabilityai/sd-vae-ft-"
                 "ema or sd-vae-ft-mse: diffusion_pytorch_model.safetensors (.bin), config.json.")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load_vae_state_dict(vae, state_dict, source="state dict"):
    """load_checked for a VAE (on meta: it takes the tensors), older diffusers' names renamed."""
    legacy = re.compile(r"(\battentions\b.*\.)(query|key|value|proj_attn)(\.[^.]*)$")
    renamed = {legacy.sub(lambda m: m[1] + LEGACY_ATTENTION_NAMES[m[2]] + m[3], key): value
               for key, value in state_dict.items()}
    return load_checked(vae, renamed, source, SD_VAE_SOURCE, assign=next(vae.parameters()).is_meta)


def load_vae(path, device="cpu"):
    """A diffusers VAE folder or weights file, configured by a config.json beside it, else SD's."""
    names = ([os.path.join(path, f"diffusion_pytorch_model.{e}") for e in ("safetensors", "bin")]
             if os.path.isdir(path) else [path])
    if (weights := next(filter(os.path.isfile, names), None)) is None:
        raise FileNotFoundError(f"no VAE at {path}. {SD_VAE_SOURCE}")
    config_path = os.path.join(os.path.dirname(weights), "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    state_dict = load_state_dict_file(weights)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights} does not hold a state dict. {SD_VAE_SOURCE}")
    with torch.device("meta"):  # no random init: every parameter comes from the file
        vae = AutoencoderKL.from_config(config)
    return load_vae_state_dict(vae, state_dict, weights).to(device, torch.float32).eval()


# -------------------------------------------------------------------------------------------------
# The checkpoint format of train.py: the one place that knows its keys

FORMAT = 2  # 1: the unversioned files of the first versions, refused with a message
WEIGHTS_HELP = ("which weights of a training checkpoint: ema, their moving average (what the "
                "papers sample; early in a fine-tune mostly the base), or raw, the trained values")


@dataclasses.dataclass
class Checkpoint:
    """A train.py checkpoint: on disk a dict of these fields and `format`; the last four resume."""
    method: str  # a key of peft.METHODS
    options: dict  # peft.prepare()'s keyword arguments (class_to_superclass, p_parent, ...)
    dit: dict  # the base's architecture: DiT(**dit) (DiT.config)
    base: dict  # {path, sha256} of the base checkpoint; None where the file holds every tensor
    hierarchy: dict  # data.Hierarchy.to_dict()
    vae: str  # the VAE (a path) whose latent space the model works in; None: pixel space
    data: dict  # what it trained on: {kind, path, split, image_size, hflip}
    model: dict  # {name: tensor} of every parameter the method trains
    ema: dict  # the same names: their exponential moving average in float32
    step: int  # optimizer steps taken
    optimizer: dict = None  # the AdamW state dict
    scaler: dict = None  # the fp16 GradScaler state dict
    rng: list = None  # every rank's RNG states: [{cpu, cuda}] in rank order
    settings: dict = None  # train.py's flags, {name: value}

    def tensors(self, weights="ema"):
        return self.ema if weights == "ema" else self.model


def save_checkpoint(path, checkpoint):
    contents = dict(format=FORMAT, **vars(checkpoint))  # vars: no copy of the tensors
    try:
        write_atomically(path, lambda f: torch.save(contents, f), nbytes(contents))
    except OSError as e:
        raise OSError(f"{e}; earlier checkpoints are untouched: free space and resume") from None


def nbytes(contents):
    if isinstance(contents, (dict, list, tuple)):
        return sum(map(nbytes, contents.values() if isinstance(contents, dict) else contents))
    return contents.numel() * contents.element_size() if torch.is_tensor(contents) else 0


def as_checkpoint(contents, source):
    """What torch.load read -> Checkpoint, or None when it is no checkpoint of train.py."""
    if not (isinstance(contents, dict) and "method" in contents):
        return None
    if contents.get("format", 1) != FORMAT:
        raise ValueError(f"{source} is a train.py checkpoint of format {contents.get('format', 1)}"
                         f"; this version reads format {FORMAT} only: use the one that wrote it")
    names = [f.name for f in dataclasses.fields(Checkpoint)]
    if missing := [name for name in names if name not in contents]:
        raise ValueError(f"{source} is an incomplete train.py checkpoint: it lacks {missing}")
    return Checkpoint(**{name: contents[name] for name in names})


def read_checkpoint(path):
    if (checkpoint := as_checkpoint(load_state_dict_file(path), path)) is None:
        raise ValueError(f"{path} is not a checkpoint of train.py")
    return checkpoint


def load_base(path, input_size=None, num_heads=None):
    model, _ = load_model(path, input_size=input_size, num_heads=num_heads)
    return model, dict(path=os.path.abspath(path), sha256=fingerprint(model.state_dict()))


def load_model(path, base=None, class_to_superclass=None, input_size=None, num_heads=None,
               weights="ema", merged=True):
    """Any checkpoint -> (model, Checkpoint or None); train.py's: base, prepare, tensors, merge."""
    if (checkpoint := as_checkpoint(contents := load_state_dict_file(path), path)) is None:
        model = load_dit(contents, path, input_size, class_to_superclass, num_heads, weights)
        return finite(model, path), None
    dit = checkpoint.dit
    if num_heads and num_heads != dit["num_heads"]:
        raise ValueError(f"{path} records its model's {dit['num_heads']} attention heads, and "
                         f"{num_heads} were asked for: leave the heads unset for this file")
    if checkpoint.base is None:
        model = DiT(**dit)
    else:
        base, recorded = base or checkpoint.base["path"], checkpoint.base
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{path} needs its base {base}, which is not there (moved?): "
                                    f"give it: sample.py --base; train.py --resume with --ckpt")
        model, found = load_base(base, dit["input_size"], dit["num_heads"])
        if found["sha256"] != recorded["sha256"] or model.config != dit:
            raise ValueError(f"{base} is not the base {path} was trained on ({recorded['path']}, "
                             f"sha256 {recorded['sha256'][:16]}..., not {found['sha256'][:16]}...)")
    prepare(model, checkpoint.method, **checkpoint.options)
    tensors, expected = checkpoint.tensors(weights), set(trainable_state_dict(model))
    if (keys := set(tensors)) != expected:
        raise ValueError(f"{path}: its tensors do not match method {checkpoint.method}: missing "
                         f"{sorted(expected - keys)[:5]}, unexpected {sorted(keys - expected)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return finite(merge(model) if merged else model, path).resize(input_size), checkpoint


def finite(model, path):
    if bad := [name for name, t in model.state_dict().items()
               if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or infinite values ({bad[0]}, "
                         f"...; saved after training diverged?): take an earlier checkpoint")
    return model


def read_label_table(path, weights="ema"):
    """(label table (rows, D), hierarchy dict or None) of any checkpoint, without its model."""
    contents = load_state_dict_file(path)
    checkpoint, state_dict = as_checkpoint(contents, path), dit_state_dict(contents, weights)
    if not isinstance(state_dict, dict) or LABEL_TABLE_KEY not in state_dict:
        raise ValueError(f"{path} holds no {LABEL_TABLE_KEY}: it is no checkpoint of train.py, "
                         f"no official FineDiffusion checkpoint and no DiT state dict")
    return state_dict[LABEL_TABLE_KEY].float(), checkpoint and checkpoint.hierarchy


def rng_states(world_size):
    """Every rank's RNG states (CPU and CUDA), gathered so that one file resumes all exactly."""
    state = dict(cpu=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    states = [state] * world_size
    if world_size > 1:
        dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world_size, seed):
    """This rank's saved random streams -> whether the run goes on bit-exactly (else `seed`'s)."""
    if len(states) != world_size:
        torch.manual_seed(seed * world_size + rank)
        return False
    torch.set_rng_state(states[rank]["cpu"])
    if torch.cuda.is_available() and states[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[rank]["cuda"])
    return True


# -------------------------------------------------------------------------------------------------
# Run folders: the one place that knows their layout

def create_run_folder(results_dir, name):
    """results_dir/NNN-name, NNN one above the highest there (exclusive mkdir: none is shared)."""
    os.makedirs(results_dir, exist_ok=True)
    while True:
        taken = [int(e.split("-")[0]) for e in os.listdir(results_dir) if e.split("-")[0].isdigit()]
        run_dir = os.path.join(results_dir, f"{max(taken, default=-1) + 1:03d}-{name}")
        try:
            os.mkdir(run_dir)
        except FileExistsError:  # another process took this number: look again
            continue
        os.mkdir(os.path.join(run_dir, CHECKPOINTS_DIR))
        return run_dir


def checkpoint_file(run_dir, step):
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"{step:07d}.pt")


def saved_checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), CHECKPOINTS_DIR, "*.pt")))


def run_folder(path):
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == CHECKPOINTS_DIR else None


def run_names(results_dir):
    listed = os.listdir(results_dir) if os.path.isdir(results_dir) else []
    return [e for e in listed if e.split("-", 1)[0].isdigit() and "-" in e]


def named_runs(name, results_dir="results"):
    runs = sorted((e for e in run_names(results_dir) if e.split("-", 1)[1] == name),
                  key=lambda e: -int(e.split("-", 1)[0]))
    return [run for e in runs if saved_checkpoints(run := os.path.join(results_dir, e))]


def find_checkpoint(path=None, results_dir="results"):
    """A file; a run folder or name (newest NNN-<name>) -> its last checkpoint; None: the newest."""
    if path is None:
        found = glob.glob(os.path.join(glob.escape(results_dir), "*", CHECKPOINTS_DIR, "*.pt"))
        if not found:
            raise FileNotFoundError(f"no checkpoint under {results_dir}/: run toy.py or give one")
        return max(found, key=os.path.getmtime)
    if not os.path.exists(path):
        if not (runs := named_runs(path, results_dir)):
            names = sorted({e.split("-", 1)[1] for e in run_names(results_dir)})
            close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
            hint = (f"; did you mean {', '.join(close)}?" if close
                    else f" (its runs: {', '.join(names[:8]) or 'none'})")
            raise FileNotFoundError(f"{path}: no checkpoint file, run folder or run name with a "
                                    f"checkpoint in {results_dir}/{hint}")
        path = runs[0]
    if not os.path.isdir(path):
        return path
    if not (saved := saved_checkpoints(path)):
        raise FileNotFoundError(f"{path} holds no checkpoint ({CHECKPOINTS_DIR}/*.pt): not a run "
                                f"folder of train.py, or a run stopped before its first checkpoint")
    return saved[-1]


def continued_run(resume):
    """The run a resume from its newest checkpoint writes on in; None: it branches to a new run."""
    folder = run_folder(resume)
    return folder if folder and os.path.samefile(find_checkpoint(folder), resume) else None


def lock_run(folder):
    return Lock(os.path.join(folder, LOCK_FILE), f"the run {folder}")


def open_run(results_dir, name, resume=None):
    """The Lock (.path: folder/lock) of the run a resume continues (temporaries removed), or new."""
    if resume and (folder := continued_run(resume)):
        lock = lock_run(folder)
        if continued_run(resume) == folder:  # still its newest, now that no one else writes there
            remove_temporaries(os.path.join(glob.escape(folder), CHECKPOINTS_DIR, "*.tmp"))
            return lock
        lock.release()
    return lock_run(create_run_folder(results_dir, name))


class RunLog:
    """Rank 0's messages to the terminal and log.txt, its metrics as JSON lines to metrics.jsonl."""
    def __init__(self, run_dir, rank):
        names = (LOG_FILE, METRICS_FILE) if rank == 0 else ()
        self.files = [open(os.path.join(run_dir, n), "a") for n in names]

    def __call__(self, message, **metrics):
        if self.files:
            tqdm.write(message)  # above a progress bar, if one runs
            for file, line in zip(self.files, [message, json.dumps(metrics)][:1 + bool(metrics)]):
                print(line, file=file, flush=True)


def read_metrics(run):
    """A run folder -> its logged steps, {step, loss, steps_per_s, images_per_s, lr, method}."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run} is not a train.py run folder: it has no {METRICS_FILE}")
    with open(path) as f:
        return [json.loads(line) for line in f]
