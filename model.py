"""
The networks of FineDiffusion, written out in full:

1) DiT, the Diffusion Transformer of Peebles & Xie (2023), with the official repository's architecture and
   state-dict key names, so `DiT-XL-2-256x256.pt` and `DiT-XL-2-512x512.pt` load with strict key matching.
2) The TieredEmbedder of FineDiffusion: one label table holding the fine classes, their superclasses and
   (optionally) the null label; during training a fine label is replaced by its parent with probability p.
3) The Stable Diffusion VAE (an AutoencoderKL with diffusers' key names) and the readers for every
   checkpoint format the project meets (.pt/.bin pickles read with weights_only=True, .safetensors by hand).
"""
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------------------------------------
# DiT configurations: name -> (depth, hidden size, patch size, heads). S, B, L, XL: Table 1 of the DiT paper;
# T (tiny) is ours, for the CPU toy runs.

DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
                                         "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items()
    for patch in (2, 4, 8)
}


def modulate(x, shift, scale):
    """adaLN: scale and shift every token by per-sample vectors.  x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# -----------------------------------------------------------------------------------------------------------
# Embedding layers for timesteps and labels

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies followed by a two-layer MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) possibly fractional timesteps -> (N, dim) [cos | sin] features, as in the official DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))  # odd dim: a zero column

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class TieredEmbedder(nn.Module):
    """FineDiffusion's TieredEmbedder: one table whose rows are laid out as
        [fine classes 0..C-1 | superclasses C..C+S-1 | null row C+S (optional)].
    `parent[c]` is the row that stands in for fine class c when its label is dropped during training:
    its superclass row (FineDiffusion), or the null row when there are no superclasses — which is exactly
    the official DiT LabelEmbedder, so one class serves both (DiT's table: 1000 classes + null row 1000;
    the official FineDiffusion table: 10,000 classes + 11 superclasses, no null row)."""
    def __init__(self, num_classes, hidden_size, dropout_prob, class_to_superclass=None, num_superclasses=0,
                 null_row=True):
        super().__init__()
        assert num_superclasses > 0 or null_row, "a table with neither superclasses nor a null row cannot guide"
        self.num_classes, self.num_superclasses, self.dropout_prob = num_classes, num_superclasses, dropout_prob
        self.null_index = num_classes + num_superclasses if null_row else None
        self.embedding_table = nn.Embedding(num_classes + num_superclasses + int(null_row), hidden_size)
        if num_superclasses:
            parent = num_classes + torch.as_tensor(class_to_superclass, dtype=torch.long, device="cpu")
            assert parent.shape == (num_classes,) and parent.max() < num_classes + num_superclasses
        else:
            parent = torch.full((num_classes,), num_classes, dtype=torch.long, device="cpu")
        self.register_buffer("parent", parent, persistent=False)  # (C,) kept out of the official key set

    def parent_rows(self, labels, guidance):
        """The rows guidance pushes away from: "fine" -> each label's superclass row, "cfg" -> the null row."""
        if guidance == "fine" and self.num_superclasses:
            return self.parent[labels]
        if guidance == "cfg" and self.null_index is not None:
            return torch.full_like(labels, self.null_index)
        has = [kind for kind, ok in (("fine", self.num_superclasses), ("cfg", self.null_index is not None)) if ok]
        missing = "superclass rows" if guidance == "fine" else "null label row"
        raise ValueError(f"this model's label table has no {missing}: use {' or '.join(has + ['none'])}")

    def replace_by_parent(self, labels):
        """FineDiffusion training: each fine label becomes its parent (superclass or null) with prob. p."""
        drop = (torch.rand(labels.shape, device=labels.device) < self.dropout_prob) & (labels < self.num_classes)
        return torch.where(drop, self.parent[labels.clamp(max=self.num_classes - 1)], labels)

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            labels = self.replace_by_parent(labels)
        return self.embedding_table(labels)  # (N, D)


# -----------------------------------------------------------------------------------------------------------
# Transformer blocks with adaLN-Zero conditioning

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's key names: qkv, proj)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm's key names: fc1, fc2)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: the condition c regresses shift, scale and gate of both branches."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm_affine=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its patch of outputs."""
    def __init__(self, hidden_size, patch_size, out_channels, norm_affine=False):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class PatchEmbed(nn.Module):
    """Image -> sequence of patch tokens by a strided convolution (timm's key name: proj)."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


# -----------------------------------------------------------------------------------------------------------
# The Diffusion Transformer

class DiT(nn.Module):
    """Diffusion Transformer. With `num_superclasses` > 0 the label table is a TieredEmbedder with superclass rows;
    `norm_affine` gives the LayerNorms the scale/offset that FineDiffusion trains."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, num_superclasses=0,
                 class_to_superclass=None, null_row=True, norm_affine=False, pos_embed_scale=1.0):
        super().__init__()
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.input_size, self.pos_embed_scale = input_size, pos_embed_scale
        self.hidden_size, self.mlp_ratio = hidden_size, mlp_ratio
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, class_dropout_prob, class_to_superclass,
                                         num_superclasses, null_row)
        self.pos_embed = nn.Parameter(self.sincos_positions(), requires_grad=False)  # fixed, as the official DiT
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm_affine) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialization: xavier linears, N(0, 0.02) embeddings, zero adaLN and output."""
        if self.pos_embed.is_meta:  # shapes only: nothing to initialize
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a linear layer on flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.y_embedder.embedding_table, self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                              self.final_layer.linear]:
            nn.init.zeros_(layer.weight)  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(layer.bias)

    def sincos_positions(self):
        """(1, T, D) fixed 2-D sin-cos positions of the token grid, the grid coordinates times pos_embed_scale, in
        numpy as the official get_2d_sincos_pos_embed: half the channels are [sin | cos] of one axis, half the other."""
        coords = np.arange(self.input_size // self.patch_size, dtype=np.float32) * self.pos_embed_scale
        grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, -1)  # the official (w, h) ordering
        half = self.hidden_size // 2
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
        angles = [np.einsum("m,d->md", axis, omega) for axis in grid]  # (T, D/4) per axis
        positions = np.concatenate([wave(a) for a in angles for wave in (np.sin, np.cos)], axis=1)  # (T, D)
        return torch.from_numpy(positions).float().unsqueeze(0)

    def resize(self, input_size):
        """Run on another grid (latent or pixel side `input_size`), the positions scaled to stay in the trained range:
        DiffFit's trick, 512 px from a 256 px model takes positions (i/2, j/2)."""
        if input_size and input_size != self.input_size:
            self.pos_embed_scale *= self.input_size / input_size
            self.input_size = input_size
            self.pos_embed = nn.Parameter(self.sincos_positions().to(self.pos_embed.device), requires_grad=False)
        return self

    @property
    def config(self):
        """DiT(**model.config) builds this architecture afresh: what a checkpoint records (peft's adapters aside)."""
        e = self.y_embedder
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=len(self.blocks), num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, class_dropout_prob=e.dropout_prob, num_classes=e.num_classes,
                    learn_sigma=self.out_channels != self.in_channels, num_superclasses=e.num_superclasses,
                    class_to_superclass=(e.parent - e.num_classes).tolist() if e.num_superclasses else None,
                    null_row=e.null_index is not None, norm_affine=self.final_layer.norm_final.weight is not None,
                    pos_embed_scale=self.pos_embed_scale)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x (N, C, H, W) noisy latents, t (N,) timesteps, y (N,) label rows -> (N, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        checkpointed = self.grad_checkpointing and self.training  # recompute activations in backward: less memory
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False) if checkpointed else block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# -----------------------------------------------------------------------------------------------------------
# Checkpoint files: safetensors (read by hand), torch.load with weights_only=True, strict checks

# safetensors layout: 8-byte little-endian header size, a JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}},
# then the raw little-endian tensor bytes; offsets count from the end of the header.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file into {name: tensor} (on the CPU), validating the header against the file."""
    with open(path, "rb") as f:
        blob = f.read()

    def corrupt(why):
        return ValueError(f"{path} is not a valid .safetensors file: {why}")

    if len(blob) < 8:
        raise corrupt(f"it has {len(blob)} bytes, fewer than the 8-byte header size field (truncated?)")
    (header_size,) = struct.unpack("<Q", blob[:8])
    if 8 + header_size > len(blob):
        raise corrupt(f"the header size field says {header_size} bytes but only {len(blob) - 8} follow (truncated?)")
    try:
        header = json.loads(blob[8:8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + header_size:]

    tensors, spans = {}, []
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(info.get("shape"), list) and all(isinstance(s, int) and s >= 0 for s in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) for o in info["data_offsets"]))
        if not ok:
            raise corrupt(f"bad header entry for {name!r}: {info!r} "
                          f"(supported dtypes: {', '.join(SAFETENSORS_DTYPES)})")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise corrupt(f"{name!r} has data_offsets [{begin}, {end}] outside the {len(data)} data bytes (truncated?)")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise corrupt(f"{name!r} has {end - begin} bytes but shape {shape} of {info['dtype']} needs {nbytes}")
        spans.append((begin, end, name))
        # bytearray copies the bytes into a fresh, aligned, writable buffer for the tensor to own
        tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape) if nbytes \
            else torch.empty(shape, dtype=dtype)
    spans.sort()
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise corrupt(f"the data of {prev_name!r} and {name!r} overlap")
    return tensors


def load_state_dict_file(path, where_to_get=""):
    """A checkpoint file's contents: .safetensors by hand, others (.pt/.pth/.bin) by torch.load. Errors add
    `where_to_get`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}. {where_to_get}".strip())
    if os.fspath(path).endswith(".safetensors"):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or a pickle that would run code
        reason = type(e).__name__ + (f": {str(e).strip().splitlines()[0]}" if str(e).strip() else "")
        raise ValueError(f"{path} cannot be read as a checkpoint ({reason[:200]}). {where_to_get}".strip()) from None


def load_checked(model, state_dict, source, where_to_get, assign=False):
    """A strict load -> model, checked first: a mismatch is a ValueError naming missing, unexpected and mis-shaped
    keys, then `where_to_get`. assign=True: the model (a meta-device one, say) takes the state dict's tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for k, v in state_dict.items()}
    problems = {"missing keys": [k for k in expected if k not in found],
                "unexpected keys": [k for k in found if k not in expected],
                "mis-shaped keys": [f"{k} (file {found[k]}, model {expected[k]})"
                                    for k in expected if k in found and found[k] != expected[k]]}
    lines = [f"{kind} ({len(keys)}): " + ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
             for kind, keys in problems.items() if keys]
    if lines:
        raise ValueError(f"{source} does not match {type(model).__name__}:\n  " + "\n  ".join(lines)
                         + f"\n{where_to_get}")
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


# -----------------------------------------------------------------------------------------------------------
# DiT checkpoints: the official .pt files (a raw state dict), official DiT and FineDiffusion training checkpoints
# ({"model", "ema", ...}), .safetensors -> the DiT they hold, checked and loaded strictly. (train.py's own
# checkpoints are checkpoint.py's format; checkpoint.load_model rebuilds them on top of this.)

LABEL_TABLE_KEY = "y_embedder.embedding_table.weight"
DIT_SOURCE = ("The official DiT checkpoints: https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt "
              "and DiT-XL-2-512x512.pt (github.com/facebookresearch/DiT).")


def dit_state_dict(checkpoint, weights="ema"):
    """The DiT weights a file holds: of a training checkpoint ({"model", "ema"}) the EMA ones, or the trained ones
    themselves with weights="raw"; a plain state dict is the one set there is."""
    keys = ("ema", "model") if weights == "ema" else ("model", "ema")
    if not isinstance(checkpoint, dict):
        return checkpoint  # (read_dit_shape says what it is)
    return next((checkpoint[k] for k in keys if k in checkpoint and isinstance(checkpoint[k], dict)), checkpoint)


def heads_for_width(hidden_size):
    """The stated rule where a file does not record heads (its shapes cannot): as the DiT configuration of the same
    width (T 128: 4, S 384: 6, B 768: 12, L 1024: 16, XL 1152: 16), otherwise one head per 64 channels."""
    by_width = {c["hidden_size"]: c["num_heads"] for c in DIT_CONFIGS.values()}
    return by_width.get(hidden_size, max(1, hidden_size // 64))


def read_dit_shape(state_dict, source="this file"):
    """What a DiT state dict's tensor shapes say about its architecture (heads by heads_for_width)."""
    if not isinstance(state_dict, dict) or "x_embedder.proj.weight" not in state_dict:
        keys = f"keys {list(state_dict)[:5]}" if isinstance(state_dict, dict) else f"a {type(state_dict).__name__}"
        raise ValueError(f"{source} is not a DiT checkpoint: it holds {keys}, not a state dict with "
                         f"x_embedder.proj.weight. {DIT_SOURCE}")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    out = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    grid = state_dict["pos_embed"].shape[1] ** 0.5 if "pos_embed" in state_dict else None  # fixed: may be left out
    return dict(depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}), hidden_size=hidden,
                patch_size=patch, in_channels=in_channels, num_heads=heads_for_width(hidden),
                mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out == 2 * in_channels,
                input_size=int(grid) * patch if grid else None, table_rows=state_dict[LABEL_TABLE_KEY].shape[0],
                norm_affine="final_layer.norm_final.weight" in state_dict)


def dit_name(shape):
    """The DIT_CONFIGS name of an architecture (a config or read_dit_shape's dict), or None for another shape."""
    return next((name for name, c in DIT_CONFIGS.items()
                 if all(shape[k] == c[k] for k in ("depth", "hidden_size", "patch_size"))), None)


def describe_dit(shape):
    """One line a user can act on: which model, image size and label table a DiT fits."""
    size = ("any image size" if shape["input_size"] is None else f"{shape['input_size'] * 8} px images"
            if shape["in_channels"] == 4 else f"{shape['input_size']} px in pixel space")
    return (f"{dit_name(shape) or 'a DiT of another shape'} (depth {shape['depth']}, hidden {shape['hidden_size']}, "
            f"patch {shape['patch_size']}), {size}, {shape['table_rows']} label rows (1000 ImageNet classes + null = "
            f"1001; 10,000 iNat species + 11 superclasses = 10,011), "
            f"{'affine' if shape['norm_affine'] else 'plain'} LayerNorms")


def load_dit_weights(model, state_dict, source="the checkpoint"):
    """Strict load with errors that name every missing, unexpected or mis-shaped key and say what the file fits.
    pos_embed is a fixed function of the grid, not a learned weight: a different grid size is recomputed."""
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not (k == "pos_embed" and v.shape != own[k].shape)}
    state_dict.setdefault("pos_embed", own["pos_embed"])
    try:
        fits = f"The file holds {describe_dit(read_dit_shape(state_dict))}."
    except (ValueError, KeyError):
        fits = "The file is not a DiT checkpoint."
    return load_checked(model, state_dict, source, fits + " " + DIT_SOURCE)


def load_dit(checkpoint, source=None, input_size=None, class_to_superclass=None, num_heads=None, weights="ema"):
    """The DiT a file holds (a path, or what load_state_dict_file read from `source`), built from its shapes: any depth,
    width, patch, channels and label table. `input_size` (latent or pixel grid side) defaults to the file's; at another
    size the positions are scaled (DiT.resize). A tiered table (affine LayerNorms: the official FineDiffusion layout)
    is split into classes and superclasses by `class_to_superclass`. `weights`: "ema" or "raw" (dit_state_dict)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source, checkpoint = checkpoint, load_state_dict_file(checkpoint)
    state_dict = dit_state_dict(checkpoint, weights)
    shape = read_dit_shape(state_dict, source)
    if not (input_size or shape["input_size"]):
        raise ValueError(f"{source} holds no pos_embed, so its grid size is unknown: give the input size to load it")
    config = dict(shape, input_size=shape["input_size"] or input_size, num_heads=num_heads or shape["num_heads"])
    if shape["hidden_size"] % config["num_heads"]:
        raise ValueError(f"{source}: its width {shape['hidden_size']} does not split into {config['num_heads']} heads; "
                         f"the number of heads must divide it (DiT-XL/2: 16 heads of 72)")
    rows = config.pop("table_rows")  # the rest are DiT's arguments
    if shape["norm_affine"]:  # official FineDiffusion: [fine | superclass] rows, no null row
        num_superclasses = rows - len(class_to_superclass or ())
        if class_to_superclass is None or num_superclasses <= max(class_to_superclass):
            given = "" if class_to_superclass is None else (f"; the one given has {len(class_to_superclass)} classes"
                                                            f" and {max(class_to_superclass) + 1} superclasses")
            raise ValueError(f"{source} holds a FineDiffusion label table of {rows} rows (classes + superclasses): its "
                             f"class list is needed to split them (a hierarchy JSON, or iNat's train_mini.json){given}")
        config.update(num_classes=len(class_to_superclass), num_superclasses=num_superclasses,
                      class_to_superclass=class_to_superclass, null_row=False)
    else:  # official DiT: classes + the null row
        config.update(num_classes=rows - 1)
    return load_dit_weights(DiT(**config), state_dict, source).resize(input_size)


# -----------------------------------------------------------------------------------------------------------
# The Stable Diffusion VAE. Building blocks named as diffusers' ResnetBlock2D, Attention, UNetMidBlock2D, ...

VAE_NORM_EPS = 1e-6  # GroupNorm eps of the SD VAE


class VAEResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 steps and a residual, 1x1-projected when the channel count changes."""
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=VAE_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=VAE_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):  # (N, C_in, H, W) -> (N, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions, GroupNorm in front, residual around."""
    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        # ".0" in the key names: diffusers' slot 1 is a dropout
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):  # (N, C, H, W)
        N, C, H, W = x.shape
        h = self.group_norm(x).reshape(N, C, H * W).transpose(1, 2)  # (N, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # softmax(QK^T/sqrt(C))V
        return x + self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)


class VAEMidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""
    def __init__(self, channels, groups):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x):  # (N, C, h, w)
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEResample(nn.Module):
    """Down: a stride-2 3x3 conv after padding only right and bottom by one, (H, W) -> (H/2, W/2).
    Up: nearest-neighbour 2x upsampling, then a 3x3 conv, (h, w) -> (2h, 2w)."""
    def __init__(self, channels, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if down else nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAELevel(nn.Module):
    """One resolution level (diffusers' DownEncoderBlock2D / UpDecoderBlock2D): ResNet blocks, then resampling."""
    def __init__(self, in_channels, out_channels, num_resnets, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_resnets)])
        self.resample = resample  # "downsamplers", "upsamplers" or None: diffusers' key names
        if resample:
            setattr(self, resample, nn.ModuleList([VAEResample(out_channels, down=resample == "downsamplers")]))

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return getattr(self, self.resample)[0](x) if self.resample else x


# AutoencoderKL: encoder -> q(z|x) = N(mean, std^2); decoder z -> x

class VAEEncoder(nn.Module):
    """Image (N, in, H, W) -> Gaussian moments (N, 2*latent, H/f, W/f), f = 2^(levels-1)."""
    def __init__(self, in_channels, block_out_channels, layers_per_block, latent_channels, groups):
        super().__init__()
        chans, levels = block_out_channels, len(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAELevel(chans[max(i - 1, 0)], chans[i], layers_per_block, groups,
                                                   "downsamplers" if i < levels - 1 else None) for i in range(levels)])
        self.mid_block = VAEMidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, out, h*f, w*f); each level has one ResNet block more than the encoder's."""
    def __init__(self, out_channels, block_out_channels, layers_per_block, latent_channels, groups):
        super().__init__()
        chans, levels = block_out_channels[::-1], len(block_out_channels)  # widest first
        self.conv_in = nn.Conv2d(latent_channels, chans[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([VAELevel(chans[max(i - 1, 0)], chans[i], layers_per_block + 1, groups,
                                                 "upsamplers" if i < levels - 1 else None) for i in range(levels)])
        self.mid_block = VAEMidBlock(chans[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(std^2)) given by the encoder's moments (N, 2*latent, h, w)."""
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # z = mean + std * eps, eps ~ N(0, I): the reparameterization trick (Kingma & Welling 2014, Sec. 2.4);
        # eps is drawn on the generator's device so a seed gives the same z on any device
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                          device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * eps.to(self.mean.device)


class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022); defaults are the SD VAE's."""
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215):
        super().__init__()
        # diffusion models see z * scaling_factor, which has roughly unit variance (LDM's scale_factor)
        self.scaling_factor, self.latent_channels = scaling_factor, latent_channels
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)  # each level but the last halves the size
        self.encoder = VAEEncoder(in_channels, block_out_channels, layers_per_block, latent_channels, norm_num_groups)
        self.decoder = VAEDecoder(out_channels, block_out_channels, layers_per_block, latent_channels, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @classmethod
    def from_config(cls, config):
        """Build from a diffusers config.json dict; fields this architecture does not vary are checked, not used."""
        for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != block for t in config.get(field, [])):
                raise ValueError(f"unsupported VAE {field} {config[field]}: only {block} is implemented")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VAE act_fn {config['act_fn']!r}: only silu is implemented")
        fields = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                  "norm_num_groups", "scaling_factor")
        return cls(**{k: config[k] for k in fields if k in config})

    def encode(self, x):  # (N, 3, H, W) in [-1, 1] -> q(z|x) over (N, latent, H/8, W/8) for the SD VAE
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):  # unscaled latent (N, latent, h, w) -> image (N, 3, 8h, 8w), about [-1, 1]
        return self.decoder(self.post_quant_conv(z))


# Loading the SD VAE (sd-vae-ft-ema / sd-vae-ft-mse) from diffusers files

SD_VAE_SOURCE = ("Get the Stable Diffusion VAE from https://huggingface.co/stabilityai/sd-vae-ft-ema or "
                 "https://huggingface.co/stabilityai/sd-vae-ft-mse: the diffusion_pytorch_model.safetensors file "
                 "(or diffusion_pytorch_model.bin), with its config.json beside it.")
# older diffusers checkpoints name the attention projections query/key/value/proj_attn
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load_vae_state_dict(vae, state_dict, source="state dict"):
    """Load diffusers VAE weights (load_checked; a meta-device VAE takes the file's tensors), legacy attention names
    (`...attentions.0.query.weight`) mapped to current ones (`...attentions.0.to_q.weight`)."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION_NAMES:
            parts[-2] = LEGACY_ATTENTION_NAMES[parts[-2]]
        renamed[".".join(parts)] = value
    return load_checked(vae, renamed, source, SD_VAE_SOURCE, assign=vae.encoder.conv_in.weight.is_meta)


def load_vae(path, device="cpu"):
    """The VAE from a diffusers folder or its weights file (.safetensors/.bin); a config.json beside them sets the
    architecture (SD defaults otherwise). Returns a float32 model in eval mode."""
    folder = os.path.isdir(path)
    candidates = [os.path.join(path, f"diffusion_pytorch_model.{ext}") for ext in ("safetensors", "bin")]
    weights = next((c for c in (candidates if folder else [path]) if os.path.isfile(c)), None)
    if weights is None:
        missing = f"no diffusion_pytorch_model.safetensors or .bin in {path}" if folder else f"no VAE at {path}"
        raise FileNotFoundError(f"{missing}. {SD_VAE_SOURCE}")
    config = {}
    if os.path.isfile(config_path := os.path.join(os.path.dirname(weights), "config.json")):
        with open(config_path) as f:
            config = json.load(f)
    state_dict = load_state_dict_file(weights)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights} does not hold a state dict. {SD_VAE_SOURCE}")
    with torch.device("meta"):  # no random init: every parameter comes from the file
        vae = AutoencoderKL.from_config(config)
    return load_vae_state_dict(vae, state_dict, source=weights).to(device=device, dtype=torch.float32).eval()
