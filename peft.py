"""
The fine-tuning methods compared in the FineDiffusion, DiffFit and DiffScaler papers, on a pre-trained DiT.

    full           every parameter trains
    bitfit         biases + the label table                          (Ben Zaken et al. 2021)
    difffit        bitfit + norms + scale factors gamma (init 1.0)   (DiffFit, Xie et al. 2023, Table 4 row 8)
    finediffusion  TieredEmbedder + biases + LayerNorm scale/offset  (FineDiffusion, Pan et al. 2024)
    lora           low-rank B A on the attention projections         (Hu et al. 2021)
    diffscaler     the Affiner on attention, MLP and adaLN linears   (DiffScaler, Nair et al. 2024, Eq. 5)

METHODS, first below, is the table: one entry per method says how its label table is laid out, what it adds to the
DiT, which parameters train (a rule on their names) and at what learning rate. `prepare(model, method,
class_to_superclass)` applies an entry. What a method adds lives in small nn.Linear subclasses that keep the
official key names (`blocks.3.attn.qkv.weight` stays) and fold back into plain linears with `merge(model)`.
"""
import dataclasses
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DiT, TieredEmbedder

DIFFFIT_BLOCKS = 14  # DiffFit Table 4b: gammas in blocks 1..14 of DiT-XL/2's 28

# -----------------------------------------------------------------------------------------------------------
# The methods, one entry each. A parameter's name decides whether it trains: the added parameters are named for
# their method (gamma, lora_A, ...), and every method learns the new classes' label rows (y_embedder.*). What a
# method adds to the DiT is written out below the table.

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
    "full": Method(
        "everything", 1e-4, delta=False,
        trains=lambda name: True),
    "bitfit": Method(
        "every bias + the label table", 1e-3,
        trains=lambda name: is_label_row(name) or is_bias(name)),
    "difffit": Method(
        "bitfit + norms + gammas (init 1) on attention/MLP branches of blocks 1..14, every QKV, the final layer", 1e-3,
        adds=lambda model: add_difffit_gammas(model),
        trains=lambda name: is_label_row(name) or is_bias(name) or is_norm(name) or leaf(name) == "gamma"),
    "finediffusion": Method(  # FineDiffusion Sec. 3.2.1: TieredEmbedder, biases, norms
        "TieredEmbedder (fine + superclass rows) + every bias + LayerNorm scale/offset (added, identity)", 1e-4,
        tiered=True, adds=lambda model: add_norm_affine(model),
        trains=lambda name: is_label_row(name) or is_bias(name) or is_norm(name)),
    "lora": Method(
        "rank-r B·A on attention qkv and proj (B = 0) + the label table", 1e-3, options=dict(lora_rank=8),
        adds=lambda model, lora_rank: add_lora(model, lora_rank),
        trains=lambda name: is_label_row(name) or leaf(name).startswith("lora_")),
    "diffscaler": Method(
        "Affiner (1+a)Wx + s·W_up relu(W_down x) + b_hat + b on qkv, proj, fc1, fc2 and adaLN linears; new rows = "
        "the null embedding", 1e-3, options=dict(affiner_rank=64), label_init="null",
        adds=lambda model, affiner_rank: add_affiners(model, affiner_rank),
        trains=lambda name: is_label_row(name) or leaf(name) in AFFINER_PARAMETERS),
}
FIXED = ("pos_embed",)  # a fixed function of the grid: no method trains it


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


def base_problem(model, method, **options):
    """Why `method` with its `options` cannot fine-tune this base, or None: a rank must fit the model's width, and a
    null row of the new table (every method but FineDiffusion's) starts as the base's, which a tiered table has not."""
    spec = METHODS[method]
    if too_large := [f"{name} {value}" for name, value in options.items() if value > model.hidden_size]:
        return f"{', '.join(too_large)}: a rank is at most the model's width, {model.hidden_size}"
    if (not spec.tiered or spec.label_init == "null") and model.y_embedder.null_index is None:
        return (f"{method} starts its null label row from the base's, and this base has none: its table is a tiered "
                f"one (fine + superclass rows, as FineDiffusion trains). Fine-tune a base with a null row, such as an "
                f"ImageNet DiT, or fine-tune it with finediffusion")
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
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


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
