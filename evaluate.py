"""
The measurements of the FineDiffusion paper (Sec. 4.3 - 4.6), written out with torch, numpy and pillow:

1) FID (Heusel et al., 2017) with pytorch-fid's FID Inception network (the port of the TensorFlow graph that
   loads `pt_inception-2015-12-05-6726825d.pth`), overall and per superclass: Table 1's FID columns. From the same
   Inception pass, the rest of the evaluation suite of ADM (Dhariwal & Nichol, 2021) that DiT's tables report:
   sFID (Nash et al., 2021), Inception Score (Salimans et al., 2016) and improved precision and recall
   (Kynkäänniemi et al., 2019), overall.
2) LPIPS diversity (Zhang et al., 2018): LPIPS v0.1 (AlexNet) averaged over pairs of samples of the same class,
   overall and per superclass: Table 1's LPIPS columns.
3) The judge: a small classifier trained on a data set's real images that scores samples by whether they show the
   class asked for (the Classification Accuracy Score of Ravuri & Vinyals, 2019), at every rank of the taxonomy,
   with a Fréchet distance and a diversity figure in its own features.
4) Exact t-SNE (van der Maaten & Hinton, 2008) of the TieredEmbedder's label table, drawn as Figure 7.
(Table 2, parameters and training cost, is bench.py's.)

    python evaluate.py ref-stats --ref-data inat --ref /data/inat2021 --ref-split val --out ref256.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth  # also: --ref-data vegfru/toy, a folder tree, an .npz
    python evaluate.py fid --samples samples.npz --ref ref256.npz --inception ... --method Ours --results r.json
    python evaluate.py lpips --samples samples.npz --lpips-weights alex.pth alexnet-owt-7be5be79.pth --results r.json
    python evaluate.py table r.json                       # Table 1 as markdown
    python evaluate.py judge --data taxa --out judge.pt   # train the judge on the real images (the toy taxonomy)
    python evaluate.py score --judge judge.pt --samples samples.npz --results r.json   # accuracy at every rank
    python evaluate.py tsne --checkpoint results/001-DiT-XL-2-finediffusion   # Figure 7, into the run folder
    python evaluate.py data --data inat --data-path /data/inat2021 --check --save-hierarchy inat_classes.json
"""
import signal
signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads: a quiet exit (cli.run restores Python's)

import colorsys
import json
import math
import os
import pathlib
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import cli
from checkpoint import WEIGHTS_HELP, find_checkpoint, read_label_table, run_folder
from cli import POSITIVE, WORKERS, new_file, number
from data import (DATA_KINDS, Hierarchy, load_dataset, read_images, read_json, to_tensor,
                  toy_superclass_color)
from model import load_checked, load_state_dict_file

INCEPTION_SOURCE = ("The FID Inception weights are pytorch-fid's: https://github.com/mseitzer/pytorch-fid/releases/"
                    "download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
LPIPS_MIN_SIZE = 32  # px: smaller images vanish in AlexNet before its last layers
LPIPS_SOURCE = ("LPIPS v0.1 (alex) is two files: the linear heads `lpips/weights/v0.1/alex.pth` of the lpips package "
                "(github.com/richzhang/PerceptualSimilarity) and torchvision's AlexNet "
                "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth; pass both, or one file saved with "
                "torch.save(lpips.LPIPS(net='alex').state_dict(), path).")


# -----------------------------------------------------------------------------------------------------------
# The FID Inception network: Inception-v3 (Szegedy et al., 2016) as in the TensorFlow graph FID was defined with,
# i.e. pytorch-fid's: its FIDInceptionA/C/E_1 average-pool without counting the padding, FIDInceptionE_2 max-pools.

class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the TensorFlow value) -> ReLU."""
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the FID blocks' pool branch


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorized 7x7 convolutions (1x7 and 7x1)."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b: average pool, Mixed_7c: max pool) with 1x3 / 3x1 splits."""
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(dbl),
                          self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], dim=1)  # (N, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> the 2048-d pool3 features FID is computed on (`features`: all that ADM's
    evaluation suite reads, from the same pass)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's 1008 logits: the Inception Score's (its weight only)

    def features(self, x):
        """Images (N, 3, H, W) in [0, 1] -> pool3 (N, 2048) for FID, precision and recall; spatial (N, 2023) for sFID;
        logits (N, 1008) for the Inception Score: one pass gives all three."""
        # pytorch-fid with resize_input and normalize_input: bilinear to 299x299, then [0, 1] -> [-1, 1]
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1  # (N, 3, 299, 299)
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (N, 768, 17, 17) ... (N, 2048, 8, 8)
            if block is self.Mixed_6d:
                # sFID's features (Nash et al., 2021; ADM's evaluator): the first 7 channels of the TF graph's
                # `mixed_6/conv`. The graph numbers its blocks mixed, mixed_1, ..., mixed_10 (= Mixed_5b ... 7c), so
                # that is Mixed_6d's 1x1 branch, after its ReLU: channels 0..191 of the block's output. Flattened in
                # TF's (H, W, C) order as ADM flattens them (the Fréchet distance does not depend on the order).
                spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7 = 2023)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        # the logits as the Inception Score's code (Salimans et al.) and ADM's take them: pool3 times the weight of
        # the graph's softmax/logits/MatMul, without the bias that the graph adds after it
        return pool3, spatial, pool3 @ self.fc.weight.T  # ..., (N, 1008)

    def forward(self, x):
        return self.features(x)[0]  # (N, 2048) pool3


def inception_from_state_dict(state_dict, source="the state dict"):
    """A checked, strict load; half-precision weights are cast to float32, the precision the network runs in."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return load_checked(FIDInceptionV3(), state_dict, source, INCEPTION_SOURCE).eval().requires_grad_(False)


def load_inception(path, device="cpu"):
    return inception_from_state_dict(load_state_dict_file(path, INCEPTION_SOURCE), path).to(device)


# -----------------------------------------------------------------------------------------------------------
# LPIPS v0.1 with AlexNet features (Zhang et al., 2018): unit-normalize each layer's activations over channels,
# square the difference, weight the channels with a learned 1x1 conv, average over space, sum over the 5 layers.

class ScalingLayer(nn.Module):
    """[-1, 1] inputs -> the statistics AlexNet was trained on (constants of LPIPS, stored in its state dict)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


def numbered(first_index, *layers):
    """A Sequential whose layers keep their indices in torchvision's AlexNet `features` (the keys say net.sliceK.i)."""
    return nn.Sequential(OrderedDict((str(first_index + i), layer) for i, layer in enumerate(layers)))


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet `features`, cut after each ReLU: relu1..relu5 with 64, 192, 384, 256, 256 channels."""
    def __init__(self):
        super().__init__()
        self.slice1 = numbered(0, nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU())
        self.slice2 = numbered(2, nn.MaxPool2d(3, stride=2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU())
        self.slice3 = numbered(5, nn.MaxPool2d(3, stride=2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU())
        self.slice4 = numbered(8, nn.Conv2d(384, 256, 3, padding=1), nn.ReLU())
        self.slice5 = numbered(10, nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())

    def forward(self, x):
        features = [x]
        for layer in (self.slice1, self.slice2, self.slice3, self.slice4, self.slice5):
            features.append(layer(features[-1]))
        return features[1:]  # relu1..relu5


class LinearHead(nn.Module):
    """One layer's channel weights: a 1x1 conv to one channel, where lpips keeps it (lin{k}.model.1.weight)."""
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Two image batches (N, 3, H, W) in [-1, 1] -> their perceptual distances (N,)."""
    def __init__(self):
        super().__init__()
        self.scaling_layer, self.net = ScalingLayer(), AlexNetFeatures()
        heads = [LinearHead(c) for c in (64, 192, 384, 256, 256)]
        for k, head in enumerate(heads):
            self.add_module(f"lin{k}", head)
        self.lins = nn.ModuleList(heads)  # lpips registers each head twice: lin{k} and lins.{k} are one module

    def forward(self, a, b):
        n = a.shape[0]
        distance = 0
        for head, f in zip(self.lins, self.net(self.scaling_layer(torch.cat([a, b])))):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            distance = distance + head.model((f[:n] - f[n:]).square()).mean(dim=(2, 3))  # (N, 1)
        return distance[:, 0]


def lpips_from_state_dict(state_dict, source="the state dict"):
    """LPIPS from what the user has: an LPIPS state dict, the lpips package's lin file (lin0..lin4 only),
    torchvision's AlexNet (`features.i.*`, `classifier.*`), or a merge of those; then a strict, checked load."""
    model, slice_of = LPIPS(), {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # torchvision `features.i` -> LPIPS `net.slice{k}.i`
    merged = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}  # fixed constants
    for key, value in state_dict.items():
        if key.startswith("features."):
            index, rest = key[len("features."):].split(".", 1)
            key = f"net.slice{slice_of.get(int(index), '?')}.{index}.{rest}"
        if not key.startswith("classifier."):  # AlexNet's classifier is not part of LPIPS
            merged[key] = value
    for k in range(5):  # each head's two registrations: one given, the other is filled from it
        first, second = f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight"
        if first in merged or second in merged:
            merged[first], merged[second] = merged.get(first, merged.get(second)), merged.get(second, merged.get(first))
    return load_checked(model, merged, source, LPIPS_SOURCE).eval().requires_grad_(False)


def load_lpips(paths, device="cpu"):
    """LPIPS from one combined file or from the lin file plus torchvision's AlexNet file."""
    state_dict = {k: v for path in paths for k, v in load_state_dict_file(path, LPIPS_SOURCE).items()}
    return lpips_from_state_dict(state_dict, " + ".join(paths)).to(device)


# -----------------------------------------------------------------------------------------------------------
# The Fréchet distance between two Gaussians fitted to Inception features (Heusel et al., 2017):
#   FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
# S1 S2 has the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace of its square root is
# the sum of square roots of a symmetric eigendecomposition: no complex parts, fine for rank-deficient S.

def feature_stats(features):
    """(N, D) features -> mean (D,) and covariance (D, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        return math.nan  # non-finite features (a diverged model's samples): NaN, never the best possible 0
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)  # S1^(1/2); round-off negative eigenvalues clipped to 0
    root1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))  # round-off: >= 0


# -----------------------------------------------------------------------------------------------------------
# The rest of ADM's evaluation suite (Dhariwal & Nichol, 2021: guided-diffusion's evaluations/evaluator.py), which
# DiT's tables report beside FID. sFID is frechet_distance on the spatial features; the Inception Score and improved
# precision and recall are below. Distances are squared throughout, as ADM compares them (the same comparisons).

IS_SPLIT = 5000  # samples per Inception Score split, ADM's: 10 splits of a 50,000-sample set
NEIGHBOURS = 3  # k of precision and recall, ADM's (and Kynkäänniemi et al.'s)
BLOCK_ENTRIES = 2**25  # distances precision_recall holds at once: 256 MB of float64, whatever the sizes of the sets


def inception_score(logits, split_size=IS_SPLIT):
    """The Inception Score (Salimans et al., 2016), IS = exp(E_x KL(p(y|x) || p(y))): p(y|x) the softmax of an image's
    logits (N, C), p(y) its mean over the split; the mean over splits of `split_size` images (the last may be
    shorter; fewer images: one split), as ADM computes it."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)  # log p(y|x), (N, C)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = part.logsumexp(dim=0) - math.log(len(part))  # log p(y) = log of the mean of p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)  # KL(p(y|x) || p(y)), (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


def squared_distance_blocks(a, b, block_entries=BLOCK_ENTRIES):
    """Rows of a (N, D) against all of b (M, D), float64 -> (rows, squared Euclidean distances (R, M)), R rows at a
    time so that a block holds at most `block_entries` (one row at least): |a|^2 - 2 a.b + |b|^2, clipped at 0 where
    round-off takes it below."""
    a_norms, b_norms = a.square().sum(dim=1), b.square().sum(dim=1)
    step = max(1, block_entries // len(b))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        yield rows, (a[rows] @ b.T).mul_(-2).add_(a_norms[rows, None]).add_(b_norms).clamp_min_(0)


def manifold_radii(features, k=NEIGHBOURS, block_entries=BLOCK_ENTRIES):
    """Improved precision and recall (Kynkäänniemi et al., 2019), Sec. 3: each point's squared distance to its k-th
    nearest neighbour in its own set (N, D) -> (N,), the radius of its ball; the point itself (at distance 0) is the
    nearest and is not counted."""
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k]
                      for _, d in squared_distance_blocks(features, features, block_entries)])


def precision_recall(sample_features, reference_features, k=NEIGHBOURS, device="cpu", block_entries=BLOCK_ENTRIES):
    """Improved precision and recall (Kynkäänniemi et al., 2019, Eq. 1-3) as ADM's evaluator computes them: a ball
    around each point of a set, reaching its k-th nearest neighbour, stands for the set's manifold; precision is the
    fraction of samples inside at least one reference ball, recall the fraction of reference points inside at least
    one sample ball (a point on a sphere is inside: ADM's <=). Features (N, D) and (M, D) -> (precision, recall)."""
    samples, reference = (torch.as_tensor(np.asarray(f), dtype=torch.float64, device=device)
                          for f in (sample_features, reference_features))
    sample_radii, reference_radii = (manifold_radii(f, k, block_entries) for f in (samples, reference))
    in_reference = torch.zeros(len(samples), dtype=torch.bool, device=device)
    in_samples = torch.zeros(len(reference), dtype=torch.bool, device=device)
    for rows, d in squared_distance_blocks(samples, reference, block_entries):  # (R, M): samples x reference
        in_reference[rows] = (d <= reference_radii).any(dim=1)  # Eq. 1 for the samples against the reference
        in_samples |= (d <= sample_radii[rows, None]).any(dim=0)  # and for the reference against the samples
    return in_reference.double().mean().item(), in_samples.double().mean().item()  # Eq. 2 and 3


# -----------------------------------------------------------------------------------------------------------
# Image sets. Samples: the ADM-style .npz that sample.py writes (uint8 NHWC `arr_0`, fine `labels`, and when the
# class hierarchy is known `superclass_labels` (0..S-1), `superclass_names`, `class_names`). References: the same
# .npz, or any data set of data.py (iNat 2021 val as distributed, a folder tree, ...) read lazily, centre-cropped.

def read_class_map(class_map):
    """A list of superclass ids or names, a JSON file of one, or a hierarchy {"class_to_superclass": [...],
    "superclass_names": [...]} (as checkpoints store it) -> (class_to_superclass (C,) int array, names or None)."""
    class_map = read_json(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    names = None
    if isinstance(class_map, dict):
        class_map, names = class_map["class_to_superclass"], class_map.get("superclass_names")
    if len(class_map) and isinstance(class_map[0], str):  # names: ids in sorted order, as folder trees list them
        names = sorted(set(class_map))
        class_map = [names.index(name) for name in class_map]
    return np.asarray(class_map, dtype=np.int64), None if names is None else [str(n) for n in names]


def read_image_npz(path, class_map=None):
    """An .npz of images -> dict(images (N, H, W, 3) uint8, labels, superclass_labels, superclass_names,
    class_names); a missing array is None. The pixels are read into memory (50,000 samples at 256 px: 9.8 GB)."""
    with open_npz(path, "arr_0") as f:
        data = {key: f.get(key) for key in ("labels", "superclass_labels", "superclass_names", "class_names")}
        data["images"] = images = f["arr_0"]
    cli.check((images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8)
              and f"{path}: arr_0 must be uint8 images (N, H, W, 3), found {images.dtype} {images.shape}")
    if class_map is not None and data["labels"] is not None:  # the map given by the user takes precedence
        class_to_superclass, names = read_class_map(class_map)
        data["superclass_labels"] = class_to_superclass[data["labels"]]
        data["superclass_names"] = names if names is not None else data["superclass_names"]
    for key in ("superclass_names", "class_names"):
        data[key] = None if data[key] is None else [str(n) for n in data[key]]
    return data


def read_image_set(path, kind=None, split=None, image_size=256, class_map=None):
    """An images .npz (read_image_npz), or a data set of data.py (kind inat/vegfru/folder/toy; a folder path
    defaults to "folder") read unmirrored at `image_size`: the same dict with the ImageDataset as "images"."""
    if kind is None and not os.path.isdir(path):
        return read_image_npz(path, class_map)
    dataset, hierarchy = load_dataset(kind or "folder", path, image_size, split, hflip=False)
    return dict(images=dataset, labels=dataset.labels,
                superclass_labels=np.asarray(hierarchy.class_to_superclass)[dataset.labels],
                superclass_names=hierarchy.superclass_names, class_names=hierarchy.class_names)


def image_batches(images, batch_size=50, num_workers=4):
    """An image set -> batches (rows (B,), images (B, 3, H, W) float in [0, 1]): slices of a uint8 array
    (N, H, W, 3), or an ImageDataset decoded in DataLoader workers (unreadable files are reported and skipped)."""
    if isinstance(images, np.ndarray):
        starts = tqdm(range(0, len(images), batch_size), desc="images")
        batches = ((np.arange(i, min(i + batch_size, len(images))), images[i:i + batch_size]) for i in starts)
    else:
        batches = read_images(images, batch_size=batch_size, num_workers=num_workers)
    for rows, pixels in batches:
        yield rows, torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255


# -----------------------------------------------------------------------------------------------------------
# Table 1's numbers. FID overall and per superclass: statistics kept as {name: (mu, sigma)}, "overall" first. The
# rest of ADM's suite, overall. ref-stats caches the reference's side of all of them in an .npz (save_statistics).
# LPIPS diversity: the mean LPIPS distance between two samples of the same class (higher = more diverse).

# Precision and recall's features, as ref-stats keeps them and as the samples are compared: float16 halves the file
# (iNat 2021 val, 100,000 images: 0.4 GB, not 0.8), and its rounding (2^-11 of a value) is ADM's too, which rounds
# them to float16 and computes the distances in float16 as well (here: in float64). The samples are rounded alike,
# so an image in both sets is at distance 0.
PR_FEATURES_DTYPE = np.float16


def set_statistics(features, superclass_labels=None, superclass_names=None):
    """Features of an image set -> {"overall": (mu, sigma), superclass name: (mu, sigma), ...}."""
    stats = {"overall": feature_stats(features)}
    for s in [] if superclass_labels is None else np.unique(superclass_labels):
        rows = superclass_labels == s
        if rows.sum() >= 2:  # a covariance needs two samples
            name = superclass_names[s] if superclass_names is not None else f"superclass {s}"
            stats[name] = feature_stats(features[rows])
    return stats


def image_set_statistics(features, superclass_labels=None, superclass_names=None):
    """One Inception pass over an image set (inception_features) -> what the metrics compare: {"fid": set_statistics
    of pool3, "sfid": (mu, sigma) of the spatial features, "pool3": the pool3 features for precision and recall,
    "logits": for the Inception Score}."""
    return dict(fid=set_statistics(features["pool3"], superclass_labels, superclass_names),
                sfid=feature_stats(features["spatial"]), pool3=features["pool3"].astype(PR_FEATURES_DTYPE),
                logits=features["logits"])


def save_statistics(path, stats):
    """A reference's image_set_statistics -> the .npz of ref-stats: names (K,), mu (K, 2048), sigma (K, 2048, 2048)
    overall and per superclass (FID); mu_s (2023,), sigma_s (2023, 2023) (sFID, named as in ADM's reference files);
    pool3 (N, 2048) float16 (precision, recall). The Inception Score needs no reference: no logits are kept."""
    fid = stats["fid"]
    np.savez(path, names=np.array(list(fid)), mu=np.stack([mu for mu, _ in fid.values()]),
             sigma=np.stack([sigma for _, sigma in fid.values()]), mu_s=stats["sfid"][0], sigma_s=stats["sfid"][1],
             pool3=stats["pool3"])


def load_statistics(path):
    """The statistics in an .npz written by save_statistics (`ref-stats`) -> {"fid", "sfid", "pool3"} as
    image_set_statistics has them; "sfid" and "pool3" are None in a file of an older version (FID's alone). None for
    any other file."""
    if os.path.isfile(path) and str(path).endswith(".npz"):
        with open_npz(path) as f:
            if "mu" in f:
                return dict(fid={str(name): (mu, sigma) for name, mu, sigma in zip(f["names"], f["mu"], f["sigma"])},
                            sfid=(f["mu_s"], f["sigma_s"]) if "mu_s" in f else None,
                            pool3=f["pool3"] if "pool3" in f else None)


def open_npz(path, *required):
    """np.load of an .npz a user gave, which holds the arrays `required`; a truncated or foreign file says so."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        if missing := [name for name in required if name not in f.files]:
            f.close()
            raise ValueError(f"it has no {missing[0]} (it holds {f.files[:6]})")
        return f
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz of the kind expected ({e}): write it again") from None


def fid_by_superclass(sample_stats, reference_stats):
    """{name: FID} for "overall" and every superclass both sets have."""
    return {name: frechet_distance(*sample_stats[name], *reference_stats[name])
            for name in sample_stats if name in reference_stats}


def missing_metrics(reference):
    """Those of sFID, precision and recall that a reference (load_statistics) cannot give: an older file's."""
    return [name for name, key in (("sFID", "sfid"), ("precision", "pool3"), ("recall", "pool3"))
            if reference[key] is None]


def suite_metrics(samples, reference, device="cpu"):
    """The samples' and the reference's image_set_statistics (or load_statistics') -> ADM's suite: {"fid": {name:
    FID}, "sfid", "is", "precision", "recall"}, less those of missing_metrics(reference)."""
    values = {"fid": fid_by_superclass(samples["fid"], reference["fid"])}
    if reference["sfid"] is not None:
        values["sfid"] = frechet_distance(*samples["sfid"], *reference["sfid"])
    values["is"] = inception_score(samples["logits"])
    if reference["pool3"] is not None:
        values["precision"], values["recall"] = precision_recall(samples["pool3"], reference["pool3"], device=device)
    return values


def too_few_images(image_set, given):
    """The line that refuses an image set (`given`: its flag and path) too small for precision and recall, whose balls
    reach each image's k-th nearest neighbour among the others; or None."""
    n = len(image_set["images"])
    return n <= NEIGHBOURS and (f"{given}: {n} images, and precision and recall need at least {NEIGHBOURS + 1} (each "
                                f"image's ball reaches its k = {NEIGHBOURS}-th nearest neighbour among the others)")


@torch.no_grad()
def inception_features(image_set, inception, batch_size=50, num_workers=4, device="cpu"):
    """An image set (read_image_set) -> one Inception pass over it: {"pool3", "spatial", "logits"} float32 arrays
    (FIDInceptionV3.features), and the superclass labels of their rows (None without)."""
    rows, outputs = [], []
    for index, batch in image_batches(image_set["images"], batch_size, num_workers):
        rows.append(index)
        outputs.append([f.cpu() for f in inception.features(batch.to(device))])
    features = {name: torch.cat(kind).numpy() for name, kind in zip(("pool3", "spatial", "logits"), zip(*outputs))}
    labels = image_set["superclass_labels"]
    return features, None if labels is None else labels[np.concatenate(rows)]


def same_class_pairs(labels, pairs_per_class=10, seed=0):
    """(P, 2) index pairs i < j with labels[i] == labels[j]; at most `pairs_per_class` per class, drawn at random."""
    rng = np.random.default_rng(seed)
    pairs = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        i, j = np.triu_indices(len(members), k=1)
        if len(i) > pairs_per_class:
            keep = np.sort(rng.choice(len(i), pairs_per_class, replace=False))
            i, j = i[keep], j[keep]
        pairs.append(np.stack([members[i], members[j]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


@torch.no_grad()
def lpips_diversity(lpips, images, labels, superclass_labels=None, superclass_names=None, pairs_per_class=10,
                    batch_size=50, seed=0, device="cpu"):
    """uint8 images (N, H, W, 3) -> {"overall": mean LPIPS over same-class pairs, superclass: mean over its pairs}."""
    pairs = same_class_pairs(labels, pairs_per_class, seed)
    cli.check(len(pairs) == 0 and "LPIPS diversity needs at least two samples of one class")
    distances = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="LPIPS pairs"):
        a, b = (to_tensor(images[pairs[start:start + batch_size, k]]).to(device) for k in (0, 1))  # [-1, 1]
        distances.append(lpips(a, b).double().cpu())
    distances = torch.cat(distances).numpy()
    result = {"overall": float(distances.mean())}
    if superclass_labels is not None:
        pair_superclass = superclass_labels[pairs[:, 0]]
        for s in np.unique(pair_superclass):
            name = superclass_names[s] if superclass_names is not None else f"superclass {s}"
            result[name] = float(distances[pair_superclass == s].mean())
    return result


# -----------------------------------------------------------------------------------------------------------
# The judge: a small classifier trained on the real images of a data set, which scores samples by whether they show
# the class asked for, at every rank of the taxonomy (as the Classification Accuracy Score of Ravuri & Vinyals 2019
# measures what FID misses), and whose features give a Fréchet distance and a diversity figure with no downloaded
# network. Its own accuracy on held-out real images is the ceiling any model's samples can reach. A judge file
# (torch.save, read with weights_only) holds its weights, its data's hierarchy and fingerprint, that accuracy, and
# the statistics of the real images' features the samples are compared with.

JUDGE_FORMAT = 1
JUDGE_HELD_OUT = 8  # every 8th image of each class is held out: the judge never trains on it


class Judge(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> (features (N, 4w), fine-class logits (N, C)): three stages of two 3x3
    conv-BN-ReLU layers, halved between stages by max-pooling, then a global average."""
    def __init__(self, num_classes, width=32):
        super().__init__()
        layers, channels = [], 3
        for stage in range(3):
            layers += [nn.MaxPool2d(2)] * (stage > 0)
            for _ in range(2):
                layers += [nn.Conv2d(channels, width << stage, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width << stage), nn.ReLU()]
                channels = width << stage
        self.body, self.head = nn.Sequential(*layers), nn.Linear(channels, num_classes)

    def forward(self, x):
        features = self.body(2 * x - 1).mean(dim=(2, 3))  # (N, 4w)
        return features, self.head(features)  # (N, 4w), (N, C)


def held_out(labels, every=JUDGE_HELD_OUT):
    """A mask of the images held out: the every-th, 2 every-th, ... image of each class, in the data set's order."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    first = np.searchsorted(labels[order], labels[order])  # where each image's class begins in that order
    mask = np.zeros(len(labels), dtype=bool)
    mask[order] = (np.arange(len(labels)) - first) % every == every - 1
    return mask


def train_judge(images, labels, num_classes, epochs=10, batch_size=64, width=32, lr=3e-3, seed=0, device="cpu"):
    """A Judge trained on uint8 images (N, S, S, 3) of fine `labels`: AdamW, a cosine schedule, and each batch shifted
    by up to 2 px (never mirrored: a mirror can be another class, as in the toy sets)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(num_classes, width).to(device).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    pixels, labels, size = torch.as_tensor(images).permute(0, 3, 1, 2), torch.as_tensor(labels), images.shape[1]
    for _ in (bar := tqdm(range(epochs), desc="training the judge")):
        for rows in torch.randperm(len(images), generator=generator).split(batch_size):
            dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
            x = F.pad(pixels[rows].float() / 255, (2, 2, 2, 2), mode="replicate")[:, :, dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(judge(x.to(device))[1], labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_images(judge, images, batch_size=256, device="cpu"):
    """uint8 images (N, S, S, 3) -> (features (N, D) float64, fine-class probabilities (N, C) float64)."""
    features, probabilities = [], []
    for _, batch in image_batches(images, batch_size):
        f, logits = judge(batch.to(device))
        features.append(f.double().cpu())
        probabilities.append(logits.double().softmax(dim=1).cpu())
    return torch.cat(features).numpy(), torch.cat(probabilities).numpy()


def rank_accuracy(probabilities, labels, hierarchy):
    """{rank: accuracy} at every rank, fine first (a rank's guess: its group of the most fine-class probability),
    and {rank: chance}, the accuracy of a uniformly random fine-class guess."""
    accuracy, chance = {}, {}
    for rank, groups, of_class in hierarchy.ranks():
        of_class = torch.as_tensor(of_class)
        by_group = torch.zeros(len(labels), len(groups), dtype=torch.float64).index_add_(
            1, of_class, torch.as_tensor(probabilities))  # (N, G): the probabilities of each group's classes summed
        truth = of_class[torch.as_tensor(labels)]
        accuracy[rank] = (by_group.argmax(dim=1) == truth).double().mean().item()
        chance[rank] = (torch.bincount(of_class, minlength=len(groups))[truth] / len(of_class)).double().mean().item()
    return accuracy, chance


def within_class_spread(features, labels, num_classes):
    """(C,) the mean squared distance of a class's features to their mean (NaN for a class of fewer than 2)."""
    spread = np.full(num_classes, np.nan)
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) >= 2:
            spread[c] = ((f - f.mean(axis=0)) ** 2).sum(axis=1).mean()
    return spread


def make_judge(dataset, hierarchy, data, epochs=10, width=32, seed=0, num_workers=4, device="cpu"):
    """Train a judge on a data set's real images (unmirrored) -> the judge file's contents. `data` describes them
    (kind, path, split) for messages; their files and labels are fingerprinted."""
    rows, images = zip(*read_images(dataset, num_workers=num_workers))
    rows, images = np.concatenate(rows), torch.cat(images).numpy()
    labels = dataset.labels[rows]
    test = held_out(labels)
    judge = train_judge(images[~test], labels[~test], len(hierarchy.class_names), epochs, width=width, seed=seed,
                        device=device)
    features, probabilities = judge_images(judge, images, device=device)
    accuracy, chance = rank_accuracy(probabilities[test], labels[test], hierarchy)
    superclass_labels = np.asarray(hierarchy.class_to_superclass)[labels]
    stats = set_statistics(features, superclass_labels, hierarchy.superclass_names)
    return dict(format=JUDGE_FORMAT, width=width, image_size=dataset.image_size, state_dict=judge.state_dict(),
                hierarchy=hierarchy.to_dict(), held_out=accuracy, chance=chance,
                data=dict(data, files=dataset.fingerprint(),
                          images=len(labels), held_out_images=int(test.sum())),
                reference=dict(names=list(stats), mu=torch.as_tensor(np.stack([m for m, _ in stats.values()])),
                               sigma=torch.as_tensor(np.stack([s for _, s in stats.values()]))),
                class_spread=torch.as_tensor(within_class_spread(features, labels, len(hierarchy.class_names))))


def save_judge(contents, path):
    with open(path + ".tmp", "wb") as f:  # renamed when complete: a kill leaves no torn judge
        torch.save(contents, f)
    os.replace(path + ".tmp", path)


def load_judge(path):
    """A judge file -> (Judge, its contents), checked; another file says what it is and how to make a judge."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable judge file ({str(e).splitlines()[0][:120]}): make one with "
                         f"python evaluate.py judge --data ... --out judge.pt") from None
    if not isinstance(contents, dict) or contents.get("format") != JUDGE_FORMAT or "state_dict" not in contents:
        raise ValueError(f"{path} is no judge file of this version (format {JUDGE_FORMAT}): make one with python "
                         f"evaluate.py judge --data ... --out judge.pt")
    judge = Judge(len(contents["hierarchy"]["class_names"]), contents["width"])
    return load_checked(judge, contents["state_dict"], path, "make it with python evaluate.py judge").eval(), contents


def describe_judge(contents):
    """One line: what a judge was trained on and its accuracy on held-out real images."""
    data = contents["data"]
    where = " ".join(str(part) for part in (data["kind"], data.get("split"), data.get("path")) if part)
    return (f"judge of {where} at {contents['image_size']} px ({len(contents['hierarchy']['class_names'])} classes, "
            f"{data['images']:,} images); on its {data['held_out_images']:,} held-out real images: " + ", ".join(
                f"{rank} {acc:.3f}" for rank, acc in contents["held_out"].items()))


def score_samples(judge, contents, images, labels, device="cpu"):
    """Score uint8 samples (N, S, S, 3) of fine `labels` with a judge -> {accuracy, chance, real (the held-out
    ceiling), fine_by_superclass, fd (overall, per superclass), fd_mean (over superclasses), diversity}."""
    hierarchy = Hierarchy.from_dict(contents["hierarchy"])
    features, probabilities = judge_images(judge, images, device=device)
    accuracy, chance = rank_accuracy(probabilities, labels, hierarchy)
    superclass_labels = np.asarray(hierarchy.class_to_superclass)[labels]
    correct = probabilities.argmax(axis=1) == labels
    by_superclass = {hierarchy.superclass_names[s]: float(correct[superclass_labels == s].mean())
                     for s in np.unique(superclass_labels)}
    reference = {name: (mu.numpy(), sigma.numpy()) for name, mu, sigma in zip(
        contents["reference"]["names"], contents["reference"]["mu"], contents["reference"]["sigma"])}
    fd = fid_by_superclass(set_statistics(features, superclass_labels, hierarchy.superclass_names), reference)
    spread = within_class_spread(features, labels, len(hierarchy.class_names))
    judged = ~np.isnan(spread)  # classes with two samples or more
    return dict(accuracy=accuracy, chance=chance, real=contents["held_out"], fine_by_superclass=by_superclass,
                fd=fd, fd_mean=float(np.mean([v for k, v in fd.items() if k != "overall"])),
                diversity=float(spread[judged].sum() / contents["class_spread"].numpy()[judged].sum()))


def read_samples(path, contents):
    """The samples a judge is to score -> (uint8 images (N, S, S, 3), fine labels (N,)): sample.py's .npz, or its
    folder of PNGs 000000.png ... (image i is of class i mod C, as sample.py writes them). Checked against the judge:
    the image size, and the class names where the .npz has them."""
    classes, size = contents["hierarchy"]["class_names"], contents["image_size"]
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        cli.check(not files and f"{path} holds no PNGs: give sample.py's .npz, or its folder of PNGs",
                  any(not f[:-4].isdigit() for f in files) and f"{path}: PNGs named other than NNNNNN.png (as "
                  f"sample.py writes them) carry no class: give sample.py's .npz, which holds the labels")
        first = Image.open(os.path.join(path, files[0]))
        cli.check(first.size != (size, size) and f"{path}: its images are {first.size[0]}x{first.size[1]} px, and "
                  f"the judge judges {size}x{size} px images: sample at --image-size {size}")
        images = np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in files])
        labels, names = np.array([int(f[:-4]) for f in files]) % len(classes), None
    else:
        samples = read_image_npz(path)
        images, labels, names = samples["images"], samples["labels"], samples["class_names"]
        cli.check(labels is None and f"{path} has no `labels`: the judge checks each sample's class")
    cli.check(images.shape[1:3] != (size, size) and f"{path}: its images are {images.shape[2]}x{images.shape[1]} "
              f"px, and the judge judges {size}x{size} px images: sample at --image-size {size}",
              names is not None and list(names) != list(classes) and f"{path} is of {len(names)} classes "
              f"({names[0]}, ...), and the judge knows the {len(classes)} of {contents['data']['kind']} "
              f"{contents['data'].get('split') or ''} ({classes[0]}, ...): give a judge of the data the model learned",
              (labels.min() < 0 or labels.max() >= len(classes)) and f"{path}: labels {labels.min()}..{labels.max()} "
              f"are not all classes of the judge (0..{len(classes) - 1}): give a judge of the data the model learned")
    return images, np.asarray(labels, dtype=np.int64)


def print_scores(scores):
    ranks = list(scores["accuracy"])
    print("accuracy:  " + "  ".join(f"{r} {scores['accuracy'][r]:.3f}" for r in ranks)
          + "\n  chance:  " + "  ".join(f"{r} {scores['chance'][r]:.3f}" for r in ranks)
          + "\n  real:    " + "  ".join(f"{r} {scores['real'][r]:.3f}" for r in ranks) + "  (held-out real images)"
          + "\nfine accuracy per superclass: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                          scores["fine_by_superclass"].items())
          + f"\njudge FD: overall {scores['fd']['overall']:.2f}, mean per superclass {scores['fd_mean']:.2f}"
          + f"\ndiversity: {scores['diversity']:.3f} (within-class feature spread of samples / of real images)")


# -----------------------------------------------------------------------------------------------------------
# Exact t-SNE (van der Maaten & Hinton, 2008): Gaussian neighbourhoods of a given perplexity in the input, a 2-D
# Student-t kernel, KL(P || Q) minimized by gradient descent with momentum, per-coordinate gains, early exaggeration.
# Every pair is used: 10,011 labels take 0.8 GB per N x N float64 matrix, ~1 s an iteration on 2 CPU cores (or a GPU).

def conditional_probabilities(sq_distances, perplexity, steps=200, tolerance=1e-6):
    """p_{j|i} with each row's Gaussian precision found by bisection so that its entropy is log(perplexity)."""
    n = sq_distances.shape[0]
    others = ~torch.eye(n, dtype=torch.bool, device=sq_distances.device)
    d = sq_distances - sq_distances.masked_fill(~others, math.inf).min(dim=1, keepdim=True).values  # stability
    beta = torch.ones(n, 1, dtype=d.dtype, device=d.device)  # precision 1 / (2 sigma_i^2)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    for _ in range(steps):
        p = torch.where(others, torch.exp(-d * beta), 0)  # (N, N)
        total = p.sum(dim=1, keepdim=True)
        entropy = total.log() + beta * (d * p).sum(dim=1, keepdim=True) / total  # H(P_i) in nats
        if (entropy - math.log(perplexity)).abs().max() < tolerance:
            break
        too_flat = entropy > math.log(perplexity)  # too many neighbours: sharpen
        lo, hi = torch.where(too_flat, beta, lo), torch.where(too_flat, hi, beta)
        beta = torch.where(too_flat, torch.where(hi.isinf(), beta * 2, (beta + hi) / 2), (beta + lo) / 2)
    return p / total


def tsne(x, perplexity=30.0, iterations=1000, learning_rate=None, exaggeration=12.0, exaggeration_steps=250,
         seed=0, device="cpu", progress=True):
    """(N, D) points -> (N, 2) embedding, deterministic given the seed."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
    n = x.shape[0]
    p = conditional_probabilities(torch.cdist(x, x).square(), min(perplexity, (n - 1) / 3))
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)  # symmetric joint probabilities p_ij (Sec. 3.1)
    y = (1e-4 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(device)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    learning_rate = learning_rate or max(n / exaggeration, 50.0)  # Belkina et al. (2019); large steps eject points
    for step in tqdm(range(iterations), desc="t-SNE", disable=not progress):
        kernel = torch.cdist(y, y).square_().add_(1).reciprocal_()  # Student-t, one degree of freedom (Eq. 4)
        kernel.fill_diagonal_(0)
        q = (kernel / kernel.sum()).clamp_min_(1e-12)
        alpha, momentum = (exaggeration, 0.5) if step < exaggeration_steps else (1.0, 0.8)  # early exaggeration
        w = q.neg_().add_(p, alpha=alpha).mul_(kernel)  # (alpha p_ij - q_ij) k_ij
        grad = 4 * (w.sum(dim=1, keepdim=True) * y - w @ y)  # dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j) k_ij (Eq. 5)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = momentum * update - learning_rate * gains * grad
        y = y + update
        y = y - y.mean(dim=0)
    return y.cpu().numpy()


# -----------------------------------------------------------------------------------------------------------
# Figure 7: the t-SNE of the label table

def embed_label_table(table, class_to_superclass, num_superclasses, **tsne_options):
    """Rows [fine C | superclass S | (null)] -> 2-D positions of the fine rows, superclass means, superclass rows.
    The means are embedded with the rows (t-SNE places no new points later), so Figure 7 shows how central they land."""
    table = torch.as_tensor(table, dtype=torch.float64)
    c = len(class_to_superclass)
    fine, superclass = table[:c], table[c:c + num_superclasses]  # a trailing null row is not part of Figure 7
    members = torch.as_tensor(class_to_superclass)[None, :] == torch.arange(num_superclasses)[:, None]  # (S, C)
    means = (members.double() @ fine) / members.sum(dim=1, keepdim=True)
    y = tsne(torch.cat([fine, means, superclass]).numpy(), **tsne_options)
    return y[:c], y[c:c + num_superclasses], y[c + num_superclasses:]


def superclass_colors(names):
    """A colour per superclass: the toy set's where it has one, else evenly spread hues of alternating value."""
    rgb = lambda i: colorsys.hsv_to_rgb(i / len(names), 0.8, 0.95 if i % 2 else 0.7)
    return [toy_superclass_color(name) or tuple(round(255 * v) for v in rgb(i)) for i, name in enumerate(names)]


def draw_marker(draw, center, kind, size, color):
    """Figure 7's markers: "dot" (a fine class), "star" (a superclass's mean), "cross" (a superclass row)."""
    x, y = center
    if kind == "dot":
        draw.ellipse([x - size, y - size, x + size, y + size], fill=color)
    elif kind == "star":
        radii = [size, 0.4 * size] * 5  # five points, five notches
        corners = [(x + r * math.sin(k * math.pi / 5), y - r * math.cos(k * math.pi / 5)) for k, r in enumerate(radii)]
        draw.polygon(corners, fill=color, outline="black")
    else:
        for width, fill in ((7, "black"), (3, color)):  # a black-edged "+"
            draw.line([x - size, y, x + size, y], fill=fill, width=width)
            draw.line([x, y - size, x, y + size], fill=fill, width=width)


def draw_figure7(fine_xy, class_to_superclass, mean_xy, superclass_xy, superclass_names, path, size=(1400, 1000),
                 title="t-SNE of label embeddings"):
    """The embedding as a PNG: the plot left, each axis stretched to fill it (t-SNE's carry no unit), a legend right."""
    (width, height), margin = size, 30
    legend_width, font_px = width // 4, max(12, height // 60)
    font = ImageFont.load_default(size=font_px)
    r = max(1.5, min(5.0, 150 / math.sqrt(len(fine_xy))))  # dots shrink as classes grow in number
    inset = 4 * r + 4  # a star's or a cross's half width: markers at the edge stay whole
    points = np.concatenate([fine_xy, mean_xy, superclass_xy])
    lo, span = points.min(axis=0), np.ptp(points, axis=0).clip(min=1e-12)
    scale = np.array([width - legend_width - 2 * margin, height - 3 * margin]) - 2 * inset
    to_pixels = lambda xy: [(margin + inset + u, 2 * margin + inset + v) for u, v in (xy - lo) / span * scale]
    colors = superclass_colors(superclass_names)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin // 2), title, fill="black", font=font)
    for center, s in zip(to_pixels(fine_xy), class_to_superclass):
        draw_marker(draw, center, "dot", r, colors[s])
    for s, (mean, row) in enumerate(zip(to_pixels(mean_xy), to_pixels(superclass_xy))):
        draw_marker(draw, mean, "star", inset, colors[s])
        draw_marker(draw, row, "cross", inset, colors[s])
    # legend: one colour per superclass, then the three markers
    x0, line = width - legend_width + margin // 2, font_px + 8
    legend = [(name, "dot", colors[s]) for s, name in enumerate(superclass_names)] + [(None, None, None)]
    legend += [("fine class", "dot", "gray"), ("mean of its fine classes", "star", "gray"),
               ("superclass embedding", "cross", "gray")]
    for k, (label, kind, color) in enumerate(legend):
        if label:
            y = 2 * margin + k * line
            draw_marker(draw, (x0 + font_px / 2, y + font_px / 2), kind, font_px / 2 + 2, color)
            draw.text((x0 + font_px + 8, y), label, fill="black", font=font)
    image.save(path)


# -----------------------------------------------------------------------------------------------------------
# The command line, and Table 1 (markdown) from the results JSON files it writes

LABELS = {"fid": "FID", "lpips": "LPIPS", "sfid": "sFID", "is": "IS", "precision": "precision", "recall": "recall"}
SUITE_COLUMNS = {"sfid": "sFID↓", "is": "IS↑", "precision": "Precision↑", "recall": "Recall↑"}  # overall only


def results_table(results):
    """Table 1: a row per method, FID and LPIPS per superclass, then overall; then sFID, IS, precision and recall
    where a result has them. results: [{"method", "fid": {name: value}, "lpips": {name: value}, "sfid": value, ...}]."""
    names = list(dict.fromkeys(n for r in results for metric in ("fid", "lpips") for n in r.get(metric, {})
                               if n != "overall")) + ["overall"]
    suite = [metric for metric in SUITE_COLUMNS if any(metric in r for r in results)]
    header = [f"{n} {label}" for n in names for label in ("FID↓", "LPIPS↑")] + [SUITE_COLUMNS[m] for m in suite]
    cell = lambda value: "–" if value is None else f"{value:.3f}"
    row = lambda r: ([cell(r.get(m, {}).get(n)) for n in names for m in ("fid", "lpips")]
                     + [cell(r.get(m)) for m in suite])
    lines = ["| Method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    lines += [f"| {r.get('method', '?')} | " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def report(values, path=None, method=None, replaces=()):
    """Print {metric: value, or {name: value}} as `FID overall: 9.776`, `sFID: 6.502` lines; merge them into the
    results JSON at `path` (read by `table`), where they replace the metrics `replaces` names (all that the command
    gives: one it could not give this time leaves no older value beside the new ones)."""
    for metric, value in values.items():
        for name, v in value.items() if isinstance(value, dict) else [("", value)]:
            print(f"{LABELS[metric]}{' ' + name if name else ''}: {v:.3f}")
    merge_results(values, path, method, replaces)


def merge_results(values, path=None, method=None, replaces=()):
    """Merge {metric: values} into the results JSON at `path` (none: nothing), under the row name `method`, in place
    of the metrics `replaces` names."""
    if path:
        results = read_json(path) if os.path.isfile(path) else {}
        results["method"] = method or results.get("method", os.path.splitext(os.path.basename(path))[0])
        results = {key: value for key, value in results.items() if key not in replaces} | values
        pathlib.Path(path).write_text(json.dumps(results, indent=2))


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = commands.add_parser("ref-stats", help="Inception statistics of a real image set, saved to an .npz")
    p.add_argument("--ref", required=True, help="data set root (see --ref-data) or an images .npz")
    p.add_argument("--out", required=True, help="the statistics .npz to write")
    p = commands.add_parser("fid", help="FID overall and per superclass (Table 1); sFID, IS, precision and recall "
                                        "(ADM's suite), from one Inception pass over the samples")
    p.add_argument("--samples", required=True, help="sample.py's .npz")
    p.add_argument("--ref", required=True, help="reference statistics .npz (ref-stats), images .npz or data set root")
    p = commands.add_parser("lpips", help="LPIPS diversity between samples of the same class (Table 1)")
    p.add_argument("--samples", required=True, help="sample.py's .npz")
    p.add_argument("--lpips-weights", nargs="+", required=True, help="alex.pth + alexnet-owt-7be5be79.pth, or one file")
    p.add_argument("--pairs-per-class", type=POSITIVE, default=10, help="random pairs of samples per class")
    p.add_argument("--seed", type=cli.SEED, default=0, help="which pairs")
    for p in commands.choices["ref-stats"], commands.choices["fid"], commands.choices["lpips"]:
        p.add_argument("--device", default=device, help="where the networks run")
        p.add_argument("--batch-size", type=number(int, 1, 4096), default=50, help="images per forward pass")
        p.add_argument("--class-map", help="fine -> superclass JSON, if the .npz does not hold it")
    for p in commands.choices["ref-stats"], commands.choices["fid"]:
        p.add_argument("--inception", default="pt_inception-2015-12-05-6726825d.pth", help="FID Inception weights")
        p.add_argument("--image-size", type=number(int, 8, 2048), default=256, help="centre-crop size of data set "
                                                                                       "images")
        p.add_argument("--ref-data", choices=DATA_KINDS, help="--ref kind (none: by path)")
        p.add_argument("--ref-split", help="split of --ref-data, e.g. val (none: data.py's)")
    p = commands.add_parser("data", help="a data set's classes and images per superclass; unreadable images")
    for p in commands.choices["ref-stats"], commands.choices["fid"], p:
        p.add_argument("--num-workers", type=cli.NUM_WORKERS, default=WORKERS, help="image decoding workers")
    for p in commands.choices["fid"], commands.choices["lpips"]:
        p.add_argument("--method", help="row name in Table 1")
        p.add_argument("--results", help="JSON to merge the numbers into (read by `table`)")
    p = commands.add_parser("table", help="Table 1 (markdown) from results JSON files")
    p.add_argument("results", nargs="+", help="JSON files of fid / lpips --results")
    p = commands.add_parser("judge", help="train the judge classifier on a data set's real images, save it")
    p.add_argument("--data", default="taxa", choices=DATA_KINDS, help="dataset layout")
    p.add_argument("--data-path", help="dataset root (toy, taxa: where to generate it, default cache/toy)")
    p.add_argument("--split", help="the split the model was fine-tuned on (none: data.py's; toy, taxa: target)")
    p.add_argument("--image-size", type=number(int, 8, 2048), default=32, help="centre-crop size: the samples' size")
    p.add_argument("--epochs", type=number(int, 1, 1000), default=10, help="passes over the training images")
    p.add_argument("--width", type=number(int, 4, 512), default=32, help="channels of the first stage (x2, x4 after)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="the judge's initialization and batches")
    p.add_argument("--out", required=True, help="the judge file to write (.pt)")
    p = commands.add_parser("score", help="score samples with a judge: accuracy at every rank, judge FD, diversity")
    p.add_argument("--judge", required=True, help="a judge file of `evaluate.py judge`")
    p.add_argument("--samples", required=True, help="sample.py's .npz, or its folder of PNGs (image i: class i mod C)")
    p.add_argument("--method", help="row name in the results")
    p.add_argument("--results", help="JSON to merge the scores into")
    for p in commands.choices["judge"], commands.choices["score"]:
        p.add_argument("--device", default=device, help="where the judge runs")
    commands.choices["judge"].add_argument("--num-workers", type=cli.NUM_WORKERS, default=WORKERS,
                                           help="image decoding workers")
    p = commands.add_parser("tsne", help="Figure 7: t-SNE of the label embeddings")
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint or an official FineDiffusion one")
    p.add_argument("--class-map", help="hierarchy JSON (none: the checkpoint's own)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help=WEIGHTS_HELP)
    p.add_argument("--out", help="the PNG to write (none: tsne.png in the checkpoint's run folder)")
    p.add_argument("--perplexity", type=number(float, 0.0, low_open=True), default=30.0, help="t-SNE's")
    p.add_argument("--iterations", type=POSITIVE, default=1000, help="gradient steps of t-SNE")
    p.add_argument("--seed", type=cli.SEED, default=0, help="t-SNE's starting positions")
    p.add_argument("--size", type=number(int, 200, 10_000), nargs=2, default=[1400, 1000], metavar=("WIDTH", "HEIGHT"),
                   help="of the figure, in pixels")
    p.add_argument("--device", default=device, help="where t-SNE runs")
    p = commands.choices["data"]
    p.add_argument("--data", default="toy", choices=DATA_KINDS, help="dataset layout")
    p.add_argument("--data-path", help="dataset root (toy: where to generate it, default cache/toy)")
    p.add_argument("--split", help="inat: train_mini/train/val; vegfru: train/val/test/trainval; toy: source/target")
    p.add_argument("--image-size", type=number(int, 8, 2048), default=32, help="centre-crop size")
    p.add_argument("--check", action="store_true", help="decode every image and list the unreadable ones")
    p.add_argument("--save-hierarchy", help="write the class hierarchy to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    """-> what the command wrote (tsne: the figure)."""
    args = parse_args(argv)
    # every output and input checked before any network runs (not after hours of Inception)
    out = None if args.command not in ("ref-stats", "tsne", "judge") else args.out and new_file(args.out, "--out")
    cli.check(*(f"--{flag} {getattr(args, flag)}: no such file or folder" for flag in ("samples", "ref", "judge")
                if getattr(args, flag, None) is not None and not os.path.exists(getattr(args, flag))))
    if args.command in ("fid", "lpips", "score") and args.results:  # merged into after the metric: checked before it
        cli.check(os.path.isdir(args.results) and f"--results {args.results} is a folder: give a JSON file (new, or "
                                                   f"one of evaluate.py's results to add to)",
                  os.path.isfile(args.results) and not isinstance(read_json(args.results), dict) and f"--results "
                  f"{args.results} holds JSON that is no results object of evaluate.py: give one, or a new path")
        cli.writable_folder(os.path.dirname(os.path.abspath(args.results)), "--results")
    if args.command in ("ref-stats", "fid"):
        inception = load_inception(args.inception, args.device)
        reference = args.command == "fid" and load_statistics(args.ref)  # fid also takes ref-stats' .npz as it is
        image_sets = {} if reference else {"ref": read_image_set(args.ref, args.ref_data, args.ref_split,
                                                                 args.image_size, args.class_map)}
        if args.command == "fid":
            image_sets["samples"] = read_image_set(args.samples, image_size=args.image_size, class_map=args.class_map)
        cli.check(*(too_few_images(images, f"--{flag} {getattr(args, flag)}") for flag, images in image_sets.items()))
        if reference and (missing := missing_metrics(reference)):
            print(f"--ref {args.ref} holds FID's statistics alone (an older ref-stats): {', '.join(missing)} need a "
                  f"ref-stats made by this version, `python evaluate.py ref-stats --ref <the reference images> --out "
                  f"<a new .npz>`; FID and IS follow")
        statistics = {}
        for flag, image_set in image_sets.items():  # one Inception pass over each set
            features, labels = inception_features(image_set, inception, args.batch_size, args.num_workers, args.device)
            statistics[flag] = image_set_statistics(features, labels, image_set["superclass_names"])
        reference = reference or statistics["ref"]
    if args.command == "ref-stats":
        save_statistics(out, reference)
        print(f"saved FID's statistics of {', '.join(reference['fid'])}, sFID's, and the {len(reference['pool3']):,} "
              f"images' pool3 features (precision, recall) to {out}")
    elif args.command == "fid":
        samples = statistics["samples"]
        values = suite_metrics(samples, reference, args.device)
        report(values, args.results, args.method, replaces=["fid", *SUITE_COLUMNS])
        if missing := sorted(set(samples["fid"]) - set(values["fid"])):
            print(f"no reference images for {missing} (the reference has {list(reference['fid'])})")
    elif args.command == "lpips":
        samples = read_image_npz(args.samples, args.class_map)
        cli.check(samples["labels"] is None and f"{args.samples} has no `labels`: LPIPS diversity pairs samples of "
                                                f"the same class",
                  min(samples["images"].shape[1:3]) < LPIPS_MIN_SIZE and f"{args.samples}: its images are "
                  f"{samples['images'].shape[2]}x{samples['images'].shape[1]} px, and LPIPS's AlexNet needs at least "
                  f"{LPIPS_MIN_SIZE} px (its stride-4 first layer and two poolings): sample at a larger size")
        lpips = load_lpips(args.lpips_weights, args.device)
        values = lpips_diversity(lpips, samples["images"], samples["labels"], samples["superclass_labels"],
                                 samples["superclass_names"], args.pairs_per_class, args.batch_size, args.seed,
                                 args.device)
        report({"lpips": values}, args.results, args.method)
    elif args.command == "judge":
        if args.split is None and args.data in ("toy", "taxa"):
            args.split = "target"  # the fine-tuned classes
        dataset, hierarchy = load_dataset(args.data, args.data_path, args.image_size, args.split, hflip=False)
        contents = make_judge(dataset, hierarchy, dict(kind=args.data, path=args.data_path, split=args.split),
                              args.epochs, args.width, args.seed, args.num_workers, args.device)
        save_judge(contents, out)
        print(f"saved {out}: {describe_judge(contents)}")
    elif args.command == "score":
        judge, contents = load_judge(args.judge)
        images, labels = read_samples(args.samples, contents)
        print(f"{args.judge}: {describe_judge(contents)}\n{args.samples}: {len(labels):,} samples of "
              f"{len(np.unique(labels)):,} classes")
        scores = score_samples(judge.to(args.device), contents, images, labels, args.device)
        print_scores(scores)
        merge_results({"judge": scores}, args.results, args.method)
    elif args.command == "table":
        print(results_table([read_json(path) for path in args.results]))
    elif args.command == "tsne":
        checkpoint = find_checkpoint(args.checkpoint)
        out = out or new_file(os.path.join(run_folder(checkpoint) or ".", "tsne.png"))
        table, hierarchy = read_label_table(checkpoint, args.weights)
        cli.check((args.class_map or hierarchy) is None and f"{args.checkpoint} holds no class hierarchy: give the "
                                                            f"class map with --class-map")
        class_to_superclass, names = read_class_map(args.class_map or hierarchy)
        num_superclasses = int(class_to_superclass.max()) + 1
        names = names or [f"superclass {s}" for s in range(num_superclasses)]
        cli.check(table.shape[0] < len(class_to_superclass) + num_superclasses and f"{checkpoint}: its label table "
                  f"has {table.shape[0]} rows, and Figure 7 needs the {len(class_to_superclass)} fine + "
                  f"{num_superclasses} superclass rows of a tiered table, as --method finediffusion trains (others "
                  f"have a row per class + a null row)")
        fine, means, supers = embed_label_table(table, class_to_superclass, num_superclasses, device=args.device,
                                                perplexity=args.perplexity, iterations=args.iterations, seed=args.seed)
        name = os.path.relpath(checkpoint, os.path.dirname(run_folder(checkpoint) or checkpoint))
        draw_figure7(fine, class_to_superclass, means, supers, names, out, tuple(args.size),
                     title=f"t-SNE of label embeddings: {name} ({args.weights} weights)")
        print(f"saved {out} (the {args.weights} label table of {checkpoint})")
    elif args.command == "data":  # a data set's summary, its unreadable images, its class hierarchy as JSON
        hierarchy_out = args.save_hierarchy and new_file(args.save_hierarchy, "--save-hierarchy")
        dataset, hierarchy = load_dataset(args.data, args.data_path, args.image_size, args.split)
        counts = np.bincount(np.asarray(hierarchy.class_to_superclass)[dataset.labels],
                             minlength=len(hierarchy.superclass_names))
        print(f"{len(dataset.files):,} images of {len(hierarchy.class_names):,} classes in "
              f"{len(hierarchy.superclass_names)} superclasses ({len(dataset):,} items with mirrors)")
        for s, name in enumerate(hierarchy.superclass_names):
            print(f"  {s:3d} {name:24s} {hierarchy.class_to_superclass.count(s):6,} classes {counts[s]:9,} images")
        if args.check:
            for _ in read_images(dataset, num_workers=args.num_workers):
                pass
            print(f"{len(dataset.skipped)} unreadable images"
                  + "".join(f"\n  {f}: {why}" for f, why in dataset.skipped.items()))
        if hierarchy_out:
            hierarchy.to_json(hierarchy_out)
            print(f"saved {hierarchy_out}")
    return out


if __name__ == "__main__":
    cli.run(main)
