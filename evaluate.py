"""The FineDiffusion paper's measurements (Sec. 4.3-4.6): FID overall and per superclass (Table 1)
with pytorch-fid's Inception and, in one pass, ADM's sFID, IS, precision and recall; LPIPS
diversity; the judge, a classifier of real images scoring samples at every rank; t-SNE (Figure 7).

    python evaluate.py ref-stats --ref /data/inat2021 --ref-data inat --ref-split val --out ref.npz
    python evaluate.py fid --samples samples.npz --ref ref.npz --method Ours --results r.json
    python evaluate.py lpips --samples samples.npz --lpips-weights alex.pth alexnet-owt-7be5be79.pth
    python evaluate.py table r.json                      # Table 1 as markdown
    python evaluate.py judge --data taxa --out judge.pt  # the judge of the toy taxonomy
    python evaluate.py score --judge judge.pt --samples samples.npz --results r.json
    python evaluate.py tsne --checkpoint results/001-DiT-XL-2-finediffusion  # into the run folder
    python evaluate.py data --data inat --data-path /data/inat2021 --check --save-hierarchy h.json
"""
import cli  # first: a quiet Ctrl-C while torch loads

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

from checkpoint import (WEIGHTS_HELP, find_checkpoint, load_checked, load_state_dict_file,
                        read_json, read_label_table, run_folder, sample_classes, write_atomically)
from cli import POSITIVE, WORKERS, new_file, number
from data import DATA_KINDS, Hierarchy, load_dataset, read_images, to_tensor, toy_superclass_color
from model import superclass_count

INCEPTION_SOURCE = ("FID's Inception weights: https://github.com/mseitzer/pytorch-fid/releases/"
                    "download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
LPIPS_MIN_SIZE = 32  # px: smaller images vanish in AlexNet before its last layers
LPIPS_SOURCE = ("LPIPS v0.1 (alex) is lpips' lpips/weights/v0.1/alex.pth (github.com/richzhang/"
                "PerceptualSimilarity) and torchvision's https://download.pytorch.org/models/"
                "alexnet-owt-7be5be79.pth: pass both, or one file of lpips.LPIPS(net='alex')")
avg_pool_3x3 = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # Inception's


# -------------------------------------------------------------------------------------------------
# The FID Inception network: Inception-v3 (Szegedy et al., 2016) as FID's TF graph (pytorch-fid's)

class Units(nn.Module):
    """conv-BN (eps 1e-3, TF's)-ReLU units of rows (name, in, out, kernel[, stride[, padding]])."""
    def __init__(self, *rows):
        super().__init__()
        for name, c_in, c_out, kernel, *rest in rows:
            stride = rest[0] if rest else 1
            padding = rest[1] if len(rest) > 1 else "same" if stride == 1 else 0
            unit = OrderedDict(conv=nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                               bn=nn.BatchNorm2d(c_out, eps=0.001), relu=nn.ReLU())
            self.add_module(name, nn.Sequential(unit))


class InceptionA(Units):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    def __init__(self, c, pool_features):
        super().__init__(("branch1x1", c, 64, 1), ("branch5x5_1", c, 48, 1),
                         ("branch5x5_2", 48, 64, 5), ("branch3x3dbl_1", c, 64, 1),
                         ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3),
                         ("branch_pool", c, pool_features, 1))

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl,
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionB(Units):
    """35x35 -> 17x17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
    def __init__(self, c):
        super().__init__(("branch3x3", c, 384, 3, 2), ("branch3x3dbl_1", c, 64, 1),
                         ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3, 2))

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(Units):
    """17x17 block (Mixed_6b..6e) with factorized 7x7 convolutions (1x7 and 7x1) of c channels."""
    def __init__(self, in_channels, c):
        super().__init__(("branch1x1", in_channels, 192, 1), ("branch7x7_1", in_channels, c, 1),
                         ("branch7x7_2", c, c, (1, 7)), ("branch7x7_3", c, 192, (7, 1)),
                         ("branch7x7dbl_1", in_channels, c, 1), ("branch7x7dbl_2", c, c, (7, 1)),
                         ("branch7x7dbl_3", c, c, (1, 7)), ("branch7x7dbl_4", c, c, (7, 1)),
                         ("branch7x7dbl_5", c, 192, (1, 7)), ("branch_pool", in_channels, 192, 1))

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(dbl))
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionD(Units):
    """17x17 -> 8x8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
    def __init__(self, c):
        super().__init__(("branch3x3_1", c, 192, 1), ("branch3x3_2", 192, 320, 3, 2),
                         ("branch7x7x3_1", c, 192, 1), ("branch7x7x3_2", 192, 192, (1, 7)),
                         ("branch7x7x3_3", 192, 192, (7, 1)), ("branch7x7x3_4", 192, 192, 3, 2))

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(Units):
    """8x8 block (Mixed_7b: average pool, Mixed_7c: max pool) with 1x3 / 3x1 splits."""
    def __init__(self, c, max_pool):
        super().__init__(("branch1x1", c, 320, 1), ("branch3x3_1", c, 384, 1),
                         ("branch3x3_2a", 384, 384, (1, 3)), ("branch3x3_2b", 384, 384, (3, 1)),
                         ("branch3x3dbl_1", c, 448, 1), ("branch3x3dbl_2", 448, 384, 3),
                         ("branch3x3dbl_3a", 384, 384, (1, 3)),
                         ("branch3x3dbl_3b", 384, 384, (3, 1)), ("branch_pool", c, 192, 1))
        self.max_pool = max_pool

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pool)], dim=1)  # (N, 2048, 8, 8)


class FIDInceptionV3(Units):
    """Images (N, 3, H, W) in [0, 1] -> the 2048-d pool3 features FID is computed on."""
    def __init__(self):
        super().__init__(("Conv2d_1a_3x3", 3, 32, 3, 2), ("Conv2d_2a_3x3", 32, 32, 3, 1, 0),
                         ("Conv2d_2b_3x3", 32, 64, 3), ("Conv2d_3b_1x1", 64, 80, 1),
                         ("Conv2d_4a_3x3", 80, 192, 3, 1, 0))
        blocks = [InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64), InceptionB(288),
                  *(InceptionC(768, c) for c in (128, 160, 160, 192)), InceptionD(768),
                  InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)]
        for name, block in zip("5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split(), blocks):
            self.add_module(f"Mixed_{name}", block)
        self.fc = nn.Linear(2048, 1008)  # TF's softmax/logits/MatMul (Inception Score): weight only

    def features(self, x):
        """One pass -> pool3 (FID, precision, recall), spatial (sFID), logits (Inception Score)."""
        # as pytorch-fid's resize_input and normalize_input: to 299x299, [0, 1] -> [-1, 1]
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        for name, block in self.named_children():
            if name != "fc":
                x = block(x)  # ... (N, 288, 35, 35), (N, 768, 17, 17) ... (N, 2048, 8, 8)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73), (N, 192, 35, 35)
            if name == "Mixed_6d":  # sFID's (Nash et al., 2021): 7 channels of TF's mixed_6/conv
                spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # as (H, W, C): (N, 2023)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        return pool3, spatial, pool3 @ self.fc.weight.T  # ..., IS's logits as ADM's (N, 1008)

    def forward(self, x):
        return self.features(x)[0]  # (N, 2048) pool3


def inception_from_state_dict(state_dict, source="the state dict"):
    """A checked, strict load; half-precision weights are cast to float32, which it runs in."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model = load_checked(FIDInceptionV3(), state_dict, source, INCEPTION_SOURCE)
    return model.eval().requires_grad_(False)


def load_inception(path, device="cpu"):
    return inception_from_state_dict(load_state_dict_file(path, INCEPTION_SOURCE), path).to(device)


# -------------------------------------------------------------------------------------------------
# LPIPS v0.1 with AlexNet features (Zhang et al., 2018)

class LPIPS(nn.Module):
    """Image pairs (N, 3, H, W) in [-1, 1] -> distances (N,); the lpips package's names."""
    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()  # [-1, 1] -> the statistics AlexNet was trained on
        for name, value in (("shift", [-0.030, -0.088, -0.188]), ("scale", [0.458, 0.448, 0.450])):
            self.scaling_layer.register_buffer(name, torch.tensor(value)[None, :, None, None])
        # torchvision's AlexNet `features` (its indices kept) cut after each ReLU: relu1..relu5
        layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
                  nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
        self.net = nn.Module()
        for k, (start, end) in enumerate([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)], 1):
            numbered = OrderedDict((str(i), layers[i]) for i in range(start, end))
            self.net.add_module(f"slice{k}", nn.Sequential(numbered))
        # each layer's channel weights, a 1x1 conv (lin{k}.model.1; lins.{k} is the same module)
        self.lins = nn.ModuleList(nn.Sequential(OrderedDict(model=nn.Sequential(
            nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)))) for c in (64, 192, 384, 256, 256))
        for k, head in enumerate(self.lins):
            self.add_module(f"lin{k}", head)

    def forward(self, a, b):
        n, distance = a.shape[0], 0
        x = (torch.cat([a, b]) - self.scaling_layer.shift) / self.scaling_layer.scale
        for layers, head in zip(self.net.children(), self.lins):
            x = layers(x)
            f = x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length
            distance = distance + head((f[:n] - f[n:]).square()).mean(dim=(2, 3))  # (N, 1)
        return distance[:, 0]


def lpips_from_state_dict(state_dict, source="the state dict"):
    """LPIPS from its state dict, lpips' lin file, torchvision's AlexNet, or a merge of those."""
    model, slice_of = LPIPS(), {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # `features.i` -> `net.slice{k}.i`
    merged = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}
    for key, value in state_dict.items():
        if key.startswith("features."):
            index, rest = key[len("features."):].split(".", 1)
            key = f"net.slice{slice_of.get(int(index), '?')}.{index}.{rest}"
        elif key.startswith("lins."):  # lins.{k} and lin{k}: one module, two names
            key = "lin" + key[len("lins."):]
        if not key.startswith("classifier."):  # AlexNet's classifier is not part of LPIPS
            merged[key] = value
    merged |= {"lins." + k[len("lin"):]: v for k, v in merged.items() if k.startswith("lin")}
    return load_checked(model, merged, source, LPIPS_SOURCE).eval().requires_grad_(False)


def load_lpips(paths, device="cpu"):
    """LPIPS from one combined file, or from the lin file plus torchvision's AlexNet file."""
    state_dict = {k: v for p in paths for k, v in load_state_dict_file(p, LPIPS_SOURCE).items()}
    return lpips_from_state_dict(state_dict, " + ".join(paths)).to(device)


# -------------------------------------------------------------------------------------------------
# FID (Heusel et al., 2017) and the rest of ADM's suite (Dhariwal & Nichol, 2021: evaluator.py)

NEIGHBOURS = 3  # k of precision and recall, ADM's (and Kynkäänniemi et al.'s)
BLOCK_ENTRIES = 2**25  # squared distances (as ADM's) precision_recall holds at once: 256 MB


def feature_stats(features):
    """(N, D) features -> mean (D,) and covariance (D, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) by symmetric eigendecompositions: real, and
    fine for rank-deficient S."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        return math.nan  # a diverged model's samples: NaN, never the best possible 0
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)  # S1^(1/2), round-off below 0 clipped
    root1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1  # symmetric PSD, with the eigenvalues of S1 S2
    tr_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def inception_score(logits, split_size=5000):
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016) of logits (N, C), ADM's splits."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)  # (N, C)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = part.logsumexp(dim=0) - math.log(len(part))  # log p(y)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)  # KL(p(y|x) || p(y)), (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


def squared_distance_blocks(a, b, block_entries):
    """a (N, D), b (M, D) -> (rows, squared distances (R, M)) in blocks of <= block_entries."""
    a_norms, b_norms = a.square().sum(dim=1), b.square().sum(dim=1)
    step = max(1, block_entries // len(b))
    for start in range(0, len(a), step):
        rows = slice(start, start + step)
        yield rows, (a[rows] @ b.T).mul_(-2).add_(a_norms[rows, None]).add_(b_norms).clamp_min_(0)


def manifold_radii(features, k=NEIGHBOURS, block_entries=BLOCK_ENTRIES):
    """(N, D) -> each point's squared distance to its k-th nearest other point (N,) (Sec. 3)."""
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k]
                      for _, d in squared_distance_blocks(features, features, block_entries)])


def precision_recall(sample_features, reference_features, k=NEIGHBOURS, device="cpu",
                     block_entries=BLOCK_ENTRIES):
    """Features (N, D), (M, D) -> improved (precision, recall) (Kynkäänniemi et al., 2019, Eq.
    1-3): the fraction of each set inside some k-NN ball of the other."""
    samples, reference = (torch.as_tensor(np.asarray(f), dtype=torch.float64, device=device)
                          for f in (sample_features, reference_features))
    sample_radii, ref_radii = (manifold_radii(f, k, block_entries) for f in (samples, reference))
    in_reference = torch.zeros(len(samples), dtype=torch.bool, device=device)
    in_samples = torch.zeros(len(reference), dtype=torch.bool, device=device)
    for rows, d in squared_distance_blocks(samples, reference, block_entries):  # (R, M)
        in_reference[rows] = (d <= ref_radii).any(dim=1)  # Eq. 1 (on a sphere too: ADM's)
        in_samples |= (d <= sample_radii[rows, None]).any(dim=0)  # and for the reference
    return in_reference.double().mean().item(), in_samples.double().mean().item()  # Eq. 2 and 3


# -------------------------------------------------------------------------------------------------
# Image sets: sample.py's ADM-style .npz, or a data set of data.py read lazily

def read_class_map(class_map):
    """Superclass ids or names (a list, its JSON) or a hierarchy -> (ids (C,), names or None)."""
    class_map = read_json(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    names = class_map.get("superclass_names") if isinstance(class_map, dict) else None
    class_map = class_map["class_to_superclass"] if isinstance(class_map, dict) else class_map
    if len(class_map) and isinstance(class_map[0], str):  # names: ids in sorted order, as folders
        names = sorted(set(class_map))
        class_map = [names.index(name) for name in class_map]
    return np.asarray(class_map, dtype=np.int64), None if names is None else [str(n) for n in names]


def open_npz(path, required=None):
    """np.load of a user's .npz holding the array `required`; a foreign file says so."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        if required and required not in f.files:
            f.close()
            raise ValueError(f"it has no {required} (it holds {f.files[:6]})")
        return f
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({e}): write it again") from None


def read_image_npz(path, class_map=None, labels_for=None):
    """An .npz -> dict(images: arr_0, labels, superclass_labels, _names, class_names; or None)."""
    with open_npz(path, "arr_0") as f:
        data = {key: f.get(key) for key in ("labels", "superclass_labels", "superclass_names",
                                            "class_names")}
        data["images"] = images = f["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}, not uint8 (N, H, W, 3)")
    if labels_for and data["labels"] is None:
        raise ValueError(f"{path} has no `labels`: {labels_for}")
    if class_map is not None and data["labels"] is not None:  # the user's map takes precedence
        class_to_superclass, names = read_class_map(class_map)
        data["superclass_labels"] = class_to_superclass[data["labels"]]
        data["superclass_names"] = names if names is not None else data["superclass_names"]
    for key in ("superclass_names", "class_names"):
        data[key] = None if data[key] is None else [str(n) for n in data[key]]
    return data


def read_image_set(path, kind=None, split=None, image_size=256, class_map=None):
    """read_image_npz, or a data set of data.py (a folder: "folder") unmirrored as "images"."""
    if kind is None and not os.path.isdir(path):
        return read_image_npz(path, class_map)
    dataset, hierarchy = load_dataset(kind or "folder", path, image_size, split, hflip=False)
    return dict(images=dataset, labels=dataset.labels,
                superclass_labels=np.asarray(hierarchy.class_to_superclass)[dataset.labels],
                superclass_names=hierarchy.superclass_names, class_names=hierarchy.class_names)


def image_batches(images, batch_size=50, num_workers=4):
    """uint8 images (N, H, W, 3) or an ImageDataset -> (rows (B,), (B, 3, H, W) in [0, 1])."""
    if isinstance(images, np.ndarray):
        batches = ((np.arange(i, min(i + batch_size, len(images))), images[i:i + batch_size])
                   for i in tqdm(range(0, len(images), batch_size), desc="images"))
    else:  # decoded in workers, unreadable files skipped
        batches = read_images(images, batch_size=batch_size, num_workers=num_workers)
    for rows, pixels in batches:
        yield rows, torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255


# -------------------------------------------------------------------------------------------------
# Table 1's numbers: FID per superclass, ADM's suite, LPIPS diversity; ref-stats' .npz

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
    """-> dict(fid=set_statistics, sfid, pool3 in float16 (ADM's: a shared image at 0), logits)."""
    return dict(fid=set_statistics(features["pool3"], superclass_labels, superclass_names),
                sfid=feature_stats(features["spatial"]), pool3=features["pool3"].astype(np.float16),
                logits=features["logits"])


@torch.no_grad()
def inception_statistics(image_set, inception, batch_size=50, num_workers=4, device="cpu"):
    """An image set -> image_set_statistics of one Inception pass over it."""
    rows, outputs = [], []
    for index, batch in image_batches(image_set["images"], batch_size, num_workers):
        rows.append(index)
        outputs.append([f.cpu() for f in inception.features(batch.to(device))])
    pool3, spatial, logits = (torch.cat(kind).numpy() for kind in zip(*outputs))
    labels = image_set["superclass_labels"]
    labels = None if labels is None else labels[np.concatenate(rows)]
    return image_set_statistics(dict(pool3=pool3, spatial=spatial, logits=logits), labels,
                                image_set["superclass_names"])


def save_statistics(path, stats):
    """ref-stats' .npz: names (K,), mu (K, D), sigma (K, D, D) (FID); mu_s, sigma_s (sFID), pool3"""
    mu, sigma = (np.stack(moment) for moment in zip(*stats["fid"].values()))
    np.savez(path, names=np.array(list(stats["fid"])), mu=mu, sigma=sigma, mu_s=stats["sfid"][0],
             sigma_s=stats["sfid"][1], pool3=stats["pool3"])


def load_statistics(path):
    """ref-stats' .npz -> {"fid", "sfid", "pool3"} (older files: FID's alone); else None."""
    if os.path.isfile(path) and str(path).endswith(".npz"):
        with open_npz(path) as f:
            if "mu" in f:
                fid = {str(n): (mu, sigma) for n, mu, sigma in zip(f["names"], f["mu"], f["sigma"])}
                return dict(fid=fid, sfid=(f["mu_s"], f["sigma_s"]) if "mu_s" in f else None,
                            pool3=f["pool3"] if "pool3" in f else None)


def fid_by_superclass(sample_stats, reference_stats):
    """{name: FID} for "overall" and every superclass both sets have."""
    return {name: frechet_distance(*sample_stats[name], *reference_stats[name])
            for name in sample_stats if name in reference_stats}


def missing_metrics(reference):
    """Those of sFID, precision and recall that a reference (an older file) cannot give."""
    return [name for name, key in (("sFID", "sfid"), ("precision", "pool3"), ("recall", "pool3"))
            if reference[key] is None]


def suite_metrics(samples, reference, device="cpu"):
    """-> {"fid": {name: FID}, "sfid", "is", "precision", "recall"}, less missing_metrics'."""
    values = {"fid": fid_by_superclass(samples["fid"], reference["fid"])}
    if reference["sfid"] is not None:
        values["sfid"] = frechet_distance(*samples["sfid"], *reference["sfid"])
    values["is"] = inception_score(samples["logits"])
    if reference["pool3"] is not None:
        values["precision"], values["recall"] = precision_recall(samples["pool3"],
                                                                 reference["pool3"], device=device)
    return values


def same_class_pairs(labels, pairs_per_class=10, seed=0):
    """(P, 2) pairs i < j with labels[i] == labels[j], at most `pairs_per_class` a class, random."""
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
def lpips_diversity(lpips, images, labels, superclass_labels=None, superclass_names=None,
                    pairs_per_class=10, batch_size=50, seed=0, device="cpu"):
    """uint8 images (N, H, W, 3) -> {"overall": mean LPIPS of same-class pairs, superclass: ...}."""
    pairs = same_class_pairs(labels, pairs_per_class, seed)
    if len(pairs) == 0:
        raise ValueError("LPIPS diversity needs at least two samples of one class")
    distances = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="LPIPS pairs"):
        a, b = (to_tensor(images[pairs[start:start + batch_size, k]]).to(device) for k in (0, 1))
        distances.append(lpips(a, b).double().cpu())
    distances = torch.cat(distances).numpy()
    result = {"overall": float(distances.mean())}
    if superclass_labels is not None:
        pair_superclass = superclass_labels[pairs[:, 0]]
        for s in np.unique(pair_superclass):
            name = superclass_names[s] if superclass_names is not None else f"superclass {s}"
            result[name] = float(distances[pair_superclass == s].mean())
    return result


# -------------------------------------------------------------------------------------------------
# The judge: a classifier of real images that scores samples at every rank (Ravuri & Vinyals' CAS)

JUDGE_FORMAT = 1  # a judge file: torch.save, read with weights_only
JUDGE_HELD_OUT = 8  # every 8th image of each class is held out: the judge never trains on it


class Judge(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> (features, logits): 3 pooled stages of 2 conv-BN-ReLU."""
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


def held_out(labels):
    """A mask of the held-out images: each class's 8th, 16th, ... in data set order."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    first = np.searchsorted(labels[order], labels[order])  # where each image's class begins
    mask = np.zeros(len(labels), dtype=bool)
    mask[order] = (np.arange(len(labels)) - first) % JUDGE_HELD_OUT == JUDGE_HELD_OUT - 1
    return mask


@torch.no_grad()
def judge_images(judge, images, device="cpu"):
    """uint8 images (N, S, S, 3) -> (features (N, D), class probabilities (N, C)), float64."""
    features, probabilities = [], []
    for _, x in image_batches(images, 256):
        f, logits = judge(x.to(device))
        features.append(f.double().cpu())
        probabilities.append(logits.double().softmax(dim=1).cpu())  # on the device, as before
    return torch.cat(features).numpy(), torch.cat(probabilities).numpy()


def rank_accuracy(probabilities, labels, hierarchy):
    """({rank: accuracy}, {rank: chance}): a rank's guess is its group of most probability."""
    accuracy, chance = {}, {}
    for rank, groups, of_class in hierarchy.ranks():
        of_class = torch.as_tensor(of_class)
        by_group = torch.zeros(len(labels), len(groups), dtype=torch.float64).index_add_(
            1, of_class, torch.as_tensor(probabilities))  # (N, G): its classes' probabilities
        truth = of_class[torch.as_tensor(labels)]
        accuracy[rank] = (by_group.argmax(dim=1) == truth).double().mean().item()
        group_sizes = torch.bincount(of_class, minlength=len(groups))
        chance[rank] = (group_sizes[truth] / len(of_class)).double().mean().item()
    return accuracy, chance


def within_class_spread(features, labels, num_classes):
    """(C,) the mean squared distance of a class's features to their mean (NaN under 2 images)."""
    spread = np.full(num_classes, np.nan)
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) >= 2:
            spread[c] = ((f - f.mean(axis=0)) ** 2).sum(axis=1).mean()
    return spread


def load_judge(path):
    """A judge file -> (Judge, its contents), checked; another file says how to make a judge."""
    make = "make one with python evaluate.py judge --data ... --out judge.pt"
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{path} is not a readable judge file ({why}): {make}") from None
    if not isinstance(contents, dict) or contents.get("format") != JUDGE_FORMAT:
        raise ValueError(f"{path} is no judge file of this version (format {JUDGE_FORMAT}): {make}")
    judge = Judge(len(contents["hierarchy"]["class_names"]), contents["width"])
    return load_checked(judge, contents["state_dict"], path, make).eval(), contents


def describe_judge(contents):
    """One line: what a judge was trained on, and its accuracy on held-out real images."""
    data = contents["data"]
    where = " ".join(str(p) for p in (data["kind"], data.get("split"), data.get("path")) if p)
    accuracy = ", ".join(f"{rank} {acc:.3f}" for rank, acc in contents["held_out"].items())
    return (f"judge of {where} at {contents['image_size']} px "
            f"({len(contents['hierarchy']['class_names'])} classes, {data['images']:,} images); "
            f"on its {data['held_out_images']:,} held-out real images: {accuracy}")


# -------------------------------------------------------------------------------------------------
# Figure 7: exact t-SNE (van der Maaten & Hinton, 2008) of the label table

def conditional_probabilities(sq_distances, perplexity):
    """p_{j|i}, each row's precision found by bisection so that its entropy is log(perplexity)."""
    n = sq_distances.shape[0]
    others = ~torch.eye(n, dtype=torch.bool, device=sq_distances.device)
    nearest = sq_distances.masked_fill(~others, math.inf).min(dim=1, keepdim=True).values
    d = sq_distances - nearest  # for stability
    beta = torch.ones(n, 1, dtype=d.dtype, device=d.device)  # precision 1 / (2 sigma_i^2)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    for _ in range(200):
        p = torch.where(others, torch.exp(-d * beta), 0)  # (N, N)
        total = p.sum(dim=1, keepdim=True)
        entropy = total.log() + beta * (d * p).sum(dim=1, keepdim=True) / total  # H(P_i), nats
        if (entropy - math.log(perplexity)).abs().max() < 1e-6:
            break
        too_flat = entropy > math.log(perplexity)  # too many neighbours: sharpen
        lo, hi = torch.where(too_flat, beta, lo), torch.where(too_flat, hi, beta)
        sharper = torch.where(hi.isinf(), beta * 2, (beta + hi) / 2)
        beta = torch.where(too_flat, sharper, (beta + lo) / 2)
    return p / total


def tsne(x, perplexity=30.0, iterations=1000, seed=0, device="cpu", progress=True):
    """(N, D) points -> (N, 2), deterministic given the seed; 10,011 points: 0.8 GB per N x N."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
    n = x.shape[0]
    p = conditional_probabilities(torch.cdist(x, x).square(), min(perplexity, (n - 1) / 3))
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)  # symmetric joint probabilities p_ij (Sec. 3.1)
    generator = torch.Generator().manual_seed(seed)
    y = (1e-4 * torch.randn(n, 2, generator=generator, dtype=torch.float64)).to(device)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    learning_rate = max(n / 12.0, 50.0)  # Belkina et al. (2019): N / exaggeration
    for step in tqdm(range(iterations), desc="t-SNE", disable=not progress):
        kernel = torch.cdist(y, y).square_().add_(1).reciprocal_().fill_diagonal_(0)  # Eq. 4
        q = (kernel / kernel.sum()).clamp_min_(1e-12)
        alpha, momentum = (12.0, 0.5) if step < 250 else (1.0, 0.8)
        w = q.neg_().add_(p, alpha=alpha).mul_(kernel)  # (alpha p_ij - q_ij) k_ij
        grad = 4 * (w.sum(dim=1, keepdim=True) * y - w @ y)  # Eq. 5
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = momentum * update - learning_rate * gains * grad
        y = y + update
        y = y - y.mean(dim=0)
    return y.cpu().numpy()


def embed_label_table(table, class_to_superclass, num_superclasses, **tsne_options):
    """Rows [fine C | superclass S | (null)] -> 2-D fine rows, superclass means, superclass rows."""
    table = torch.as_tensor(table, dtype=torch.float64)
    c = len(class_to_superclass)
    fine, superclass = table[:c], table[c:c + num_superclasses]  # a null row is not in Figure 7
    members = torch.as_tensor(class_to_superclass) == torch.arange(num_superclasses)[:, None]
    means = (members.double() @ fine) / members.sum(dim=1, keepdim=True)  # (S, C) @ (C, D)
    y = tsne(torch.cat([fine, means, superclass]).numpy(), **tsne_options)  # t-SNE adds none later
    return y[:c], y[c:c + num_superclasses], y[c + num_superclasses:]


def superclass_colors(names):
    """The toy set's colour per superclass, else evenly spread hues of alternating value."""
    rgb = lambda i: colorsys.hsv_to_rgb(i / len(names), 0.8, 0.95 if i % 2 else 0.7)
    return [toy_superclass_color(name) or tuple(round(255 * v) for v in rgb(i))
            for i, name in enumerate(names)]


def draw_marker(draw, center, kind, size, color):
    """"dot" (a fine class), "star" (a superclass's mean) or "cross" (a superclass row)."""
    x, y = center
    if kind == "dot":
        draw.ellipse([x - size, y - size, x + size, y + size], fill=color)
    elif kind == "star":  # five points, five notches
        draw.polygon([(x + r * math.sin(k * math.pi / 5), y - r * math.cos(k * math.pi / 5))
                      for k, r in enumerate([size, 0.4 * size] * 5)], fill=color, outline="black")
    else:
        for width, fill in ((7, "black"), (3, color)):  # a black-edged "+"
            draw.line([x - size, y, x + size, y], fill=fill, width=width)
            draw.line([x, y - size, x, y + size], fill=fill, width=width)


def draw_figure7(fine_xy, class_to_superclass, mean_xy, superclass_xy, superclass_names, path,
                 size=(1400, 1000), title="t-SNE of label embeddings"):
    """A PNG: the plot left, each axis stretched to fill it (t-SNE's have no unit); a legend."""
    (width, height), margin = size, 30
    legend_width, font_px = width // 4, max(12, height // 60)
    font = ImageFont.load_default(size=font_px)
    r = max(1.5, min(5.0, 150 / math.sqrt(len(fine_xy))))  # dots shrink as classes grow in number
    inset = 4 * r + 4  # a star's or a cross's half width: markers at the edge stay whole
    points = np.concatenate([fine_xy, mean_xy, superclass_xy])
    lo, span = points.min(axis=0), np.ptp(points, axis=0).clip(min=1e-12)
    scale = np.array([width - legend_width - 2 * margin, height - 3 * margin]) - 2 * inset
    to_pixels = lambda xy: [(margin + inset + u, 2 * margin + inset + v)
                            for u, v in (xy - lo) / span * scale]
    colors = superclass_colors(superclass_names)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin // 2), title, fill="black", font=font)
    for center, s in zip(to_pixels(fine_xy), class_to_superclass):
        draw_marker(draw, center, "dot", r, colors[s])
    for s, (mean, row) in enumerate(zip(to_pixels(mean_xy), to_pixels(superclass_xy))):
        draw_marker(draw, mean, "star", inset, colors[s])
        draw_marker(draw, row, "cross", inset, colors[s])
    # the legend: a colour per superclass, a gap, the three markers
    x0, line = width - legend_width + margin // 2, font_px + 8
    legend = [(name, "dot", colors[s]) for s, name in enumerate(superclass_names)] + [("", 0, 0)]
    legend += [("fine class", "dot", "gray"), ("mean of its fine classes", "star", "gray"),
               ("superclass embedding", "cross", "gray")]
    for y, (label, kind, color) in zip(range(2 * margin, height, line), legend):
        if kind:
            draw_marker(draw, (x0 + font_px / 2, y + font_px / 2), kind, font_px / 2 + 2, color)
            draw.text((x0 + font_px + 8, y), label, fill="black", font=font)
    image.save(path)


# -------------------------------------------------------------------------------------------------
# Table 1 (markdown) from the results JSON files the commands write

LABELS = {"fid": "FID", "lpips": "LPIPS", "sfid": "sFID", "is": "IS"}  # else the metric's name
SUITE_COLUMNS = {"sfid": "sFID↓", "is": "IS↑", "precision": "Precision↑",
                 "recall": "Recall↑"}  # overall only


def results_table(results):
    """Table 1: a row per method; FID and LPIPS per superclass, overall; then ADM's (overall)."""
    names = list(dict.fromkeys(n for r in results for metric in ("fid", "lpips")
                               for n in r.get(metric, {}) if n != "overall")) + ["overall"]
    suite = [metric for metric in SUITE_COLUMNS if any(metric in r for r in results)]
    header = [f"{n} {label}" for n in names for label in ("FID↓", "LPIPS↑")]
    header += [SUITE_COLUMNS[m] for m in suite]
    cell = lambda value: "–" if value is None else f"{value:.3f}"
    row = lambda r: ([cell(r.get(m, {}).get(n)) for n in names for m in ("fid", "lpips")]
                     + [cell(r.get(m)) for m in suite])
    lines = ["| Method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    lines += [f"| {r.get('method', '?')} | " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def report(values, path=None, method=None, replaces=(), show=True):
    """Print {metric: value or {name: value}} (if `show`); merge into JSON `path` as `method`."""
    for metric, value in values.items() if show else ():
        for name, v in value.items() if isinstance(value, dict) else [("", value)]:
            print(f"{LABELS.get(metric, metric)}{' ' + name if name else ''}: {v:.3f}")
    if path:
        results = read_json(path) if os.path.isfile(path) else {}
        results["method"] = method or results.get("method", pathlib.Path(path).stem)
        results = {key: value for key, value in results.items() if key not in replaces} | values
        pathlib.Path(path).write_text(json.dumps(results, indent=2))


# -------------------------------------------------------------------------------------------------
# The command line: a function per command, `args.run(args)` the dispatch

def parse_args(argv=None):
    parser = cli.Parser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    shared = {  # flags of several commands
        "--samples": dict(required=True, help="sample.py's .npz"),
        "--ref": dict(required=True, help="ref-stats' .npz (fid), images .npz or data set root"),
        "--device": dict(default="cuda" if torch.cuda.is_available() else "cpu", help="to run on"),
        "--batch-size": dict(type=number(int, 1, 4096), default=50, help="images per forward pass"),
        "--class-map": dict(help="fine -> superclass JSON, if the .npz does not hold it"),
        "--inception": dict(default="pt_inception-2015-12-05-6726825d.pth", help="FID's weights"),
        "--image-size": dict(type=number(int, 8, 2048), default=256, help="centre-crop size, px"),
        "--ref-data": dict(choices=DATA_KINDS, help="--ref kind (none: by path)"),
        "--ref-split": dict(help="split of --ref-data, e.g. val (none: data.py's)"),
        "--num-workers": dict(type=cli.NUM_WORKERS, default=WORKERS, help="image decoding workers"),
        "--method": dict(help="row name in Table 1"),
        "--results": dict(help="JSON to merge the numbers into (read by `table`)"),
        "--data": dict(choices=DATA_KINDS, help="dataset layout"),
        "--data-path": dict(help="dataset root (toy, taxa: where to make it, default cache/toy)"),
        "--seed": dict(type=cli.SEED, default=0, help="of the random choices"),
    }

    def command(name, run, help, *flags, **defaults):
        p = commands.add_parser(name, help=help)
        for flag in flags:
            p.add_argument(flag, **shared[flag])
        p.set_defaults(run=run, **defaults)
        return p
    inception = ("--ref", "--device", "--batch-size", "--class-map", "--inception", "--image-size",
                 "--ref-data", "--ref-split", "--num-workers")
    p = command("ref-stats", run_ref_stats, "Inception statistics of real images", *inception)
    p.add_argument("--out", required=True, help="the statistics .npz to write")
    command("fid", run_fid, "FID per superclass (Table 1); sFID, IS, precision and recall (ADM's)",
            "--samples", *inception, "--method", "--results")
    p = command("lpips", run_lpips, "LPIPS diversity of same-class samples (Table 1)", "--samples",
                "--device", "--batch-size", "--class-map", "--method", "--results", "--seed")
    p.add_argument("--lpips-weights", nargs="+", required=True, help="lin + AlexNet files, or one")
    p.add_argument("--pairs-per-class", type=POSITIVE, default=10, help="random pairs per class")
    p = command("table", lambda args: print(results_table([read_json(f) for f in args.files])),
                "Table 1 (markdown) from results JSON files")
    p.add_argument("files", nargs="+", metavar="results", help="fid / lpips --results files")
    p = command("judge", run_judge, "train the judge on a data set's real images", "--data",
                "--data-path", "--image-size", "--device", "--num-workers", "--seed", data="taxa",
                image_size=32)
    p.add_argument("--split", help="the fine-tuning split (none: data.py's; toy, taxa: target)")
    p.add_argument("--epochs", type=number(int, 1, 1000), default=10, help="passes over the images")
    p.add_argument("--width", type=number(int, 4, 512), default=32, help="first stage's channels")
    p.add_argument("--out", required=True, help="the judge file to write (.pt)")
    p = command("score", run_score, "score samples with a judge: accuracy at every rank, FD, "
                "diversity", "--device", "--method", "--results")
    p.add_argument("--judge", required=True, help="a judge file of `evaluate.py judge`")
    p.add_argument("--samples", required=True, help="sample.py's .npz or PNGs (i: class i mod C)")
    p = command("tsne", run_tsne, "Figure 7: t-SNE of the label embeddings", "--device", "--seed")
    p.add_argument("--checkpoint", required=True, help="train.py's or an official FineDiffusion")
    p.add_argument("--class-map", help="hierarchy JSON (none: the checkpoint's own)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help=WEIGHTS_HELP)
    p.add_argument("--out", help="the PNG to write (none: tsne.png in the checkpoint's run folder)")
    p.add_argument("--perplexity", type=number(float, 0.0, low_open=True), default=30.0,
                   help="t-SNE's")
    p.add_argument("--iterations", type=POSITIVE, default=1000, help="gradient steps of t-SNE")
    p.add_argument("--size", type=number(int, 200, 10_000), nargs=2, default=[1400, 1000],
                   metavar=("WIDTH", "HEIGHT"), help="of the figure, in pixels")
    p = command("data", run_data, "a data set's classes, images per superclass, unreadable images",
                "--data", "--data-path", "--image-size", "--num-workers", data="toy", image_size=32)
    p.add_argument("--split", help="inat: train_mini/train/val; vegfru: train/val/test/trainval; "
                                   "toy: source/target")
    p.add_argument("--check", action="store_true", help="decode every image: which are unreadable")
    p.add_argument("--save-hierarchy", help="write the class hierarchy to this JSON file")
    return parser.parse_args(argv)


def read_enough_images(args, flag):
    """--ref's or --samples' images, refused when too few for precision and recall."""
    path = getattr(args, flag)
    kind, split = (args.ref_data, args.ref_split) if flag == "ref" else (None, None)
    image_set = read_image_set(path, kind, split, args.image_size, args.class_map)
    if (n := len(image_set["images"])) <= NEIGHBOURS:
        raise ValueError(f"--{flag} {path}: {n} images, and precision and recall need at least "
                         f"{NEIGHBOURS + 1} (an image and its k = {NEIGHBOURS} nearest neighbours)")
    return image_set


def run_ref_stats(args):
    inception = load_inception(args.inception, args.device)
    reference = inception_statistics(read_enough_images(args, "ref"), inception, args.batch_size,
                                     args.num_workers, args.device)
    save_statistics(args.out, reference)
    print(f"saved FID's statistics of {', '.join(reference['fid'])}, sFID's, and the "
          f"{len(reference['pool3']):,} images' pool3 features (precision, recall) to {args.out}")


def run_fid(args):
    inception = load_inception(args.inception, args.device)
    reference = load_statistics(args.ref)  # ref-stats' .npz as it is, else the reference images
    ref_images = None if reference else read_enough_images(args, "ref")
    samples = read_enough_images(args, "samples")
    if reference and (missing := missing_metrics(reference)):
        print(f"--ref {args.ref}, FID's alone: {', '.join(missing)} need a ref-stats made by this "
              f"version (python evaluate.py ref-stats --ref <images> --out <new>); FID, IS follow")
    options = (args.batch_size, args.num_workers, args.device)
    reference = reference or inception_statistics(ref_images, inception, *options)
    samples = inception_statistics(samples, inception, *options)
    values = suite_metrics(samples, reference, args.device)
    report(values, args.results, args.method, replaces=["fid", *SUITE_COLUMNS])
    if missing := sorted(set(samples["fid"]) - set(values["fid"])):
        print(f"no reference images for {missing} (the reference has {list(reference['fid'])})")


def run_lpips(args):
    samples = read_image_npz(args.samples, args.class_map, "LPIPS pairs samples of one class")
    images, labels = samples["images"], samples["labels"]
    if min(images.shape[1:3]) < LPIPS_MIN_SIZE:
        raise ValueError(f"{args.samples}: {images.shape[2]}x{images.shape[1]} px images, and "
                         f"LPIPS's AlexNet needs at least {LPIPS_MIN_SIZE} px: sample larger")
    values = lpips_diversity(load_lpips(args.lpips_weights, args.device), images, labels,
                             samples["superclass_labels"], samples["superclass_names"],
                             args.pairs_per_class, args.batch_size, args.seed, args.device)
    report({"lpips": values}, args.results, args.method)


def run_judge(args):
    if args.split is None and args.data in ("toy", "taxa"):
        args.split = "target"  # the fine-tuned classes
    dataset, hierarchy = load_dataset(args.data, args.data_path, args.image_size, args.split,
                                      hflip=False)
    # batches of 64 shifted by up to 2 px, never mirrored: a mirror can be another class (toys)
    rows, images = zip(*read_images(dataset, num_workers=args.num_workers))
    labels, images = dataset.labels[np.concatenate(rows)], torch.cat(images).numpy()
    test = held_out(labels)
    num_classes = len(hierarchy.class_names)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    judge = Judge(num_classes, args.width).to(args.device).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=0.05)
    steps = args.epochs * math.ceil((~test).sum() / 64)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    pixels = torch.as_tensor(images[~test]).permute(0, 3, 1, 2)
    targets, size = torch.as_tensor(labels[~test]), images.shape[1]
    for _ in (bar := tqdm(range(args.epochs), desc="training the judge")):
        for batch in torch.randperm(len(pixels), generator=generator).split(64):
            dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
            x = F.pad(pixels[batch].float() / 255, (2, 2, 2, 2), mode="replicate")
            x = x[:, :, dy:dy + size, dx:dx + size]
            loss = F.cross_entropy(judge(x.to(args.device))[1], targets[batch].to(args.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    judge.eval().requires_grad_(False)
    features, probabilities = judge_images(judge, images, device=args.device)
    accuracy, chance = rank_accuracy(probabilities[test], labels[test], hierarchy)
    stats = set_statistics(features, np.asarray(hierarchy.class_to_superclass)[labels],
                           hierarchy.superclass_names)
    mu, sigma = (torch.as_tensor(np.stack(moment)) for moment in zip(*stats.values()))
    contents = dict(format=JUDGE_FORMAT, width=args.width, image_size=dataset.image_size,
                    state_dict=judge.state_dict(), hierarchy=hierarchy.to_dict(), held_out=accuracy,
                    chance=chance, reference=dict(names=list(stats), mu=mu, sigma=sigma),
                    data=dict(kind=args.data, path=args.data_path, split=args.split,
                              files=dataset.fingerprint(), images=len(labels),
                              held_out_images=int(test.sum())))
    contents["class_spread"] = torch.as_tensor(within_class_spread(features, labels, num_classes))
    write_atomically(args.out, lambda f: torch.save(contents, f))
    print(f"saved {args.out}: {describe_judge(contents)}")


def run_score(args):
    judge, contents = load_judge(args.judge)
    # sample.py's .npz, or its PNGs NNNNNN.png (image i of class i mod C): the judge's size, classes
    path = args.samples
    classes, size = contents["hierarchy"]["class_names"], contents["image_size"]
    wrong_size = (f"{path}: its images are {{}}x{{}} px, and the judge judges {size}x{size} px "
                  f"images: sample at --image-size {size}")
    names = None
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files or not all(f[:-4].isdigit() for f in files):
            raise ValueError(f"{path}: no PNGs NNNNNN.png as sample.py writes them (others carry "
                             "no class): give sample.py's .npz")
        if (first := Image.open(os.path.join(path, files[0]))).size != (size, size):
            raise ValueError(wrong_size.format(*first.size))  # before reading them all
        images = np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB"))
                           for f in files])
        numbers = [int(f[:-4]) for f in files]
        labels = sample_classes(max(numbers) + 1, len(classes))[numbers]
    else:
        samples = read_image_npz(path, labels_for="the judge checks each sample's class")
        images, labels, names = samples["images"], samples["labels"], samples["class_names"]
    if images.shape[1:3] != (size, size):
        raise ValueError(wrong_size.format(images.shape[2], images.shape[1]))
    data = contents["data"]
    if names not in (None, classes) or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"{path}: its classes ({len(names or [])} names, labels {labels.min()}.."
                         f"{labels.max()}) are not the judge's {len(classes)} of {data['kind']} "
                         f"{data.get('split') or ''}: give a judge of the data the model learned")
    labels = np.asarray(labels, dtype=np.int64)
    print(f"{args.judge}: {describe_judge(contents)}\n{args.samples}: {len(labels):,} samples of "
          f"{len(np.unique(labels)):,} classes")
    hierarchy = Hierarchy.from_dict(contents["hierarchy"])
    features, probabilities = judge_images(judge.to(args.device), images, device=args.device)
    accuracy, chance = rank_accuracy(probabilities, labels, hierarchy)
    superclass_labels = np.asarray(hierarchy.class_to_superclass)[labels]
    correct = probabilities.argmax(axis=1) == labels
    by_superclass = {hierarchy.superclass_names[s]: float(correct[superclass_labels == s].mean())
                     for s in np.unique(superclass_labels)}
    real = contents["reference"]
    reference = dict(zip(real["names"], zip(real["mu"].numpy(), real["sigma"].numpy())))
    fd = fid_by_superclass(
        set_statistics(features, superclass_labels, hierarchy.superclass_names), reference)
    spread = within_class_spread(features, labels, len(hierarchy.class_names))
    judged = ~np.isnan(spread)  # classes with two samples or more
    diversity = spread[judged].sum() / contents["class_spread"].numpy()[judged].sum()
    scores = dict(accuracy=accuracy, chance=chance, real=contents["held_out"],
                  fine_by_superclass=by_superclass, fd=fd,
                  fd_mean=float(np.mean([v for k, v in fd.items() if k != "overall"])),
                  diversity=float(diversity))
    by_rank = lambda key: "  ".join(f"{r} {v:.3f}" for r, v in scores[key].items())
    by_superclass = ", ".join(f"{k} {v:.3f}" for k, v in scores["fine_by_superclass"].items())
    print(f"accuracy:  {by_rank('accuracy')}\n  chance:  {by_rank('chance')}\n  real:    "
          f"{by_rank('real')}  (held-out real images)\nfine accuracy per superclass: "
          f"{by_superclass}\njudge FD: overall {scores['fd']['overall']:.2f}, mean per superclass "
          f"{scores['fd_mean']:.2f}\ndiversity: {scores['diversity']:.3f} (within-class feature "
          f"spread of samples / of real images)")
    report({"judge": scores}, args.results, args.method, show=False)


def run_tsne(args):
    checkpoint = find_checkpoint(args.checkpoint)
    out = args.out or new_file(os.path.join(run_folder(checkpoint) or ".", "tsne.png"))
    table, hierarchy = read_label_table(checkpoint, args.weights)
    if (args.class_map or hierarchy) is None:
        raise ValueError(f"{args.checkpoint} holds no class hierarchy: give it with --class-map")
    class_to_superclass, names = read_class_map(args.class_map or hierarchy)
    num_superclasses = superclass_count(class_to_superclass.tolist())
    if table.shape[0] < len(class_to_superclass) + num_superclasses:
        raise ValueError(f"{checkpoint}: its label table has {table.shape[0]} rows, and Figure 7 "
                         f"needs the {len(class_to_superclass)} fine + {num_superclasses} "
                         f"superclass rows of a tiered table, as --method finediffusion trains")
    options = {k: getattr(args, k) for k in ("device", "perplexity", "iterations", "seed")}
    fine, means, supers = embed_label_table(table, class_to_superclass, num_superclasses, **options)
    name = os.path.relpath(checkpoint, os.path.dirname(run_folder(checkpoint) or checkpoint))
    names = names or [f"superclass {s}" for s in range(num_superclasses)]
    draw_figure7(fine, class_to_superclass, means, supers, names, out, tuple(args.size),
                 title=f"t-SNE of label embeddings: {name} ({args.weights} weights)")
    print(f"saved {out} (the {args.weights} label table of {checkpoint})")
    return out


def run_data(args):
    hierarchy_out = args.save_hierarchy and new_file(args.save_hierarchy, "--save-hierarchy")
    dataset, hierarchy = load_dataset(args.data, args.data_path, args.image_size, args.split)
    superclasses = hierarchy.superclass_names
    counts = np.bincount(np.asarray(hierarchy.class_to_superclass)[dataset.labels],
                         minlength=len(superclasses))
    print(f"{len(dataset.files):,} images of {len(hierarchy.class_names):,} classes in "
          f"{len(superclasses)} superclasses ({len(dataset):,} items with mirrors)")
    for s, name in enumerate(superclasses):
        classes = hierarchy.class_to_superclass.count(s)
        print(f"  {s:3d} {name:24s} {classes:6,} classes {counts[s]:9,} images")
    if args.check:
        for _ in read_images(dataset, num_workers=args.num_workers):
            pass
        print(f"{len(dataset.skipped)} unreadable images"
              + "".join(f"\n  {f}: {why}" for f, why in dataset.skipped.items()))
    if hierarchy_out:
        hierarchy.to_json(hierarchy_out)
        print(f"saved {hierarchy_out}")


def main(argv=None):
    """-> the figure of tsne (toy.py shows it)."""
    args = parse_args(argv)
    # every output and input checked before any network runs (not after hours of Inception)
    if getattr(args, "out", None):
        new_file(args.out, "--out")
    for flag in ("samples", "ref", "judge"):
        if (path := getattr(args, flag, None)) is not None and not os.path.exists(path):
            raise ValueError(f"--{flag} {path}: no such file or folder")
    if results := getattr(args, "results", None):  # merged into after the metric: checked first
        if os.path.exists(results) and not isinstance(read_json(results), dict):  # or a folder
            raise ValueError(f"--results {results} holds no results object: give ours, or new")
        cli.writable_folder(os.path.dirname(os.path.abspath(results)), "--results")
    return args.run(args)


if __name__ == "__main__":
    cli.run(main)
