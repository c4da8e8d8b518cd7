"""
The networks (checkpoint.py reads their files): DiT (Peebles & Xie 2023) with the official key
names; FineDiffusion's TieredEmbedder, one label table of fine classes, superclasses and the null
label; the Stable Diffusion VAE, an AutoencoderKL with diffusers' key names.
"""
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -------------------------------------------------------------------------------------------------
# DiT configurations: S, B, L, XL from Table 1 of the DiT paper; T (tiny) is ours, for CPU toys

DIT_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12),
                                         "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items()
    for patch in (2, 4, 8)
}


def superclass_count(class_to_superclass):
    """S, the number of superclasses a fine -> superclass map names (ids 0..S-1)."""
    return max(class_to_superclass, default=-1) + 1


def modulate(x, shift, scale):
    """adaLN: scale and shift every token by per-sample vectors. x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# -------------------------------------------------------------------------------------------------
# Embedding layers for timesteps and labels

class TimestepEmbedder(nn.Module):
    """(N,) possibly fractional timesteps -> (N, D): DiT's 256 [cos | sin] features, then an MLP."""
    def __init__(self, hidden_size, frequencies=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequencies = frequencies

    def forward(self, t, max_period=10000):
        half = self.frequencies // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        args = t[:, None].float() * torch.exp(-math.log(max_period) * steps / half)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TieredEmbedder(nn.Module):
    """FineDiffusion's label table, rows [fine classes 0..C-1 | superclasses C..C+S-1 | null C+S].
    A dropped label c becomes parent[c]: its superclass row, else the null row (as DiT's)."""
    def __init__(self, num_classes, hidden_size, dropout_prob, class_to_superclass=None,
                 num_superclasses=0, null_row=True):
        super().__init__()
        assert num_superclasses > 0 or null_row, "no superclasses and no null row: cannot guide"
        self.num_classes, self.num_superclasses = num_classes, num_superclasses
        self.dropout_prob = dropout_prob
        self.null_index = num_classes + num_superclasses if null_row else None
        self.embedding_table = nn.Embedding(num_classes + num_superclasses + null_row, hidden_size)
        if num_superclasses:
            parent = num_classes + torch.as_tensor(class_to_superclass, device="cpu").long()
            assert parent.shape == (num_classes,) and parent.max() < num_classes + num_superclasses
        else:
            parent = torch.full((num_classes,), num_classes, dtype=torch.long, device="cpu")
        self.register_buffer("parent", parent, persistent=False)  # (C,) not an official key

    def parent_rows(self, labels, guidance):
        """The rows guidance pushes away from: "fine", each superclass row; "cfg", the null row."""
        if guidance == "fine" and self.num_superclasses:
            return self.parent[labels]
        if guidance == "cfg" and self.null_index is not None:
            return torch.full_like(labels, self.null_index)
        kinds = ["fine"] * bool(self.num_superclasses) + ["cfg"] * (self.null_index is not None)
        missing = "superclass rows" if guidance == "fine" else "null label row"
        raise ValueError(f"this model's label table has no {missing}: use {' or '.join(kinds)}"
                         " or none")

    def replace_by_parent(self, labels):
        """FineDiffusion training: a fine label becomes its parent (superclass or null), prob. p."""
        drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        drop &= labels < self.num_classes
        return torch.where(drop, self.parent[labels.clamp(max=self.num_classes - 1)], labels)

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            labels = self.replace_by_parent(labels)
        return self.embedding_table(labels)  # (N, D)


# -------------------------------------------------------------------------------------------------
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
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: condition c regresses shift, scale and gate of both branches."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm_affine=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)  # timm's Mlp: fc1, GELU (tanh), fc2
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(hidden_size, hidden),
                                             act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(hidden, hidden_size)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):  # x (N, T, D), c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


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


# -------------------------------------------------------------------------------------------------
# The Diffusion Transformer

class DiT(nn.Module):
    """Diffusion Transformer; norm_affine: LayerNorms with FineDiffusion's scale and offset."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, num_superclasses=0, class_to_superclass=None, null_row=True,
                 norm_affine=False, pos_embed_scale=1.0):
        super().__init__()
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.input_size, self.pos_embed_scale = input_size, pos_embed_scale
        self.hidden_size, self.mlp_ratio = hidden_size, mlp_ratio
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        patches = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.x_embedder = nn.Sequential(OrderedDict(proj=patches))  # timm's PatchEmbed key names
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = TieredEmbedder(num_classes, hidden_size, class_dropout_prob,
                                         class_to_superclass, num_superclasses, null_row)
        self.pos_embed = nn.Parameter(self.sincos_positions(), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm_affine)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_affine)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's: xavier linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer on flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.y_embedder.embedding_table, *self.t_embedder.mlp[::2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero = [*self.blocks, self.final_layer]  # adaLN-Zero: every block starts as the identity
        for layer in [b.adaLN_modulation[-1] for b in zero] + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def sincos_positions(self):
        """(1, T, D) DiT's get_2d_sincos_pos_embed (times pos_embed_scale): [sin | cos] per axis."""
        side = self.input_size // self.patch_size
        coords = np.arange(side, dtype=np.float32) * self.pos_embed_scale
        grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, -1)  # DiT's (w, h) order
        half = self.hidden_size // 2
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
        angles = [np.einsum("m,d->md", axis, omega) for axis in grid]  # (T, D/4) per axis
        positions = np.concatenate([wave(a) for a in angles for wave in (np.sin, np.cos)], axis=1)
        return torch.from_numpy(positions).float().unsqueeze(0)

    def resize(self, input_size):
        """Another grid side, positions scaled into the trained range (DiffFit: 512 px from 256)."""
        if input_size and input_size != self.input_size:
            self.pos_embed_scale *= self.input_size / input_size
            self.input_size = input_size
            positions = self.sincos_positions().to(self.pos_embed.device)
            self.pos_embed = nn.Parameter(positions, requires_grad=False)
        return self

    @property
    def config(self):
        """DiT(**model.config) builds this architecture afresh (peft's adapters aside)."""
        e = self.y_embedder
        parents = (e.parent - e.num_classes).tolist() if e.num_superclasses else None
        return dict(
            input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
            hidden_size=self.hidden_size, depth=len(self.blocks), num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, class_dropout_prob=e.dropout_prob, num_classes=e.num_classes,
            learn_sigma=self.out_channels != self.in_channels, num_superclasses=e.num_superclasses,
            class_to_superclass=parents, null_row=e.null_index is not None,
            norm_affine=self.final_layer.norm_final.weight is not None,
            pos_embed_scale=self.pos_embed_scale)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x (N, C, H, W) noisy latents, t (N,) timesteps, y (N,) label rows -> (N, C_out, H, W)."""
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:  # recompute in backward: less memory
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# -------------------------------------------------------------------------------------------------
# The Stable Diffusion VAE, AutoencoderKL: encoder -> q(z|x) = N(mean, std^2); decoder z -> x

VAE_NORM_EPS = 1e-6  # GroupNorm eps of the SD VAE


class VAEResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 steps and a residual, 1x1-projected if the width changes."""
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=VAE_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=VAE_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

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
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # "to_out.0": 1 is a dropout

    def forward(self, x):  # (N, C, H, W)
        N, C, H, W = x.shape
        h = self.group_norm(x).reshape(N, C, H * W).transpose(1, 2)  # (N, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)


class VAELevel(nn.Module):
    """One resolution level (DownEncoderBlock2D, UpDecoderBlock2D): ResNet blocks, then resampling.
    Down: pad right and bottom by one, a stride-2 3x3 conv; up: 2x nearest-neighbour, a 3x3 conv."""
    def __init__(self, in_channels, out_channels, num_resnets, groups, resample=None):
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_resnets - 1)
        self.resnets = nn.ModuleList([VAEResnetBlock(w, out_channels, groups) for w in widths])
        self.resample = resample  # "downsamplers", "upsamplers" or None: diffusers' key names
        if resample:
            stride, padding = (2, 0) if resample == "downsamplers" else (1, 1)
            conv = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=padding)
            setattr(self, resample, nn.ModuleList([nn.ModuleDict(dict(conv=conv))]))  # .0.conv

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "downsamplers":  # (H, W) -> (H/2, W/2)
            return self.downsamplers[0].conv(F.pad(x, (0, 1, 0, 1)))
        if self.resample == "upsamplers":  # (h, w) -> (2h, 2w)
            return self.upsamplers[0].conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class VAECoder(nn.Module):
    """The encoder (levels, mid block): image -> moments (N, 2*latent, H/f, W/f), f = 2^(levels-1);
    or the decoder: the mid block, levels widest first, one more ResNet each."""
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups,
                 is_encoder):
        super().__init__()
        chans = block_out_channels if is_encoder else block_out_channels[::-1]
        resample = "downsamplers" if is_encoder else "upsamplers"
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        levels = nn.ModuleList([
            VAELevel(chans[max(i - 1, 0)], chans[i], layers_per_block + (not is_encoder), groups,
                     resample if i < len(chans) - 1 else None) for i in range(len(chans))])
        setattr(self, "down_blocks" if is_encoder else "up_blocks", levels)
        width = block_out_channels[-1]  # the mid block: ResNet, attention, ResNet
        self.mid_block = nn.ModuleDict(dict(
            attentions=nn.ModuleList([VAEAttention(width, groups)]),
            resnets=nn.ModuleList([VAEResnetBlock(width, width, groups) for _ in range(2)])))
        (first, second), (attention,) = self.mid_block.resnets, self.mid_block.attentions
        mid = [first, attention, second]
        self.steps = [*levels, *mid] if is_encoder else [*mid, *levels]  # in order, not registered
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for step in self.steps:
            x = step(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(std^2)) of the encoder's moments (N, 2*latent, h, w)."""
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps, eps drawn on the generator's device: a seed's z on any device."""
        mean, device = self.mean, generator.device if generator is not None else self.mean.device
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
        return mean + self.std * eps.to(mean.device)


class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022); SD VAE defaults."""
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215):
        super().__init__()
        # diffusion models see z * scaling_factor, of about unit variance (LDM's scale_factor)
        self.scaling_factor, self.latent_channels = scaling_factor, latent_channels
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)  # all levels but the last halve
        shape = block_out_channels, layers_per_block, norm_num_groups
        self.encoder = VAECoder(in_channels, 2 * latent_channels, *shape, is_encoder=True)
        self.decoder = VAECoder(latent_channels, out_channels, *shape, is_encoder=False)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @classmethod
    def from_config(cls, config):
        """From a diffusers config.json dict; what this architecture cannot vary is checked."""
        for field, only in (("down_block_types", "DownEncoderBlock2D"),
                            ("up_block_types", "UpDecoderBlock2D"), ("act_fn", "silu")):
            given = config.get(field, only)
            if any(v != only for v in ([given] if isinstance(given, str) else given)):
                raise ValueError(f"unsupported VAE {field} {given!r}: only {only} is implemented")
        fields = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                  "latent_channels", "norm_num_groups", "scaling_factor")
        return cls(**{k: config[k] for k in fields if k in config})

    def encode(self, x):  # (N, 3, H, W) in [-1, 1] -> q(z|x) over (N, 4, H/8, W/8) for the SD VAE
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):  # unscaled latent (N, 4, h, w) -> image (N, 3, 8h, 8w), about [-1, 1]
        return self.decoder(self.post_quant_conv(z))
