"""
The networks of FineDiffusion, written out in full:

1) DiT, the Diffusion Transformer of Peebles & Xie (2023), with the official repository's architecture and
   state-dict key names, so `DiT-XL-2-256x256.pt` and `DiT-XL-2-512x512.pt` load with strict key matching.
2) The TieredEmbedder of FineDiffusion: one label table holding the fine classes, their superclasses and
   (optionally) the null label; during training a fine label is replaced by its parent with probability p.
3) The Stable Diffusion VAE (an AutoencoderKL with diffusers' key names) and the readers for every
   checkpoint format the project meets (.pt/.bin pickles read with weights_only=True, .safetensors by hand).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------------------------------------
# DiT configurations: name -> (depth, hidden size, patch size, heads). Table 1 of the DiT paper.

DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12),
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
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class TieredEmbedder(nn.Module):
    """
    FineDiffusion's TieredEmbedder: one table whose rows are laid out as
        [fine classes 0..C-1 | superclasses C..C+S-1 | null row C+S (optional)].
    `parent[c]` is the row that stands in for fine class c when its label is dropped during training:
    its superclass row (FineDiffusion), or the null row when there are no superclasses — which is exactly
    the official DiT LabelEmbedder, so one class serves both (DiT's table: 1000 classes + null row 1000;
    the official FineDiffusion table: 10,000 classes + 11 superclasses, no null row).
    """

    def __init__(self, num_classes, hidden_size, dropout_prob, class_to_superclass=None, num_superclasses=0,
                 null_row=True):
        super().__init__()
        assert num_superclasses > 0 or null_row, "a table with neither superclasses nor a null row cannot guide"
        self.num_classes, self.num_superclasses, self.dropout_prob = num_classes, num_superclasses, dropout_prob
        self.null_index = num_classes + num_superclasses if null_row else None
        self.embedding_table = nn.Embedding(num_classes + num_superclasses + int(null_row), hidden_size)
        if num_superclasses:
            parent = num_classes + torch.as_tensor(class_to_superclass, dtype=torch.long)
            assert parent.shape == (num_classes,) and parent.max() < num_classes + num_superclasses
        else:
            parent = torch.full((num_classes,), num_classes, dtype=torch.long)
        self.register_buffer("parent", parent, persistent=False)  # (C,) kept out of the official key set

    def replace_by_parent(self, labels):
        """FineDiffusion training: each fine label becomes its parent (superclass or null) with prob. p."""
        is_fine = labels < self.num_classes
        drop = (torch.rand(labels.shape, device=labels.device) < self.dropout_prob) & is_fine
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
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


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
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


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
    """
    Diffusion Transformer. With `num_superclasses` > 0 the label table is a TieredEmbedder with superclass
    rows; `norm_affine` gives the LayerNorms the scale/offset that FineDiffusion trains.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, num_superclasses=0,
                 class_to_superclass=None, null_row=True, norm_affine=False, pos_embed_scale=1.0):
        super().__init__()
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, class_dropout_prob, class_to_superclass,
                                         num_superclasses, null_row)
        grid_size = input_size // patch_size
        # Fixed sin-cos positions; DiffFit's trick for 512 px from a 256 px model is pos_embed_scale=0.5.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, grid_size, pos_embed_scale)
        self.pos_embed = nn.Parameter(torch.from_numpy(pos_embed).float().unsqueeze(0), requires_grad=False)
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
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                              self.final_layer.linear]:
            nn.init.zeros_(layer.weight)  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(layer.bias)

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
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        """
        Guided forward pass on a doubled batch, as the official samplers drive it: rows [:N] carry the
        condition c, rows [N:] its parent (the superclass for fine-grained guidance, the null row for
        ordinary CFG); both halves are evaluated on x[:N].  Returns (2N, C_out, H, W) whose eps channels
        are the guided eps in both halves and whose other channels (the variance) are each row's own.
        `guided_channels` = 3 reproduces the official DiT code, which guides only channels 0..2.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half]), t, y)
        k = self.in_channels if guided_channels is None else guided_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, parent_eps = eps.chunk(2)
        guided_eps = parent_eps + cfg_scale * (cond_eps - parent_eps)  # FineDiffusion Eq. 1
        return torch.cat([torch.cat([guided_eps, guided_eps]), rest], dim=1)


# -----------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos positional embedding (numpy, as the official code computes it)


def get_2d_sincos_pos_embed(embed_dim, grid_size, scale=1.0):
    """(grid_size**2, embed_dim): half the channels encode one grid axis, half the other."""
    coords = np.arange(grid_size, dtype=np.float32) * scale
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, -1)  # the official (w, h) ordering
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, grid[0]),
                           get_1d_sincos_pos_embed(embed_dim // 2, grid[1])], axis=1)


def get_1d_sincos_pos_embed(embed_dim, positions):
    """(M,) positions -> (M, embed_dim) [sin | cos] features."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# -----------------------------------------------------------------------------------------------------------
# DiT checkpoints: the official .pt files (a raw state dict), training checkpoints (official DiT and
# FineDiffusion ones, and ours: {"model", "ema", ...}) -> a checked, strict load


def dit_state_dict(checkpoint):
    """The weights to sample with: the EMA ones where a training checkpoint holds both."""
    for key in ("ema", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def dit_config_from_state_dict(state_dict):
    """Read a DiT's architecture off its tensor shapes: the kwargs that rebuild it (but the label split)."""
    if "x_embedder.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError("this is not a DiT state dict: it has no x_embedder.proj.weight / pos_embed "
                         f"(its first keys: {list(state_dict)[:5]})")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    name = next((n for n, c in DIT_CONFIGS.items() if (c["depth"], c["hidden_size"], c["patch_size"])
                 == (depth, hidden, patch)), None)
    out = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    return dict(model=name, depth=depth, hidden_size=hidden, patch_size=patch, in_channels=in_channels,
                input_size=int(state_dict["pos_embed"].shape[1] ** 0.5) * patch, learn_sigma=out == 2 * in_channels,
                table_rows=state_dict["y_embedder.embedding_table.weight"].shape[0],
                norm_affine="blocks.0.norm1.weight" in state_dict)


def describe_dit(state_dict):
    """One line a user can act on: which --model / --image-size / label table a state dict fits."""
    c = dit_config_from_state_dict(state_dict)
    size = f"--image-size {c['input_size'] * 8}" if c["in_channels"] == 4 else f"{c['input_size']} px pixel space"
    return (f"{c['model'] or 'a non-standard DiT'} (depth {c['depth']}, hidden {c['hidden_size']}, patch "
            f"{c['patch_size']}), {size}, {c['table_rows']} label rows (1000 ImageNet classes + null = 1001; "
            f"10,000 iNat species + 11 superclasses = 10,011), "
            f"{'affine' if c['norm_affine'] else 'plain'} LayerNorms")


def load_dit_weights(model, state_dict, source="the checkpoint"):
    """
    Strict load with errors that name every missing, unexpected or mis-shaped key and say what the file fits.
    pos_embed is a fixed function of the grid, not a learned weight: a different grid size is recomputed.
    """
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not (k == "pos_embed" and v.shape != own[k].shape)}
    state_dict.setdefault("pos_embed", own["pos_embed"])
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit this model."]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        try:
            lines.append(f"  the file holds {describe_dit(state_dict)}")
        except (ValueError, KeyError):
            pass
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    return model
