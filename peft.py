"""
The fine-tuning methods compared in the FineDiffusion, DiffFit and DiffScaler papers, on a pre-trained DiT:

    full           every parameter trains
    bitfit         biases + the label table                          (Ben Zaken et al. 2021)
    difffit        bitfit + norms + scale factors gamma (init 1.0)   (DiffFit, Xie et al. 2023, Table 4 row 8)
    finediffusion  TieredEmbedder + biases + LayerNorm scale/offset  (FineDiffusion, Pan et al. 2024)
    lora           low-rank B A on the attention projections         (Hu et al. 2021)
    diffscaler     the Affiner on attention, MLP and adaLN linears   (DiffScaler, Nair et al. 2024, Eq. 5)

`prepare(model, method, ...)` resizes the label table for the target classes, adds the method's parameters and
freezes the rest. What a method adds lives in small nn.Linear subclasses that keep the official key names
(`blocks.3.attn.qkv.weight` stays) and fold back into plain linears with `merge(model)`. A delta checkpoint
holds only what trained, plus what it takes to rebuild the model on top of its base checkpoint.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DIT_CONFIGS, DiT, TieredEmbedder, load_dit_weights

METHODS = ("full", "bitfit", "difffit", "finediffusion", "lora", "diffscaler")
# FineDiffusion trains at the pre-training lr; DiffFit (Table 4d) finds 10x best for parameter-efficient methods.
SUGGESTED_LR = dict(full=1e-4, finediffusion=1e-4, bitfit=1e-3, difffit=1e-3, lora=1e-3, diffscaler=1e-3)
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
    """LoRA: y = W x + b + (alpha / r) B A x, B zero-initialized so training starts at the pretrained model."""

    def __init__(self, linear, rank, alpha=None):
        super().__init__(linear)
        self.scale = (alpha or rank) / rank
        self.lora_A = nn.Parameter(linear.weight.new_empty(rank, self.in_features))
        self.lora_B = nn.Parameter(linear.weight.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight_and_bias(self):
        return self.weight + self.scale * self.lora_B @ self.lora_A, self.bias


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
# Preparing a pre-trained DiT for a method


def replace_label_table(model, num_classes, class_to_superclass=None, num_superclasses=0, null_row=True,
                        init="normal", p_parent=0.1):
    """
    New label rows for the target classes (the ImageNet rows do not transfer). init "normal": N(0, 0.02) as the
    official FineDiffusion code; "null": every new row a copy of the pretrained null embedding (DiffScaler 3.1).
    A new null row always starts as the pretrained one, so unconditional predictions are kept.
    """
    old = model.y_embedder
    table = old.embedding_table.weight
    if (init == "null" or null_row) and old.null_index is None:
        raise ValueError("the base model has no null label row to start from (it is not an ImageNet DiT)")
    new = TieredEmbedder(num_classes, table.shape[1], p_parent, class_to_superclass, num_superclasses, null_row)
    new = new.to(device=table.device, dtype=table.dtype)
    with torch.no_grad():
        if init == "null":
            new.embedding_table.weight.copy_(table[old.null_index].expand_as(new.embedding_table.weight))
        else:
            nn.init.normal_(new.embedding_table.weight, std=0.02)
        if null_row:
            new.embedding_table.weight[new.null_index] = table[old.null_index]
    model.y_embedder = new


def add_norm_affine(model):
    """Give DiT's affine-free LayerNorms a scale (1) and offset (0): the identity, so outputs are unchanged."""
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


def is_trainable(method, name):
    """The method's rule for a parameter of the prepared model (added parameters are named for their method)."""
    leaf = name.rsplit(".", 1)[-1]
    if method == "full" or name.startswith("y_embedder."):
        return True  # every method learns the new classes' embeddings
    if method in ("bitfit", "difffit", "finediffusion") and leaf == "bias":
        return True
    if method in ("difffit", "finediffusion") and ".norm" in name:
        return True  # LayerNorm scale/offset where the model has them (DiT's own norms have none)
    if method == "difffit":
        return leaf == "gamma"
    if method == "lora":
        return leaf.startswith("lora_")
    if method == "diffscaler":
        return leaf in ("affine_scale", "affine_shift", "adapter_scale", "down", "up")
    return False


def prepare(model, method, num_classes, class_to_superclass=None, num_superclasses=0, p_parent=0.1,
            null_row=None, label_init=None, lora_rank=8, affiner_rank=64):
    """
    Turn a pre-trained DiT (weights loaded) into `method`'s trainable model for a dataset of `num_classes`
    fine classes. FineDiffusion's table adds one row per superclass (the parents of Eq. 1) and, like the
    official code, no null row; the other methods keep a null row for ordinary classifier-free guidance.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tiered = method == "finediffusion"
    if tiered and not num_superclasses:
        raise ValueError("finediffusion needs the class hierarchy (superclass of every fine class)")
    replace_label_table(model, num_classes, class_to_superclass if tiered else None,
                        num_superclasses if tiered else 0, null_row=not tiered if null_row is None else null_row,
                        init=label_init or ("null" if method == "diffscaler" else "normal"), p_parent=p_parent)
    depth = len(model.blocks)
    if method == "finediffusion":
        add_norm_affine(model)
    elif method == "difffit":  # DiffFit Table 4c row 8: blocks 1..14, QKV linears, final layer
        branches = [f"blocks.{i}.{n}" for i in range(min(DIFFFIT_BLOCKS, depth)) for n in ("attn.proj", "mlp.fc2")]
        qkv = [f"blocks.{i}.attn.qkv" for i in range(depth)]
        adapt_linears(model, branches + qkv + ["final_layer.linear"], ScaledLinear)
    elif method == "lora":
        names = [f"blocks.{i}.attn.{n}" for i in range(depth) for n in ("qkv", "proj")]
        adapt_linears(model, names, lambda linear: LoRALinear(linear, lora_rank))
    elif method == "diffscaler":  # every attention and MLP linear, and the adaLN layers (DiffScaler 4.3)
        names = [f"blocks.{i}.{n}" for i in range(depth)
                 for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
        adapt_linears(model, names + ["final_layer.adaLN_modulation.1"], lambda linear: Affiner(linear, affiner_rank))
    for name, param in model.named_parameters():
        param.requires_grad_(name != "pos_embed" and is_trainable(method, name))
    return model


def merge(model):
    """Fold every method's extra parameters into plain linears: a fine-tuned model that samples as fast as DiT."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, AdaptedLinear)]
    adapt_linears(model, adapted, lambda linear: linear.merged())
    return model


# -----------------------------------------------------------------------------------------------------------
# Parameter accounting and delta checkpoints


def count_parameters(model):
    """(total, trainable); the total counts the fixed positional embedding, as the official code does."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def trainable_state_dict(model):
    """Only what the method trained: the content of a delta checkpoint."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def base_fingerprint(model):
    """Identify a base checkpoint by tensors that no parameter-efficient method changes."""
    digest = hashlib.sha256()
    for name in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight"):
        tensor = model.get_parameter(name).detach().float().cpu().contiguous()
        digest.update(tensor.numpy().tobytes())
    return dict(n_params=sum(p.numel() for p in model.parameters() if p.dim() > 1), sha256=digest.hexdigest()[:16])


def rebuild(checkpoint, base_state_dict=None, weights="ema"):
    """
    The fine-tuned model a checkpoint of train.py describes: DiT(**model_config), the base checkpoint's weights
    (checked against the fingerprint taken at training time), prepare(method), then the trained tensors.
    Full fine-tuning trains everything, so its checkpoints need no base.
    """
    model = DiT(**checkpoint["model_config"])
    if checkpoint["base"] is not None:
        if base_state_dict is None:
            raise ValueError(f"this {checkpoint['method']} checkpoint holds only what it trained; it needs its base "
                             f"checkpoint {checkpoint['base'].get('path')!r} (pass it with --base)")
        load_dit_weights(model, base_state_dict, source="the base checkpoint")
        found = base_fingerprint(model)
        if any(found[k] != checkpoint["base"][k] for k in found):
            raise ValueError(f"this checkpoint was trained on another base (expected {checkpoint['base']}, the "
                             f"given base is {found}); pass the base it names with --base")
    model = prepare(model, checkpoint["method"], **checkpoint["method_options"])
    tensors, expected = checkpoint[weights], set(trainable_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(f"the checkpoint's tensors do not match method {checkpoint['method']}: missing "
                         f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model


def parameter_table(model_name="DiT-XL/2", image_size=256, num_classes=10000, num_superclasses=11):
    """Rows of (method, total, trainable, percent, delta MiB at fp32) for every method, built on `meta`."""
    rows, parents = [], [c % num_superclasses for c in range(num_classes)]  # the split does not change counts
    for method in METHODS:
        with torch.device("meta"):
            model = DiT(input_size=image_size // 8, num_classes=1000, **DIT_CONFIGS[model_name])
            prepare(model, method, num_classes, parents, num_superclasses)
        total, trainable = count_parameters(model)
        rows.append((method, total, trainable, 100 * trainable / total, trainable * 4 / 2**20))
    return rows

