"""
The fine-tuning methods compared in the FineDiffusion, DiffFit and DiffScaler papers, on a pre-trained DiT, and
the checkpoint format and run folders of train.py, whose one owner this file is.

    full           every parameter trains
    bitfit         biases + the label table                          (Ben Zaken et al. 2021)
    difffit        bitfit + norms + scale factors gamma (init 1.0)   (DiffFit, Xie et al. 2023, Table 4 row 8)
    finediffusion  TieredEmbedder + biases + LayerNorm scale/offset  (FineDiffusion, Pan et al. 2024)
    lora           low-rank B A on the attention projections         (Hu et al. 2021)
    diffscaler     the Affiner on attention, MLP and adaLN linears   (DiffScaler, Nair et al. 2024, Eq. 5)

METHODS is the table: one entry per method says how its label table is laid out, what it adds to the DiT, which
parameters train and at what learning rate. `prepare(model, method, class_to_superclass)` applies an entry.
What a method adds lives in small nn.Linear subclasses that keep the official key names
(`blocks.3.attn.qkv.weight` stays) and fold back into plain linears with `merge(model)`. A checkpoint of a method
that freezes part of the base holds only what trained, plus what it takes to rebuild the model on its base.
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import LABEL_TABLE_KEY, DiT, TieredEmbedder, dit_name, dit_state_dict, load_dit, load_state_dict_file

DIFFFIT_BLOCKS = 14  # DiffFit Table 4b: gammas in blocks 1..14 of DiT-XL/2's 28

# -----------------------------------------------------------------------------------------------------------
# Linear layers with a method's extra parameters. Each keeps the pretrained `weight` and `bias` under their
# own names and can fold its extras back into a plain nn.Linear.


class AdaptedLinear(nn.Linear):
    """A pretrained nn.Linear (same weight and bias tensors, same keys) that a method extends."""

    def __init__(self, linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def merged(self):
        """A plain nn.Linear computing the same function (exactly, up to float rounding)."""
        weight, bias = self.merged_weight_and_bias()
        linear = nn.Linear(self.in_features, self.out_features, device=weight.device, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        linear.bias.data.copy_(bias)
        return linear


class ScaledLinear(AdaptedLinear):
    """DiffFit: y = gamma * (W x + b), gamma initialized to 1 (DiffFit Algorithm 1)."""

    def __init__(self, linear):
        super().__init__(linear)
        self.gamma = nn.Parameter(torch.ones_like(linear.bias))

    def forward(self, x):
        return self.gamma * F.linear(x, self.weight, self.bias)

    def merged_weight_and_bias(self):
        return self.gamma[:, None] * self.weight, self.gamma * self.bias


class LoRALinear(AdaptedLinear):
    """LoRA: y = W x + b + B A x (alpha = r), B zero-initialized so training starts at the pretrained model."""

    def __init__(self, linear, rank):
        super().__init__(linear)
        self.lora_A = nn.Parameter(linear.weight.new_empty(rank, self.in_features))
        self.lora_B = nn.Parameter(linear.weight.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight_and_bias(self):
        return self.weight + self.lora_B @ self.lora_A, self.bias


class Affiner(AdaptedLinear):
    """
    DiffScaler's Affiner (Eq. 5): y = (1 + a) W x + s W_up ReLU(W_down x) + b_hat + b, with a, b per output
    unit starting at 0 (the layer is unchanged), the scalar s starting at 0 and W_down, W_up Kaiming-normal.
    The ReLU branch is not linear, so merging folds a and b into W and b_hat and keeps the small branch.
    """

    def __init__(self, linear, rank):
        super().__init__(linear)
        self.affine_scale = nn.Parameter(torch.zeros_like(linear.bias))  # a
        self.affine_shift = nn.Parameter(torch.zeros_like(linear.bias))  # b (b_hat is the frozen bias)
        self.adapter_scale = nn.Parameter(linear.bias.new_zeros(()))  # s
        self.down = nn.Parameter(nn.init.kaiming_normal_(linear.weight.new_empty(rank, self.in_features)))
        self.up = nn.Parameter(nn.init.kaiming_normal_(linear.weight.new_empty(self.out_features, rank)))

    def forward(self, x):
        y = (1 + self.affine_scale) * F.linear(x, self.weight) + self.bias + self.affine_shift  # DiffScaler Eq. 3
        return y + self.adapter_scale * F.linear(F.relu(F.linear(x, self.down)), self.up)  # DiffScaler Eq. 4

    def merged(self):
        merged = Affiner(super().merged(), self.down.shape[0])
        merged.down, merged.up, merged.adapter_scale = self.down, self.up, self.adapter_scale
        return merged

    def merged_weight_and_bias(self):
        return (1 + self.affine_scale)[:, None] * self.weight, self.bias + self.affine_shift


# -----------------------------------------------------------------------------------------------------------
# What each method adds to a DiT


def add_norm_affine(model):
    """FineDiffusion: DiT's affine-free LayerNorms get a scale (1) and offset (0), the identity: outputs unchanged."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is None:
            ref = model.pos_embed
            module.weight = nn.Parameter(ref.new_ones(module.normalized_shape))
            module.bias = nn.Parameter(ref.new_zeros(module.normalized_shape))
            module.elementwise_affine = True


def adapt_linears(model, names, wrap):
    """Replace the nn.Linear at each dotted `name` by wrap(linear)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child)))


def add_difffit_gammas(model):
    """DiffFit Table 4c row 8: gammas on the attention and MLP branches of blocks 1..14, every QKV, the final layer."""
    depth = len(model.blocks)
    branches = [f"blocks.{i}.{n}" for i in range(min(DIFFFIT_BLOCKS, depth)) for n in ("attn.proj", "mlp.fc2")]
    qkv = [f"blocks.{i}.attn.qkv" for i in range(depth)]
    adapt_linears(model, branches + qkv + ["final_layer.linear"], ScaledLinear)


def add_lora(model, lora_rank):
    """LoRA on the attention projections (qkv and proj) of every block."""
    names = [f"blocks.{i}.attn.{n}" for i in range(len(model.blocks)) for n in ("qkv", "proj")]
    adapt_linears(model, names, lambda linear: LoRALinear(linear, lora_rank))


def add_affiners(model, affiner_rank):
    """DiffScaler 4.3: an Affiner on every attention and MLP linear, and on the adaLN layers."""
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks))
             for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    adapt_linears(model, names + ["final_layer.adaLN_modulation.1"], lambda linear: Affiner(linear, affiner_rank))


# -----------------------------------------------------------------------------------------------------------
# The methods, one entry each. A parameter's name decides whether it trains: the added parameters are named for
# their method (gamma, lora_A, ...), and every method learns the new classes' label rows (y_embedder.*).


@dataclasses.dataclass(frozen=True)
class Method:
    summary: str  # what trains
    lr: float  # the suggested learning rate
    trains: Callable[[str], bool]  # the method's rule: does the parameter of this name train?
    adds: Callable = None  # adds(model, **options): what the method adds to a DiT
    options: dict = dataclasses.field(default_factory=dict)  # the method's own options, with their defaults
    tiered: bool = False  # label table [fine | superclass] (FineDiffusion, no null row), else [fine | null]
    label_init: str = "normal"  # new rows N(0, 0.02) as the official FineDiffusion; "null": the pretrained null row
    delta: bool = True  # it freezes part of the base, so its checkpoints hold only what trained


def leaf(name):
    return name.rsplit(".", 1)[-1]


def is_label_row(name):
    return name.startswith("y_embedder.")


def is_bias(name):
    return leaf(name) == "bias"


def is_norm(name):
    return ".norm" in name  # LayerNorm scale/offset, where the model has them (DiT's own LayerNorms have none)


AFFINER_PARAMETERS = ("affine_scale", "affine_shift", "adapter_scale", "down", "up")
# FineDiffusion trains at the pre-training lr; DiffFit (Table 4d) finds 10x best for parameter-efficient methods.
METHODS = {
    "full": Method("everything", 1e-4, trains=lambda name: True, delta=False),
    "bitfit": Method("every bias + the label table", 1e-3,
                     trains=lambda name: is_label_row(name) or is_bias(name)),
    "difffit": Method("bitfit + norms + gammas (init 1) on attention/MLP branches of blocks 1..14, every QKV, "
                      "the final layer", 1e-3, adds=add_difffit_gammas,
                      trains=lambda name: (is_label_row(name) or is_bias(name) or is_norm(name)
                                           or leaf(name) == "gamma")),
    "finediffusion": Method("TieredEmbedder (fine + superclass rows) + every bias + LayerNorm scale/offset "
                            "(added, identity)", 1e-4, adds=add_norm_affine, tiered=True,
                            trains=lambda name: is_label_row(name) or is_bias(name) or is_norm(name)),
    "lora": Method("rank-r B·A on attention qkv and proj (B = 0) + the label table", 1e-3, adds=add_lora,
                   options=dict(lora_rank=8), trains=lambda name: is_label_row(name) or leaf(name).startswith("lora_")),
    "diffscaler": Method("Affiner (1+a)Wx + s·W_up relu(W_down x) + b_hat + b on qkv, proj, fc1, fc2 and adaLN "
                         "linears; new rows = the null embedding", 1e-3, adds=add_affiners,
                         options=dict(affiner_rank=64), label_init="null",
                         trains=lambda name: is_label_row(name) or leaf(name) in AFFINER_PARAMETERS),
}
FIXED = ("pos_embed",)  # a fixed function of the grid: no method trains it


def replace_label_table(model, class_to_superclass, num_superclasses, null_row, init="normal", p_parent=0.1):
    """
    New label rows for the target classes (the ImageNet rows do not transfer). init "normal": N(0, 0.02) as the
    official FineDiffusion code; "null": every new row a copy of the pretrained null embedding (DiffScaler 3.1).
    A new null row always starts as the pretrained one, so unconditional predictions are kept.
    """
    old = model.y_embedder
    table = old.embedding_table.weight
    new = TieredEmbedder(len(class_to_superclass), table.shape[1], p_parent, class_to_superclass, num_superclasses,
                         null_row)
    new = new.to(device=table.device, dtype=table.dtype)
    with torch.no_grad():
        if init == "null":
            new.embedding_table.weight.copy_(table[old.null_index].expand_as(new.embedding_table.weight))
        else:
            nn.init.normal_(new.embedding_table.weight, std=0.02)
        if null_row:
            new.embedding_table.weight[new.null_index] = table[old.null_index]
    model.y_embedder = new


def base_problem(model, method):
    """Why `method` cannot fine-tune this base, or None: a null row of the new table (every method but
    FineDiffusion's) starts as the base's, which a base with a tiered table has not."""
    spec = METHODS[method]
    if (not spec.tiered or spec.label_init == "null") and model.y_embedder.null_index is None:
        return (f"{method} starts its null label row from the base's, and this base has none: its table is a tiered "
                f"one (fine + superclass rows, as FineDiffusion trains). Fine-tune a base with a null row, such as an "
                f"ImageNet DiT, or use --method finediffusion")
    return None


def prepare(model, method, class_to_superclass, num_superclasses=None, p_parent=0.1, **options):
    """
    Turn a pre-trained DiT (weights loaded) into `method`'s trainable model for the target classes: the superclass
    (0..S-1) of every fine class, S = num_superclasses (default: the largest id + 1). FineDiffusion's table adds a
    row per superclass (the parents of Eq. 1) and, like the official code, no null row; the other methods keep a
    null row for ordinary classifier-free guidance. `options`: the method's own (METHODS[method].options).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"{method} has no option {sorted(unknown)}; its options: {spec.options or 'none'}")
    if num_superclasses is None:
        num_superclasses = max(class_to_superclass, default=-1) + 1
    if spec.tiered and not num_superclasses:
        raise ValueError(f"{method} needs the class hierarchy (the superclass of every fine class)")
    if problem := base_problem(model, method):
        raise ValueError(problem)
    replace_label_table(model, class_to_superclass, num_superclasses if spec.tiered else 0, null_row=not spec.tiered,
                        init=spec.label_init, p_parent=p_parent)
    if spec.adds is not None:
        spec.adds(model, **{**spec.options, **options})
    for name, param in model.named_parameters():
        param.requires_grad_(name not in FIXED and spec.trains(name))
    return model


def merge(model):
    """Fold every method's extra parameters into plain linears: a fine-tuned model that samples as fast as DiT."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)]
    adapt_linears(model, adapted, lambda linear: linear.merged())
    return model


# -----------------------------------------------------------------------------------------------------------
# Parameter accounting


def count_parameters(model):
    """(total, trainable); the total counts the fixed positional embedding, as the official code does."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def trainable_state_dict(model):
    """Only what the method trained: what a checkpoint holds."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def parameter_table(dit_config, class_to_superclass, options=None):
    """Rows of (method, total, trainable, percent, delta MiB at fp32) for every method, built on `meta`; `options`:
    {method: prepare()'s keyword arguments} where a run used its own (a LoRA rank, ...)."""
    rows = []
    for method in METHODS:
        with torch.device("meta"):
            model = prepare(DiT(**dit_config), method,
                            **(options or {}).get(method, dict(class_to_superclass=class_to_superclass)))
        total, trainable = count_parameters(model)
        rows.append((method, total, trainable, 100 * trainable / total, trainable * 4 / 2**20))
    return rows


# -----------------------------------------------------------------------------------------------------------
# The checkpoint format: the one place that knows its keys

CHECKPOINT_FORMAT = 2  # 1: the unversioned files of earlier versions


@dataclasses.dataclass
class Checkpoint:
    """
    A checkpoint of train.py. On disk: a dict of these fields and `format`, plain data and tensors only, so
    torch.load(weights_only=True) reads it.
        method     a key of METHODS
        options    prepare()'s keyword arguments: class_to_superclass, num_superclasses, p_parent, the method's options
        dit        the base's architecture, DiT(**dit) (model.DiT.config)
        base       None when the file holds every trained tensor (full fine-tuning, training from scratch); else
                   {path, sha256}: where the base checkpoint was and base_fingerprint of it
        hierarchy  data.Hierarchy.to_dict(): class names, superclass names, the fine -> superclass map
        vae        the VAE (a path) whose latent space the model works in, or None: pixel space
        data       what it trained on: {kind, path, split, image_size, hflip (mirrored copies or not)}
        model      {name: tensor} of every parameter the method trains
        ema        the same names: their exponential moving average in float32, what sampling uses
        step       optimizer steps taken
      and what --resume needs (None in a checkpoint made for sampling only):
        optimizer  the AdamW state dict
        scaler     the fp16 GradScaler state dict
        rng        every rank's RNG states: [{cpu, cuda}] in rank order
        settings   train.py's flags, {name: value}
    """
    method: str
    options: dict
    dit: dict
    base: dict
    hierarchy: dict
    vae: str
    data: dict
    model: dict
    ema: dict
    step: int
    optimizer: dict = None
    scaler: dict = None
    rng: list = None
    settings: dict = None

    def tensors(self, weights="ema"):
        """The trained tensors to use: "ema", their moving average (what sampling uses by default), or "raw"."""
        return self.ema if weights == "ema" else self.model


def is_train_checkpoint(contents):
    return isinstance(contents, dict) and "method" in contents


def save_checkpoint(path, checkpoint):
    """Write a Checkpoint atomically: into a temporary file of this process, then renamed (a kill never tears it)."""
    contents = dict(format=CHECKPOINT_FORMAT, **{f.name: getattr(checkpoint, f.name)
                                                 for f in dataclasses.fields(Checkpoint)})
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(contents, tmp)
    os.replace(tmp, path)


def as_checkpoint(contents, source):
    """What torch.load read from a train.py checkpoint -> Checkpoint, with the format checked."""
    version = contents.get("format", 1)
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"{source} is a train.py checkpoint of format {version}; this version reads format "
                         f"{CHECKPOINT_FORMAT} only: sample or resume it with the version of this repository that "
                         f"wrote it, or train again")
    names = [f.name for f in dataclasses.fields(Checkpoint)]
    missing = [name for name in names if name not in contents]
    if missing:
        raise ValueError(f"{source} is an incomplete train.py checkpoint: it lacks {missing}")
    return Checkpoint(**{name: contents[name] for name in names})


WEIGHTS_HELP = ("which weights of a training checkpoint (ours, or official {model, ema}): ema, their moving average "
                "(what the papers sample), or raw, the trained values themselves. Early in a short fine-tune the EMA "
                "is still mostly the base model")


def read_checkpoint(path):
    """A train.py checkpoint file -> Checkpoint."""
    contents = load_state_dict_file(path)
    if not is_train_checkpoint(contents):
        raise ValueError(f"{path} is not a checkpoint of train.py")
    return as_checkpoint(contents, path)


def base_fingerprint(model):
    """sha256 of every tensor of a base model (names, shapes and bytes), streamed: a few seconds for DiT-XL/2."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_base(path, input_size=None, num_heads=None, name=None):
    """A base to fine-tune from any DiT file or train.py checkpoint (adapters merged) -> (model, its identity)."""
    model, _ = load_model(path, input_size=input_size, num_heads=num_heads, name=name)
    merge(model)
    return model, dict(path=os.path.abspath(path), sha256=base_fingerprint(model))


def rebuild(checkpoint, base=None, weights="ema"):
    """
    The fine-tuned model a Checkpoint describes: its base (loaded from `base` or the path it recorded, checked
    against its fingerprint) or a fresh DiT(**dit) when the file holds every trained tensor, then prepare(method),
    then the trained tensors (`weights`: "ema", their moving average, or "raw", the trained values themselves).
    """
    if checkpoint.base is None:
        model = DiT(**checkpoint.dit)
    else:
        path = base or checkpoint.base["path"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"this {checkpoint.method} checkpoint holds only what it trained, on top of its "
                                    f"base {path}, which is not there: pass the base checkpoint with --base")
        model, identity = load_base(path, checkpoint.dit["input_size"], checkpoint.dit["num_heads"])
        if identity["sha256"] != checkpoint.base["sha256"] or model.config != checkpoint.dit:
            raise ValueError(f"{path} is not the base this checkpoint was trained on (that was "
                             f"{checkpoint.base['path']}, sha256 {checkpoint.base['sha256'][:16]}...; the given one "
                             f"has {identity['sha256'][:16]}...): pass the base it names with --base")
    model = prepare(model, checkpoint.method, **checkpoint.options)
    tensors, expected = checkpoint.tensors(weights), set(trainable_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(f"the checkpoint's tensors do not match method {checkpoint.method}: missing "
                         f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model


def load_model(path, base=None, class_to_superclass=None, input_size=None, num_heads=None, name=None, weights="ema"):
    """
    Any checkpoint -> (model, Checkpoint or None). A train.py checkpoint is rebuilt (its `weights`, "ema" or "raw",
    on its base: `base` overrides the recorded path); any other DiT file (official DiT, official FineDiffusion,
    safetensors) is loaded by model.load_dit. The model is not merged: merge(model) before sampling.
    """
    path = checkpoint_path(path)
    contents = load_state_dict_file(path)
    if not is_train_checkpoint(contents):
        return load_dit(contents, path, input_size, class_to_superclass, num_heads, name, weights), None
    checkpoint = as_checkpoint(contents, path)
    if name is not None and dit_name(checkpoint.dit) != name:
        raise ValueError(f"{path} holds {dit_name(checkpoint.dit) or 'a DiT of another shape'}, not --model {name}")
    return rebuild(checkpoint, base, weights).resize(input_size), checkpoint


def read_label_table(path, weights="ema"):
    """(label table (rows, D), hierarchy dict or None) of any checkpoint, its "ema" or "raw" weights, without
    building its model."""
    path = checkpoint_path(path)
    contents = load_state_dict_file(path)
    if is_train_checkpoint(contents):
        checkpoint = as_checkpoint(contents, path)
        return checkpoint.tensors(weights)[LABEL_TABLE_KEY].float(), checkpoint.hierarchy
    state_dict = dit_state_dict(contents, weights)
    if not isinstance(state_dict, dict) or LABEL_TABLE_KEY not in state_dict:
        raise ValueError(f"{path} holds no {LABEL_TABLE_KEY}: pass a checkpoint of train.py, an official "
                         f"FineDiffusion checkpoint or a DiT state dict")
    return state_dict[LABEL_TABLE_KEY].float(), None


# -----------------------------------------------------------------------------------------------------------
# Run folders: results/NNN-<name>/ holds checkpoints/<step, 7 digits>.pt, log.txt, metrics.jsonl (one JSON object
# per logged step) and samples/. The one place that knows this layout.

CHECKPOINTS_DIR, SAMPLES_DIR, METRICS_FILE = "checkpoints", "samples", "metrics.jsonl"


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


def interrupted_saves(run_dir):
    """The glob pattern of the temporaries save_checkpoint leaves in a run folder when a kill interrupts it."""
    return os.path.join(glob.escape(run_dir), CHECKPOINTS_DIR, "*.pt.*.tmp")


def run_folder(checkpoint):
    """The run folder a checkpoint file lies in, or None outside one."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(folder) if os.path.basename(folder) == CHECKPOINTS_DIR else None


def named_runs(name, results_dir="results"):
    """The run folders results_dir/NNN-<name>, newest (highest number) first."""
    if not os.path.isdir(results_dir):
        return []
    runs = [e for e in os.listdir(results_dir) if e.split("-", 1)[0].isdigit() and e.split("-", 1)[1:] == [name]]
    return [os.path.join(results_dir, e) for e in sorted(runs, key=lambda e: -int(e.split("-", 1)[0]))]


def newest_checkpoint(results_dir="results"):
    """The checkpoint written last by any run in results_dir, or None."""
    found = [path for run in glob.glob(os.path.join(glob.escape(results_dir), "*")) for path in saved_checkpoints(run)]
    return max(found, key=os.path.getmtime, default=None)


def checkpoint_path(path, results_dir="results"):
    """A checkpoint file; or a run folder, or a run's name (its --run-name or model-method: the newest
    results_dir/NNN-<name>) -> its newest checkpoint (the highest step)."""
    if not os.path.exists(path):
        path = next(iter(named_runs(path, results_dir)), path)
    if os.path.isdir(path):
        saved = saved_checkpoints(path)
        if not saved:
            raise FileNotFoundError(f"{path} is a folder but no run folder of train.py: it has no "
                                    f"{CHECKPOINTS_DIR}/*.pt")
        return saved[-1]
    return path


def read_metrics(run):
    """A run folder -> its logged steps, each {step, loss, steps_per_s, images_per_s, lr, method}."""
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run} is not a train.py run folder: it has no {METRICS_FILE}")
    with open(path) as f:
        return [json.loads(line) for line in f]
