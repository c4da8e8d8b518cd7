"""
The fine-tuning methods of the FineDiffusion paper on a pre-trained DiT: full, BitFit, DiffFit,
FineDiffusion, LoRA and DiffScaler. METHODS is the table (label table, what a method adds, what
trains, lr); `prepare` applies an entry, keeping the official key names (`blocks.3.attn.qkv.weight`
stays); `merge(model)` folds what a method added into plain linears.
"""
import dataclasses
import math
import re
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DiT, TieredEmbedder, superclass_count

DIFFFIT_BLOCKS = 14  # DiffFit Table 4b: gammas in blocks 1..14 of DiT-XL/2's 28

# --------------------------------------------------------------------------------------------------
# The methods: each learns the new label rows (y_embedder.*); what it adds is defined below

@dataclasses.dataclass(frozen=True)
class Method:
    lr: float  # the suggested learning rate
    trains: tuple  # the method's rule: a parameter trains if its name fullmatches one of these
    adds: Callable = lambda model: None  # adds(model, **options): what the method adds to a DiT
    options: dict = dataclasses.field(default_factory=dict)  # the method's own options, defaults
    tiered: bool = False  # label table [fine | superclass] (no null row), else [fine | null]
    label_init: str = "normal"  # new rows N(0, 0.02), as FineDiffusion; "null": the base's null row
    delta: bool = True  # it freezes part of the base, so its checkpoints hold only what trained


LABELS, BIASES = r"y_embedder\..*", r".*\.bias"
NORMS = r"(blocks\.\d+\.norm[12]|final_layer\.norm_final)\.(weight|bias)"  # LayerNorm scale, offset
# FineDiffusion trains at the pre-training lr; DiffFit (Table 4d) finds 10x best for the others.
METHODS = {
    "full": Method(1e-4, delta=False, trains=(r"(?!pos_embed$).*",)),  # all but the positions
    "bitfit": Method(1e-3, trains=(LABELS, BIASES)),  # Ben Zaken et al. 2021
    "difffit": Method(  # Xie et al. 2023, Table 4 row 8 (DiT's LayerNorms have nothing to train)
        1e-3, adds=lambda model: add_difffit_gammas(model), trains=(LABELS, BIASES, r".*\.gamma")),
    "finediffusion": Method(  # Pan et al. 2024, Sec. 3.2.1: TieredEmbedder, biases, LayerNorms
        1e-4, tiered=True, adds=lambda model: add_norm_affine(model),
        trains=(LABELS, BIASES, NORMS)),
    "lora": Method(  # Hu et al. 2021
        1e-3, options=dict(lora_rank=8), adds=lambda model, lora_rank: add_lora(model, lora_rank),
        trains=(LABELS, r".*\.lora_[AB]")),
    "diffscaler": Method(  # Nair et al. 2024; new rows: the base's null row (Sec. 3.1)
        1e-3, options=dict(affiner_rank=64), label_init="null",
        adds=lambda model, affiner_rank: add_affiners(model, affiner_rank),
        trains=(LABELS, r".*\.(affine_scale|affine_shift|adapter_scale|down|up)")),
}


# --------------------------------------------------------------------------------------------------
# Linear layers with a method's extras: `weight` and `bias` keep their names; merged() folds them

class AdaptedLinear(nn.Linear):
    """A pretrained nn.Linear (same weight and bias tensors, same keys) that a method extends."""
    def __init__(self, linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def merged(self):
        """A plain nn.Linear computing the same function (up to float rounding)."""
        weight, bias = self.merged_weight_and_bias()
        # a real init, not on meta: it draws from the global RNG as the versions before did, so a
        # fine-tune from a merged delta starts from the same numbers
        linear = nn.Linear(self.in_features, self.out_features, device=weight.device,
                           dtype=weight.dtype)
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
    """LoRA: y = W x + b + B A x (alpha = r); B starts at 0, so training starts at the base."""
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
    """DiffScaler's Affiner (Eq. 5): y = (1 + a) W x + s W_up ReLU(W_down x) + b_hat + b; a, b, s
    start at 0 (the layer unchanged). The ReLU branch is not linear, so merging keeps it."""
    def __init__(self, linear, rank):
        super().__init__(linear)
        self.affine_scale = nn.Parameter(torch.zeros_like(linear.bias))  # a
        self.affine_shift = nn.Parameter(torch.zeros_like(linear.bias))  # b; b_hat: the frozen bias
        self.adapter_scale = nn.Parameter(linear.bias.new_zeros(()))  # s
        new = linear.weight.new_empty
        self.down = nn.Parameter(nn.init.kaiming_normal_(new(rank, self.in_features)))
        self.up = nn.Parameter(nn.init.kaiming_normal_(new(self.out_features, rank)))

    def forward(self, x):
        y = (1 + self.affine_scale) * F.linear(x, self.weight) + self.bias + self.affine_shift
        return y + self.adapter_scale * F.linear(F.relu(F.linear(x, self.down)), self.up)  # Eq. 3-4

    def merged(self):
        merged = Affiner(super().merged(), self.down.shape[0])
        merged.down, merged.up, merged.adapter_scale = self.down, self.up, self.adapter_scale
        return merged

    def merged_weight_and_bias(self):
        return (1 + self.affine_scale)[:, None] * self.weight, self.bias + self.affine_shift


# --------------------------------------------------------------------------------------------------
# What each method adds to a DiT

def add_norm_affine(model):
    """FineDiffusion: DiT's affine-free LayerNorms get scale 1 and offset 0 (outputs unchanged)."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is None:
            module.weight = nn.Parameter(model.pos_embed.new_ones(module.normalized_shape))
            module.bias = nn.Parameter(model.pos_embed.new_zeros(module.normalized_shape))
            module.elementwise_affine = True


def adapt_linears(model, names, wrap):
    """Replace the nn.Linear at each dotted `name` by wrap(linear)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrap(model.get_submodule(name)))


def add_difffit_gammas(model):
    """DiffFit Table 4c row 8: gammas on blocks 1..14's attention, MLP, every QKV, final layer."""
    depth = len(model.blocks)
    names = [f"blocks.{i}.{n}" for i in range(min(DIFFFIT_BLOCKS, depth))
             for n in ("attn.proj", "mlp.fc2")]
    names += [f"blocks.{i}.attn.qkv" for i in range(depth)] + ["final_layer.linear"]
    adapt_linears(model, names, ScaledLinear)


def add_lora(model, lora_rank):
    """LoRA on the attention projections (qkv and proj) of every block."""
    names = [f"blocks.{i}.attn.{n}" for i in range(len(model.blocks)) for n in ("qkv", "proj")]
    adapt_linears(model, names, lambda linear: LoRALinear(linear, lora_rank))


def add_affiners(model, affiner_rank):
    """DiffScaler 4.3: an Affiner on every attention and MLP linear, and on the adaLN layers."""
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks))
             for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    names.append("final_layer.adaLN_modulation.1")
    adapt_linears(model, names, lambda linear: Affiner(linear, affiner_rank))


def base_problem(model, method, **options):
    """Why `method` with `options` cannot fine-tune this base, or None (ranks, null row)."""
    spec = METHODS[method]
    too_large = [f"{name} {value}" for name, value in options.items() if value > model.hidden_size]
    if too_large:
        return f"{', '.join(too_large)}: a rank is at most the model's width, {model.hidden_size}"
    if (not spec.tiered or spec.label_init == "null") and model.y_embedder.null_index is None:
        return (f"{method} starts its null label row from the base's, and this base's table is "
                f"tiered (no null row): fine-tune an ImageNet DiT, or this one with finediffusion")
    return None


def prepare(model, method, class_to_superclass, num_superclasses=None, p_parent=0.1, **options):
    """A pre-trained DiT made `method`'s trainable model for the classes of class_to_superclass."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    if unknown := set(options) - set(spec.options):
        raise ValueError(f"{method} has no option {sorted(unknown)}; its options: "
                         f"{spec.options or 'none'}")
    if num_superclasses is None:
        num_superclasses = superclass_count(class_to_superclass)
    if spec.tiered and not num_superclasses:
        raise ValueError(f"{method} needs the class hierarchy (the superclass of every fine class)")
    if problem := base_problem(model, method):
        raise ValueError(problem)
    # New label rows: N(0, 0.02) or the base's null row; a new null row is the base's (unguided
    # predictions kept). A tiered table has a row per superclass (Eq. 1's parents), no null row.
    old = model.y_embedder.embedding_table.weight
    new = TieredEmbedder(len(class_to_superclass), old.shape[1], p_parent, class_to_superclass,
                         num_superclasses if spec.tiered else 0, not spec.tiered).to(old)
    rows, null = new.embedding_table.weight, old[model.y_embedder.null_index]
    with torch.no_grad():
        if spec.label_init == "null":
            rows.copy_(null.expand_as(rows))
        else:
            nn.init.normal_(rows, std=0.02)
        if not spec.tiered:
            rows[new.null_index] = null
    model.y_embedder = new
    spec.adds(model, **{**spec.options, **options})
    for name, param in model.named_parameters():
        param.requires_grad_(any(re.fullmatch(rule, name) for rule in spec.trains))
    return model


def merge(model):
    """Fold every method's extras into plain linears: a fine-tuned model as fast as DiT."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)]
    adapt_linears(model, adapted, lambda linear: linear.merged())
    return model


# --------------------------------------------------------------------------------------------------
# Parameter accounting

def count_parameters(model):
    """(total, trainable); the total counts the fixed positions, as the official code does."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def trainable_state_dict(model):
    """Only what the method trained: what a checkpoint holds."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def parameter_table(dit_config, class_to_superclass, options=None):
    """(method, total, trainable, percent, delta MiB at fp32) per method, built on `meta`;
    `options`: {method: prepare()'s keyword arguments} where a run used its own (a LoRA rank)."""
    for method in METHODS:
        kwargs = (options or {}).get(method, dict(class_to_superclass=class_to_superclass))
        with torch.device("meta"):
            model = prepare(DiT(**dit_config), method, **kwargs)
        total, trainable = count_parameters(model)
        yield method, total, trainable, 100 * trainable / total, trainable * 4 / 2**20
