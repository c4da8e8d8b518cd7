"""
Datasets with their label hierarchy (fine classes inside superclasses), the ADM centre crop, and a VAE latent cache.

Layouts read (`load_dataset(kind, path, image_size, split)` -> (dataset, hierarchy)):

    inat    iNaturalist 2021 as distributed: path/train_mini/NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet/
            *.jpg with path/train_mini.json (or train/, val/); without the JSON, the folder names give the hierarchy
    vegfru  VegFru as released: path/veg200_images/<class>/v_SS_CC_NNNN.jpg, path/fru92_images/<class>/f_SS_CC_NNNN.jpg
            and path/vegfru_list/vegfru_{train,val,test}.txt (+ supvegfru_*.txt superclass ids where present)
    folder  any path/<superclass>/<class>/*.jpg tree, or deeper (path/<superclass>/<group>/<class>/*.jpg)
    toy     a small synthetic set drawn with pillow from a seed, written as a folder tree (path/source, path/target)
    taxa    the same drawing as a taxonomy of three levels (superclass / genus / species), 120 target species

Items are (image (3, H, W) in [-1, 1], fine label). Index i is image i // 2, mirrored when i is odd, so a seeded
sampler alone decides what a step sees (exact resume). `build_latent_cache` encodes every image (both mirrors)
once with the VAE into a memory-mapped .npy of posterior moments; training then samples z = mean + std * eps.
"""
import colorsys
import difflib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

INAT_SOURCE = "get iNaturalist 2021 from https://github.com/visipedia/inat_comp/tree/master/2021"
VEGFRU_SOURCE = "get VegFru from https://github.com/ustc-vim/vegfru"


def read_json(path):
    """A JSON file a user gave; a folder, or a file that does not parse, is a ValueError that names it."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: a JSON file is expected here")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None


# -----------------------------------------------------------------------------------------------------------
# The label hierarchy: fine class names, superclass names, the fine -> superclass map, and name lookup.
# Stored in checkpoints as a dict of lists of str/int, so it loads with torch.load(weights_only=True).

def name_key(name):
    """Names compare case-insensitively, with '_' as a space ('danaus_plexippus' finds 'Danaus plexippus')."""
    return " ".join(str(name).replace("_", " ").split()).lower()


class Hierarchy:
    """Fine classes (ids 0..C-1), superclasses (ids 0..S-1) and which superclass each fine class belongs to; and,
    where the data has them, the ranks between (iNat's genus, family, order, class; a deeper folder tree's groups):
    `levels`, finest first, each dict(name=rank, group_names=[...], class_to_group=[one id per class])."""

    def __init__(self, class_names, superclass_names, class_to_superclass, common_names=None, levels=()):
        self.class_names = [str(n) for n in class_names]
        self.superclass_names = [str(n) for n in superclass_names]
        self.class_to_superclass = [int(s) for s in class_to_superclass]
        self.common_names = [str(n) for n in common_names] if common_names is not None else [""] * len(class_names)
        self.levels = [dict(name=str(level["name"]), group_names=[str(n) for n in level["group_names"]],
                            class_to_group=[int(g) for g in level["class_to_group"]]) for level in levels]
        if not len(self.class_names) == len(self.class_to_superclass) == len(self.common_names):
            raise ValueError(f"hierarchy: {len(self.class_names)} class names, {len(self.class_to_superclass)} "
                             f"superclass ids and {len(self.common_names)} common names must agree")
        for name, groups, of_class in self.ranks()[1:]:
            if len(of_class) != len(self.class_names):
                raise ValueError(f"hierarchy: {len(of_class)} {name} ids for {len(self.class_names)} classes")
            if bad := [i for i, g in enumerate(of_class) if not 0 <= g < len(groups)]:
                raise ValueError(f"hierarchy: classes {bad[:5]} point at no {name} (valid: 0..{len(groups) - 1})")
        for (finer, _, fine_of), (coarser, _, coarse_of) in zip(self.ranks()[1:], self.ranks()[2:]):
            parents = {}
            if any(parents.setdefault(f, c) != c for f, c in zip(fine_of, coarse_of)):
                raise ValueError(f"hierarchy: a {finer} lies in two different {coarser} groups: each rank must nest in "
                                 f"the next")
        self._index = None

    def ranks(self):
        """[(rank, names, the rank's id of each class)] from the fine classes to the superclasses."""
        return ([("fine", self.class_names, list(range(len(self.class_names))))]
                + [(level["name"], level["group_names"], level["class_to_group"]) for level in self.levels]
                + [("superclass", self.superclass_names, self.class_to_superclass)])

    def to_dict(self):
        return dict(class_names=self.class_names, superclass_names=self.superclass_names,
                    class_to_superclass=self.class_to_superclass, common_names=self.common_names,
                    **{"levels": self.levels} if self.levels else {})

    @classmethod
    def from_dict(cls, d):
        missing = [k for k in ("class_names", "superclass_names", "class_to_superclass") if k not in d]
        if missing:
            raise ValueError(f"not a class hierarchy: no {missing} (expected the 'hierarchy' of a train.py checkpoint, "
                             f"a JSON written by Hierarchy.to_json, or iNat's train_mini.json)")
        return cls(d["class_names"], d["superclass_names"], d["class_to_superclass"], d.get("common_names"),
                   d.get("levels", ()))

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path):
        """Our own JSON, or an iNat 2021 annotation file (train_mini.json, val.json: its `categories`)."""
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path} holds no class hierarchy: expected a JSON object")
        if "categories" in d:
            check_inat_json(d, path, ["categories"])
            return inat_hierarchy(d["categories"])
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def lookup(self, query):
        """A fine class id from an id (412, "412") or a name: scientific or common, case-insensitive."""
        text = str(query).strip()
        if re.fullmatch(r"-?\d+", text):
            i = int(text)
            if not 0 <= i < len(self.class_names):
                raise ValueError(f"class id {i} is out of range: valid ids are 0..{len(self.class_names) - 1}")
            return i
        if self._index is None:  # name key -> ids, built on the first lookup
            self._index = {}
            for i, names in enumerate(zip(self.class_names, self.common_names)):
                for key in {name_key(n) for n in names if n}:
                    self._index.setdefault(key, []).append(i)
        ids = self._index.get(name_key(text), [])
        if len(ids) == 1:
            return ids[0]
        if ids:
            raise ValueError(f"{text!r} names {len(ids)} classes: " + ", ".join(self.describe(i) for i in ids[:10]))
        superclasses = [s for s, name in enumerate(self.superclass_names) if name_key(name) == name_key(text)]
        if superclasses:
            members = [i for i, s in enumerate(self.class_to_superclass) if s == superclasses[0]]
            raise ValueError(f"{text!r} is a superclass of {len(members)} classes: give one of them: "
                             + ", ".join(self.describe(i) for i in members[:10]) + ", ..." * (len(members) > 10))
        close = difflib.get_close_matches(name_key(text), list(self._index), n=5, cutoff=0.6)
        close_ids = list(dict.fromkeys(i for key in close for i in self._index[key]))
        hint = ("; closest: " + ", ".join(self.describe(i) for i in close_ids)) if close_ids else ""
        raise ValueError(f"no class named {text!r}{hint}")

    def describe(self, i):
        """Class i as messages name it: '412 Danaus plexippus (Monarch)'."""
        return f"{i} {self.class_names[i]}" + (f" ({self.common_names[i]})" if self.common_names[i] else "")

    def listing(self, text=""):
        """Lines "id name (common name) [superclass]" of the classes whose names or superclass contain `text`."""
        lines = [f"{self.describe(i)} [{self.superclass_names[s]}]" for i, s in enumerate(self.class_to_superclass)]
        return [line for line in lines if name_key(text) in name_key(line.split(" ", 1)[1])]


# -----------------------------------------------------------------------------------------------------------
# The ADM centre crop (Dhariwal & Nichol 2021, guided-diffusion image_datasets.py; used by DiT's train.py) and
# images to tensors in [-1, 1].

def center_crop(image, size):
    """PIL image -> (size, size, 3) uint8: halve with a box filter while the short side >= 2 * size (cheap and
    alias-free), bicubic so the short side == size, then crop the centre."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    pixels = np.array(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def to_tensor(pixels):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1], as DiT's ToTensor + Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float()
    return (x / 255 - 0.5) / 0.5


def to_pixels(x, vae=None):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy: what to_tensor undoes, rounded and clipped. With a VAE,
    x is what a latent-space DiT samples (scaled latents), decoded first."""
    if vae is not None:
        x = vae.decode(x / vae.scaling_factor)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, cols=None, row_names=None, titles=None):
    """(N, H, W, 3) uint8 -> one PNG, `cols` images a row (default: as square a grid as N allows) -> the top-left
    corner (x, y) of each image in it. With row_names each row starts with its name; with titles the columns fall
    into len(titles) equal groups, each under its title, apart by a gap. A labelled grid enlarges images under
    48 px (nearest neighbour) so that they stand beside legible text."""
    n, h, w, _ = images.shape
    zoom = max(1, math.ceil(48 / h)) if row_names or titles else 1
    h, w = h * zoom, w * zoom
    cols = cols or math.ceil(math.sqrt(n))
    rows, groups, pad = math.ceil(n / cols), len(titles or [None]), 2
    font = ImageFont.load_default(size=max(12, min(24, h // 4)))
    left = round(max((font.getlength(name) for name in row_names), default=0) + 4 * pad) if row_names else 0
    top = font.size + 4 * pad if titles else 0
    gap = w // 2 if groups > 1 else 0
    corners = [(left + pad + c * (w + pad) + c * groups // cols * gap, top + pad + r * (h + pad))
               for r, c in (divmod(i, cols) for i in range(n))]
    canvas = Image.new("RGB", (left + pad + cols * (w + pad) + (groups - 1) * gap, top + pad + rows * (h + pad)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for image, corner in zip(images, corners):
        canvas.paste(Image.fromarray(image).resize((w, h), Image.NEAREST), corner)
    for r, name in enumerate(row_names or []):
        draw.text((pad, corners[r * cols][1] + h / 2), name, fill="black", font=font, anchor="lm")
    for g, title in enumerate(titles or []):
        draw.text((corners[g * cols // groups][0], pad), title, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return corners


# -----------------------------------------------------------------------------------------------------------
# The image dataset, indexed as the module docstring says: flips come from the index, not from a random draw inside
# a worker. An unreadable image is reported once and replaced by the next readable one.

class ImageDataset(Dataset):
    def __init__(self, root, files, labels, image_size, hflip=True):
        self.root, self.image_size, self.hflip = root, image_size, hflip
        # numpy arrays, not lists of str: DataLoader workers then share them without copy-on-access
        self.files, self.labels = np.asarray(files, dtype=str), np.asarray(labels, dtype=np.int64)
        self.skipped = {}  # file (as in self.files) -> why it could not be read, in this process
        self.reported = tempfile.mkdtemp(prefix="finediffusion-reported-")  # markers all workers and epochs share
        weakref.finalize(self, shutil.rmtree, self.reported, ignore_errors=True)

    def __len__(self):
        return len(self.files) * (2 if self.hflip else 1)

    def fingerprint(self):
        """The sha256 of its files and labels (`fingerprint`): what a latent cache or a judge was made from."""
        return fingerprint(dict(files=self.files, labels=self.labels))

    def read(self, j):
        """Image j -> (H, W, 3) uint8 after the centre crop; raises if the file cannot be decoded. One far smaller
        than image_size (upscaled more than 2x) is used, and reported."""
        with Image.open(os.path.join(self.root, self.files[j])) as image:
            if 2 * min(image.size) < self.image_size:
                self.report(j, f"{image.size[0]}x{image.size[1]} px, upscaled more than 2x to {self.image_size}")
            return center_crop(image, self.image_size)

    def read_batch(self, indices):
        """Images `indices` (in a DataLoader worker, see read_images) -> (the indices of the readable ones, their
        (H, W, 3) uint8 tensors, {index: why it could not be read} of the others)."""
        good, pixels, bad = [], [], {}
        for j in map(int, indices):
            try:
                pixels.append(torch.from_numpy(self.read(j).copy()))
                good.append(j)
            except Exception as e:
                bad[j] = f"{type(e).__name__}: {e}"
        return good, pixels, bad

    def __getitem__(self, i):
        j, flip = divmod(i, 2) if self.hflip else (i, 0)
        for k in (j + np.arange(len(self.files))) % len(self.files):  # image j, else the next readable one
            try:
                pixels = self.read(k)
            except Exception as e:  # a bad file must not end a run hours in
                self.skip(k, f"{type(e).__name__}: {e}")
            else:
                return to_tensor(pixels[:, ::-1] if flip else pixels), int(self.labels[k])
        raise ValueError(f"no image under {self.root} can be read (all {len(self.files)}; e.g. "
                         f"{next(iter(self.skipped.items()))}): give a folder of images pillow reads (JPEG, PNG, ...)")

    def skip(self, j, reason):
        """Image j cannot be read: recorded in self.skipped (of this process) and reported."""
        self.skipped[str(self.files[j])] = reason
        self.report(j, f"unreadable, skipped ({reason})")

    def report(self, j, problem):
        """Say once per dataset what is wrong with image j: the first process to make its marker file says it, so
        a bad file is one line, not one per DataLoader worker and epoch."""
        marker = os.path.join(self.reported, hashlib.sha1(str(self.files[j]).encode()).hexdigest())
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except OSError:  # said already (or the markers are gone with the dataset: nothing left to say it to)
            return
        print(f"data: {os.path.join(self.root, self.files[j])}: {problem}", file=sys.stderr)


def list_images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp")))


def subfolders(folder):
    return sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))


# -----------------------------------------------------------------------------------------------------------
# The generic layout root/<superclass>/<class>/*.jpg, or deeper: root/<superclass>/<group>/.../<class>/*.jpg with
# every class folder at the same depth (the folders between are ranks: groups). Class ids follow the sorted paths
# (the order evaluate.py reads reference folders in).

def class_folders(root, depth):
    """The relative paths (tuples of `depth` names) of the folders `depth` levels below root, sorted."""
    paths = [()]
    for _ in range(depth):
        paths = [path + (name,) for path in paths for name in subfolders(os.path.join(root, *path))]
    return paths


def load_folder(root, image_size, hflip=True, rank_names=None):
    """A class folder without images, and so a superclass without classes, is left out, with one warning line: a
    class that cannot be learned would otherwise be sampled as if it had been. The ranks between superclass and
    class are named `rank_names` (default: group, or group 1, group 2, ...)."""
    def images_at(depth):
        return [(path, list_images(os.path.join(root, *path))) for path in class_folders(root, depth)]
    depth, found = 2, images_at(2)
    while not any(images for _, images in found) and any(subfolders(os.path.join(root, *p)) for p, _ in found):
        depth, found = depth + 1, images_at(depth + 1)  # no images here and folders below: the classes are deeper
    classes = [(path, images) for path, images in found if images]
    if not classes:
        raise FileNotFoundError(f"no images in {root}: expected the layout {root}/<superclass>/<class>/*.jpg")
    superclass_names = list(dict.fromkeys(path[0] for path, _ in classes))  # sorted, as subfolders
    empty = [os.path.join(*path) for path, images in found if not images]
    dropped = sorted(set(subfolders(root)) - set(superclass_names))
    if empty or dropped:
        print(f"data: left out {len(empty)} class folders without images ({', '.join(empty[:5])}) and "
              f"{len(dropped)} superclasses without classes ({', '.join(dropped[:5])}) of {root}", file=sys.stderr)
    rank_names = rank_names or (["group"] if depth == 3 else [f"group {k}" for k in range(1, depth - 1)])
    levels = []
    for k, name in zip(range(depth - 2, 0, -1), rank_names[::-1]):  # finest rank first: the class folder's parent
        groups = list(dict.fromkeys(path[:k + 1] for path, _ in classes))  # a group is its whole path
        levels.append(dict(name=name, group_names=[g[-1] for g in groups],
                           class_to_group=[groups.index(path[:k + 1]) for path, _ in classes]))
    files = [os.path.join(*path, f) for path, images in classes for f in images]
    labels = [label for label, (_, images) in enumerate(classes) for _ in images]
    hierarchy = Hierarchy([path[-1] for path, _ in classes], superclass_names,
                          [superclass_names.index(path[0]) for path, _ in classes], levels=levels)
    return ImageDataset(root, files, labels, image_size, hflip), hierarchy


# -----------------------------------------------------------------------------------------------------------
# iNaturalist 2021. The JSON (COCO-style: images, annotations, categories with name, common_name, supercategory,
# kingdom..specific_epithet, image_dir_name) is authoritative; without it, the folder names' taxonomy gives both.

INAT_JSON_KEYS = dict(images=("id", "file_name"), annotations=("image_id", "category_id"),
                      categories=("id", "name", "supercategory"))
INAT_SUPERCLASS_OF_CLASS = {"Insecta": "Insects", "Aves": "Birds", "Reptilia": "Reptiles", "Mammalia": "Mammals",
                            "Actinopterygii": "Ray-finned Fishes", "Amphibia": "Amphibians", "Arachnida": "Arachnids"}


INAT_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")  # the JSON's keys, as in the folder names


def inat_category(dir_name):
    """'00412_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus' -> its category as the JSON has
    it (id, name, supercategory from the taxonomy, image_dir_name), or None for a name of another form."""
    parts = dir_name.split("_", 7)
    if len(parts) != 8 or not parts[0].isdigit():
        return None
    number, kingdom, phylum, taxon_class, _, _, genus, epithet = parts
    if kingdom == "Animalia":
        superclass = "Mollusks" if phylum == "Mollusca" else INAT_SUPERCLASS_OF_CLASS.get(taxon_class, "Animalia")
    else:  # Plants, Fungi; a kingdom not in iNat 2021 is kept visible rather than folded into another superclass
        superclass = {"Plantae": "Plants"}.get(kingdom, kingdom)
    return dict(id=int(number), name=f"{genus} {epithet}", supercategory=superclass, image_dir_name=dir_name,
                **dict(zip(INAT_RANKS, parts[1:7])))


def check_inat_json(meta, path, parts=tuple(INAT_JSON_KEYS)):
    """The structure of iNat's JSON (its `parts`: lists of entries with the keys INAT_JSON_KEYS names), checked
    before anything is looked up in it."""
    for part in parts:
        entries = meta.get(part) if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected iNat 2021's JSON, which has a list {part!r} ({INAT_SOURCE})")
        lacking = next((e for e in entries if not (isinstance(e, dict) and set(INAT_JSON_KEYS[part]) <= set(e))), None)
        if lacking is not None:
            raise ValueError(f"{path}: every entry of {part!r} needs the keys {list(INAT_JSON_KEYS[part])}; one is "
                             f"{str(lacking)[:100]} ({INAT_SOURCE})")


def inat_hierarchy(categories):
    """Hierarchy from the JSON's categories (checked: id, name, supercategory), in category-id order; superclasses
    sorted by name; the ranks class, order, family and genus between, where every category names them (a group is
    its whole lineage, so ranks nest and Morus the mulberry and Morus the gannet are two genera)."""
    categories = sorted(categories, key=lambda c: c["id"])
    superclass_names = sorted({c["supercategory"] for c in categories})
    levels = []
    for k in range(len(INAT_RANKS) - 1, 1, -1):  # genus, family, order, class: finest first
        if all(rank in c for c in categories for rank in INAT_RANKS[:k + 1]):
            lineages = [(c["supercategory"],) + tuple(str(c[rank]) for rank in INAT_RANKS[:k + 1]) for c in categories]
            groups = sorted(set(lineages))
            group_of = {g: i for i, g in enumerate(groups)}
            levels.append(dict(name=INAT_RANKS[k], group_names=[g[-1] for g in groups],
                               class_to_group=[group_of[g] for g in lineages]))
    return Hierarchy([c["name"] for c in categories], superclass_names,
                     [superclass_names.index(c["supercategory"]) for c in categories],
                     [c.get("common_name", "") for c in categories], levels)


def load_inat(root, split, image_size, hflip=True):
    """root/split/ and root/split.json (either may be missing) -> (ImageDataset, Hierarchy)."""
    folder, json_path = os.path.join(root, split), os.path.join(root, f"{split}.json")
    if not os.path.isdir(folder) and not os.path.isfile(json_path):
        raise FileNotFoundError(f"no iNat split {split!r} in {root}: expected {folder}/ (class folders NNNNN_Kingdom_"
                                f"Phylum_Class_Order_Family_Genus_epithet) and {json_path}; {INAT_SOURCE}")
    on_disk = subfolders(folder) if os.path.isdir(folder) else None
    if not os.path.isfile(json_path):  # folders only: the categories their names give
        bad = [d for d in on_disk if inat_category(d) is None]
        if bad or not on_disk:
            raise ValueError(f"{folder}: class folders must be named NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_"
                             f"epithet, found {bad[:3] or 'none'}; {INAT_SOURCE}")
        categories = sorted(map(inat_category, on_disk), key=lambda c: c["id"])
        images = [(os.path.join(split, c["image_dir_name"], f), label) for label, c in enumerate(categories)
                  for f in list_images(os.path.join(folder, c["image_dir_name"]))]  # (file, label)
        dataset = ImageDataset(root, [f for f, _ in images], [label for _, label in images], image_size, hflip)
        return dataset, inat_hierarchy(categories)

    meta = read_json(json_path)
    if isinstance(meta, dict) and "annotations" not in meta:
        raise ValueError(f"{json_path} has no annotations (iNat's test split is unlabelled): "
                         "use train_mini, train or val")
    check_inat_json(meta, json_path)
    categories = sorted(meta["categories"], key=lambda c: c["id"])
    hierarchy = inat_hierarchy(categories)
    dir_names = [c.get("image_dir_name", "") for c in categories]
    if on_disk is not None and set(on_disk) != set(dir_names):
        extra, absent = sorted(set(on_disk) - set(dir_names)), sorted(set(dir_names) - set(on_disk))
        raise ValueError(f"{folder} and {json_path} disagree: {len(extra)} folders are not in the JSON (e.g. "
                         f"{extra[:2]}), {len(absent)} JSON classes have no folder (e.g. {absent[:2]}); "
                         f"use files of one release")
    derived = [inat_category(d) for d in dir_names]  # the supercategories the folder names give: the JSON wins
    mismatches = [f"{d}: JSON {c['supercategory']!r}, folder taxonomy {t['supercategory']!r}"
                  for d, c, t in zip(dir_names, categories, derived) if t and t["supercategory"] != c["supercategory"]]
    if mismatches:
        warnings.warn(f"{len(mismatches)} classes in {json_path} have a supercategory that differs from the one "
                      f"derived from their folder names (using the JSON's): " + "; ".join(mismatches[:5]))
    label_of_category = {c["id"]: i for i, c in enumerate(categories)}
    category_of_image = {a["image_id"]: a["category_id"] for a in meta["annotations"]}
    unknown = sorted(set(category_of_image.values()) - set(label_of_category), key=str)
    unlabelled = [im["id"] for im in meta["images"] if im["id"] not in category_of_image]
    if unknown or unlabelled:
        raise ValueError(f"{json_path} is inconsistent: " + "; ".join(
            ([f"annotations name {len(unknown)} categories it does not define (ids {unknown[:3]})"] if unknown else [])
            + ([f"{len(unlabelled)} images have no annotation (ids {unlabelled[:3]})"] if unlabelled else []))
            + f": use the JSON of the release as distributed ({INAT_SOURCE})")
    files = [im["file_name"] for im in meta["images"]]
    prefix = "" if files and files[0].startswith(split + "/") else split  # file_name is 'train_mini/<dir>/<id>.jpg'
    labels = [label_of_category[category_of_image[im["id"]]] for im in meta["images"]]
    return ImageDataset(root, [os.path.join(prefix, f) for f in files], labels, image_size, hflip), hierarchy


# -----------------------------------------------------------------------------------------------------------
# VegFru as released: vegfru_list/vegfru_<split>.txt lines 'veg200_images/<class>/v_SS_CC_NNNN.jpg <label>'
# (labels 0..291), supvegfru_<split>.txt the same paths with superclass ids 0..24. The lists give superclasses as
# numbers only; the file names carry them too (v_SS: vegetable superclass SS, f_SS: fruit), which name them here.

VEGFRU_FILE = re.compile(r"([vf])_(\d+)_\d+_\d+\.\w+$")


def read_list(path):
    """A VegFru list, lines '<image path> <id>' -> [(image path, id)]."""
    with open(path) as f:
        return [(p, int(label)) for p, label in (line.split() for line in f if line.strip())]


def load_vegfru(root, split, image_size, hflip=True):
    """VegFru's split train, val, test or trainval -> (ImageDataset, Hierarchy)."""
    lists = os.path.join(root, "vegfru_list")
    parts = ["train", "val"] if split == "trainval" else [split]
    paths = [os.path.join(lists, f"vegfru_{p}.txt") for p in parts]
    if not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"no VegFru split {split!r} in {root}: expected {', '.join(paths)} beside "
                                f"veg200_images/ and fru92_images/; {VEGFRU_SOURCE}")
    # the class table from every list present, so the hierarchy does not depend on the split
    all_lists = {p: read_list(os.path.join(lists, f"vegfru_{p}.txt")) for p in ("train", "val", "test")
                 if os.path.isfile(os.path.join(lists, f"vegfru_{p}.txt"))}
    sup_lists = {p: read_list(os.path.join(lists, f"supvegfru_{p}.txt")) for p in all_lists
                 if os.path.isfile(os.path.join(lists, f"supvegfru_{p}.txt"))}
    class_of_label, group_of_label, sup_of_label = {}, {}, {}
    for p, entries in all_lists.items():
        sup_of_path = dict(sup_lists.get(p, []))
        for path, label in entries:
            name, match = path.split("/")[1], VEGFRU_FILE.search(path)
            group = f"{'veg' if match.group(1) == 'v' else 'fru'}_{match.group(2)}" if match else None
            sup = [(sup_of_label, sup_of_path.get(path))] if sup_of_path else []
            for table, value in [(class_of_label, name), (group_of_label, group)] + sup:
                if table.setdefault(label, value) != value:
                    raise ValueError(f"{lists}: label {label} appears with {table[label]!r} and {value!r} ({path})")
    num_classes = len(class_of_label)
    if sorted(class_of_label) != list(range(num_classes)):
        raise ValueError(f"{lists}: labels must be 0..{num_classes - 1}")
    groups = [group_of_label[i] for i in range(num_classes)]  # 'veg_01', 'fru_02', ..., None for another file name
    if None in groups and not sup_lists:
        raise ValueError(f"{lists}: no supvegfru_*.txt and file names not like v_SS_CC_NNNN.jpg: no superclasses")
    if sup_lists:  # superclass ids from the lists, named by the file-name code they carry
        superclass_of = [sup_of_label[i] for i in range(num_classes)]
        ids = sorted(set(superclass_of))
        if ids != list(range(len(ids))):
            raise ValueError(f"{lists}: supvegfru_*.txt superclass ids must be 0..{len(ids) - 1}")
        codes = [{g for g, t in zip(groups, superclass_of) if t == s} for s in ids]
        names = [c.pop() if len(c) == 1 else None for c in codes]
        if None not in groups and (None in names or len(set(names)) != len(names)):
            raise ValueError(f"{lists}: the superclass ids of supvegfru_*.txt do not match the file names' "
                             f"v_SS/f_SS codes one to one")
        superclass_names = [name or f"superclass {s}" for s, name in enumerate(names)]
    else:  # from the file names: vegetable groups, then fruit groups
        superclass_names = sorted(set(groups), key=lambda g: (g[:3] != "veg", g))
        superclass_of = [superclass_names.index(g) for g in groups]
    hierarchy = Hierarchy([class_of_label[i] for i in range(num_classes)], superclass_names, superclass_of)
    entries = [e for p in parts for e in all_lists[p]]
    return ImageDataset(root, [p for p, _ in entries], [label for _, label in entries], image_size, hflip), hierarchy


# -----------------------------------------------------------------------------------------------------------
# The toy sets: small pictures drawn with pillow from a seed. Superclasses differ at a glance (shape, colour,
# background pattern); the fine classes of a superclass differ subtly (a small hue shift, the number of stripes,
# marks in the corners). 'source' (the role ImageNet plays) and 'target' (new fine classes, in the source's
# superclasses and in a new one) are folder trees root/<split>/<superclass>/.../<class>/*.png.
#   toy   16 source and 10 target classes, two levels: the quick first run (toy.py, at 16 px)
#   taxa  a taxonomy of three levels, superclass / genus (the number of stripes) / species (a hue shift and marks
#         in the corners), 96 source and 120 target species, every attribute at least 2 px wide at 32 px. A target
#         species is a combination of attributes the source shows, but not in that combination (as iNat's species
#         are new to a model pre-trained on ImageNet); the fifth superclass is one the source never shows.

TOY_VERSION = 1
TOY_SUPERCLASSES = [  # name, shape, hue, background
    ("discs", "disc", 0.00, "gradient"), ("squares", "square", 0.33, "stripes"),
    ("triangles", "triangle", 0.60, "checker"), ("diamonds", "diamond", 0.13, "dots"),
    ("crosses", "cross", 0.80, "diagonal")]
# fine classes within a superclass: (hue shift, number of stripes, corners holding a mark: 0 1 top, 2 3 bottom)
TOY_VARIANTS = [(0.00, 1, (0,)), (0.06, 1, (1,)), (0.00, 2, (2,)), (0.06, 2, (3,)), (0.03, 3, (0,)), (0.03, 3, (3,))]
TOY_SPLITS = {"source": [(s, v) for s in range(3) for v in range(4)],
              "target": [(s, v) for s in range(3) for v in (4, 5)] + [(3, v) for v in range(4)]}
TAXA_STRIPES = ("plain", "1stripe", "2stripes", "3stripes")  # the genera of each superclass
TAXA_MARKS = {"nomark": (), "top": (0, 1), "bottom": (2, 3), "corners": (0, 1, 2, 3)}  # alike in a mirror
TAXA_HUE_SHIFTS = (0.0, 0.05, 0.10)


def toy_classes(kind, split):
    """The classes of toy set `kind` (toy, taxa) in `split` -> [(folder path (superclass, ..., class), superclass
    index, look (hue shift, stripes, marked corners))]."""
    if kind == "toy":
        return [((TOY_SUPERCLASSES[s][0], f"{TOY_SUPERCLASSES[s][1]}_{'abcdef'[v]}"), s, TOY_VARIANTS[v])
                for s, v in TOY_SPLITS[split]]
    classes = []
    for s in range(4 if split == "source" else 5):
        superclass, shape = TOY_SUPERCLASSES[s][:2]
        for stripes, genus in enumerate(TAXA_STRIPES):
            for m, (mark, corners) in enumerate(TAXA_MARKS.items()):
                for h, hue_shift in enumerate(TAXA_HUE_SHIFTS):
                    if (m + h + stripes) % 2 == (split == "target"):  # the two splits: complementary combinations
                        classes.append(((superclass, f"{shape}-{genus}", f"{shape}-{genus}-{mark}-hue{h}"), s,
                                        (hue_shift, stripes, corners)))
    return classes


def toy_superclass_color(name):
    """The colour of a toy superclass's objects, as RGB 0..255 (figures use it), or None for other names."""
    hues = {superclass[0]: superclass[2] for superclass in TOY_SUPERCLASSES}
    return tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hues[name], 0.8, 0.85)) if name in hues else None


def draw_toy_image(superclass, look, rng, size):
    """One picture of toy superclass `superclass` with `look` (hue shift, stripes, marked corners), drawn 4x larger
    then box-filtered to size x size."""
    _, shape, hue, background = TOY_SUPERCLASSES[superclass]
    hue_shift, stripes, corners = look
    S = 4 * size
    yy, xx = np.mgrid[0:S, 0:S] / S
    phase = rng.uniform(0, 1)
    pattern = {"gradient": xx, "stripes": (xx * 4 + phase) % 1 < 0.5,
               "checker": ((xx * 4 + phase) // 1 + (yy * 4) // 1) % 2,
               "dots": (((xx * 5 + phase) % 1 - 0.5) ** 2 + ((yy * 5) % 1 - 0.5) ** 2) < 0.04,
               "diagonal": ((xx + yy) * 3 + phase) % 1 < 0.5}[background]
    base = np.array(colorsys.hsv_to_rgb(hue, 0.25, 0.55)) * 255
    canvas = Image.fromarray((base * (0.75 + 0.35 * pattern[..., None])).clip(0, 255).astype(np.uint8))
    # the object: a shape with horizontal stripes, pasted through its mask
    (cx, cy), r = S * (0.5 + rng.uniform(-0.08, 0.08, 2)), S * rng.uniform(0.24, 0.3)
    mask = Image.new("L", (S, S))
    draw = ImageDraw.Draw(mask)
    box, w = [cx - r, cy - r, cx + r, cy + r], r / 2.5
    outline, points = {"disc": (draw.ellipse, box), "square": (draw.rectangle, box),
                       "triangle": (draw.polygon, [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]),
                       "diamond": (draw.polygon, [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]),
                       "cross": (draw.polygon, [(cx + a, cy + b) for a, b in  # a plus sign, arms 2w wide
                                                [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                                                 (-w, w), (-r, w), (-r, -w), (-w, -w)]])}[shape]
    outline(points, fill=255)
    color = np.array(colorsys.hsv_to_rgb((hue + hue_shift) % 1, 0.8, rng.uniform(0.8, 0.95))) * 255
    layer = Image.new("RGB", (S, S), tuple(int(c) for c in color))
    band = 2 * r / (2 * stripes + 1)
    for k in range(stripes):  # dark bands at 1, 3, 5... band heights down the object
        top = cy - r + (2 * k + 1) * band
        ImageDraw.Draw(layer).rectangle([0, top, S, top + band], fill=tuple(int(c * 0.45) for c in color))
    canvas.paste(layer, mask=mask)
    # the marks: tiny white squares in corners
    for corner in corners:
        m, x0, y0 = S // 16, S // 16 + (corner % 2) * (S - 3 * S // 16), S // 16 + (corner // 2) * (S - 3 * S // 16)
        ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + m, y0 + m], fill=(255, 255, 255))
    pixels = np.asarray(canvas.resize((size, size), resample=Image.BOX)).astype(np.float64)
    return Image.fromarray((pixels + rng.normal(0, 3, pixels.shape)).round().clip(0, 255).astype(np.uint8))


# -----------------------------------------------------------------------------------------------------------
# One writer at a time. What a process writes over minutes (a run folder, a toy set, a latent cache) it holds with
# an OS file lock: flock on Linux and macOS, msvcrt on Windows. The OS releases a lock when its process ends, however it
# ends, so a killed writer's lock is free at once and a live one's never is; no process table is read. While it holds
# the lock, the writer knows any temporary file there is a dead writer's and removes it.

LOCK_FILE = "lock"  # the lock's name in a folder it guards (a run folder, a latent cache)


class Lock:
    """An exclusive lock on the file `path`, held by this process until release() or its end; `what` names the thing
    it guards. Another process holding it: a ValueError that names that process (the lock file says who holds it)."""
    def __init__(self, path, what):
        self.path = path
        while True:
            self.file = open(path, "a+")
            try:
                lock_file(self.file)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise ValueError(f"{what} is in use by {holder} (lock {path}): one process writes it at a time; wait "
                                 f"for that one to end, or stop it") from None
            if os.path.exists(path) and os.path.samestat(os.fstat(self.file.fileno()), os.stat(path)):
                break
            self.file.close()  # the holder before us removed this file as we opened it: lock the one there now
        self.file.truncate(0)
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M')}")
        self.file.flush()

    def release(self):
        """Free the lock; the file goes first (while still held), so that no one locks a file about to vanish."""
        try:
            os.remove(self.path)
        except OSError:  # Windows removes no open file: it stays, unlocked
            pass
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_file(file):
    """Lock an open file for this process, or raise OSError at once if another holds it."""
    if os.name == "nt":
        import msvcrt
        file.seek(2**20)  # a byte far past the holder's name, which stays readable
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_temporaries(pattern):
    """Remove the files or folders matching `pattern`: a killed writer's temporaries, called by the lock's holder."""
    for path in glob.glob(pattern):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def make_toy_dataset(root, seed=0, image_size=32, images_per_class=32, kind="toy"):
    """The toy set `kind` (toy, taxa) of these settings -> its folder root/[taxa-]<size>px-seed<seed>-n<count>-
    v<version> (source/, target/), made once beside those of other settings and never deleted. Drawn into a
    temporary folder and renamed into place when complete: a kill mid-way leaves nothing a later run would read (the
    next generation removes the temporary). One process draws a set at a time (a Lock); another asking for it
    meanwhile is refused."""
    name = f"{'taxa-' * (kind == 'taxa')}{image_size}px-seed{seed}-n{images_per_class}-v{TOY_VERSION}"
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{name}.tmp")
    with Lock(tmp + ".lock", f"the toy set {folder}"):
        if os.path.isdir(folder):  # drawn by the process that held the lock just before
            return folder
        remove_temporaries(tmp)  # a killed generation's
        for split in TOY_SPLITS:
            for c, (path, s, look) in enumerate(tqdm(toy_classes(kind, split), desc=f"{kind} {split}", leave=False)):
                class_folder = os.path.join(tmp, split, *path)
                os.makedirs(class_folder, exist_ok=True)
                stream = [s, TOY_VARIANTS.index(look)] if kind == "toy" else [split == "target", c]
                for n in range(images_per_class):
                    rng = np.random.default_rng([seed, *stream, n])  # one stream per image: any image redraws alone
                    draw_toy_image(s, look, rng, image_size).save(os.path.join(class_folder, f"{n:04d}.png"))
        os.rename(tmp, folder)
    return folder
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{os.path.basename(folder)}.tmp")
    with Lock(tmp + ".lock", f"the toy set {folder}"):
        if os.path.isdir(folder):  # drawn by the process that held the lock just before
            return folder
        remove_temporaries(tmp)  # a killed generation's
        for split, classes in TOY_SPLITS.items():
            for s, v in tqdm(classes, desc=f"toy {split}", leave=False):
                class_folder = os.path.join(tmp, split, TOY_SUPERCLASSES[s][0],
                                            f"{TOY_SUPERCLASSES[s][1]}_{'abcdef'[v]}")
                os.makedirs(class_folder, exist_ok=True)
                for n in range(images_per_class):
                    rng = np.random.default_rng([seed, s, v, n])  # one stream per image: any image regenerates alone
                    draw_toy_image(s, v, rng, image_size).save(os.path.join(class_folder, f"{n:04d}.png"))
        os.rename(tmp, folder)
    return folder


# -----------------------------------------------------------------------------------------------------------
# The entry point the training script calls.

DATA_KINDS = ("inat", "vegfru", "folder", "toy", "taxa")  # what --data takes; toy and taxa are drawn, not read


def data_path_problem(kind, path):
    """Why `path` cannot hold a dataset of `kind`, or None: what can be told before any slow work."""
    drawn = kind in ("toy", "taxa")
    if drawn and path is not None and os.path.exists(path) and not os.path.isdir(path):  # (generated there)
        return f"the {kind} data path {path!r} is a file; the {kind} set is generated into a folder (made if missing)"
    if not drawn and (path is None or not os.path.isdir(path)):
        where = f"no {kind} data path given" if path is None else f"the {kind} data path {path!r} is not a folder"
        return f"{where}; " + dict(
            inat=f"expected the iNat 2021 root holding train_mini/ and train_mini.json ({INAT_SOURCE})",
            vegfru=f"expected the VegFru root holding veg200_images/, fru92_images/ and vegfru_list/ ({VEGFRU_SOURCE})",
            folder="expected a folder root/<superclass>/<class>/*.jpg").get(kind, f"unknown kind {kind!r}")
    return None


def load_dataset(kind, path, image_size, split=None, hflip=True):
    """kind in DATA_KINDS -> (ImageDataset, Hierarchy). toy, taxa: path is where to draw it (default cache/toy),
    split source/target; folder: split, when given, is a subfolder of path."""
    split = split or dict(inat="train_mini", vegfru="train", toy="source", taxa="source").get(kind)
    if problem := data_path_problem(kind, path):
        raise FileNotFoundError(problem)
    if kind in ("toy", "taxa"):
        path = path or os.path.join("cache", "toy")
        if split not in TOY_SPLITS:
            raise ValueError(f"{kind} split {split!r}: choose from {list(TOY_SPLITS)}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_rank() == 0:  # rank 0 draws the set; the other ranks wait for its files
                make_toy_dataset(path, image_size=image_size, kind=kind)
            dist.barrier()
        folder = make_toy_dataset(path, image_size=image_size, kind=kind)  # draws the set, or finds rank 0's
        return load_folder(os.path.join(folder, split), image_size, hflip, ["genus"])
    if kind == "folder":
        return load_folder(os.path.join(path, split) if split else path, image_size, hflip)
    if kind not in ("inat", "vegfru"):
        raise ValueError(f"unknown dataset kind {kind!r}: choose from {', '.join(DATA_KINDS)}")
    return (load_inat if kind == "inat" else load_vegfru)(path, split, image_size, hflip)


# -----------------------------------------------------------------------------------------------------------
# The latent cache. cache_dir/latents.npy (len, 2, C, h, w): for every dataset index, the VAE posterior's (mean, std)
# ALREADY MULTIPLIED BY vae.scaling_factor, so z = mean + std * randn is directly what the diffusion model sees;
# float16 by default (half the disk: about 16 GB for iNat mini at 256 px; a relative rounding of 5e-4, far below the
# posterior's own noise). labels.npy holds the labels; meta.json what the cache was built from (a cache that no longer
# matches is refused) and the unreadable images, skipped: their rows are left out. Several ranks: rank 0 preallocates
# the files, every rank encodes images rank, rank + W, ... into their rows, rank 0 writes meta.json last ("complete").

def fingerprint(tensors):
    """The one fingerprint of this project (a base model, a VAE, a dataset's files): the sha256 of every tensor or
    array of {name: tensor}, its name, shape, dtype and bytes, streamed (a few seconds for DiT-XL/2)."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu().contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
        else:
            tensor = data = np.ascontiguousarray(tensor)  # hashed through the buffer protocol: its raw bytes
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def read_images(dataset, indices=None, batch_size=64, num_workers=4, rank=0):
    """Decode images (all, or `indices`) in DataLoader workers. Yields (indices (B,), pixels (B, H, W, 3) uint8)
    of the readable ones; the others go to dataset.skipped (file -> reason)."""
    indices = np.arange(len(dataset.files)) if indices is None else indices
    loader = DataLoader(indices, batch_size, num_workers=num_workers, collate_fn=dataset.read_batch)
    for good, pixels, bad in tqdm(loader, desc="reading images", disable=rank != 0, dynamic_ncols=True):
        for j, reason in bad.items():
            dataset.skip(j, reason)
        if good:
            yield np.array(good), torch.stack(pixels)


def cache_folder_problem(cache_dir):
    """Why cache_dir cannot take a latent cache, or None. A cache is written into a new folder, an empty one, or its
    own: one that holds other files (a mistyped data path, say) is refused, so nothing of the user's is written over."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        return f"{cache_dir} is a file, not a folder for a latent cache: give a new or empty folder"
    if set(os.listdir(cache_dir) if os.path.isdir(cache_dir) else []) - {"meta.json", LOCK_FILE} and not \
            os.path.isfile(os.path.join(cache_dir, "meta.json")):
        return f"{cache_dir} holds other files and no latent cache (no meta.json): give a new or empty folder for it"
    return None


@torch.no_grad()
def build_latent_cache(dataset, vae, cache_dir, rank=0, world_size=1, batch_size=32, num_workers=4, dtype="float16"):
    """Encode `dataset` (an ImageDataset) once into cache_dir, or reuse a matching cache -> LatentDataset.
    Every rank calls this (torch.distributed initialized when world_size > 1)."""
    meta_path, latents_path = os.path.join(cache_dir, "meta.json"), os.path.join(cache_dir, "latents.npy")
    wanted = dict(format=2, files=dataset.fingerprint(),
                  num_images=len(dataset.files), image_size=dataset.image_size, hflip=dataset.hflip,
                  vae=fingerprint(vae.state_dict()), scaling_factor=float(vae.scaling_factor),
                  dtype=np.dtype(dtype).name)
    # rank 0 decides, holding the cache's lock: "ready" (reuse), "build", or why the cache is refused
    state, lock = (cache_folder_problem(cache_dir) or "build") if rank == 0 else None, None
    if state == "build":
        os.makedirs(cache_dir, exist_ok=True)
        try:
            lock = Lock(os.path.join(cache_dir, LOCK_FILE), f"the latent cache {cache_dir}")
        except ValueError as busy:  # being built by another process
            state = str(busy)
    if state == "build" and os.path.isfile(meta_path):
        found = read_json(meta_path)
        differs = [k for k in wanted if found.get(k) != wanted[k]]
        if found.get("complete"):  # (an interrupted build is built again)
            state = "ready" if not differs else (
                f"latent cache {cache_dir} is stale: it was built from a different {', '.join(differs)} "
                f"({', '.join(f'{k}: {found.get(k)!r} there, {wanted[k]!r} now' for k in differs)}). "
                f"Delete {cache_dir} to rebuild it, or give another cache folder.")
    if world_size > 1:
        dist.broadcast_object_list(box := [state])
        state = box[0]
    if lock and state != "build":
        lock.release()
    if state not in ("ready", "build"):
        raise ValueError(state)
    if state == "ready":
        return LatentDataset(cache_dir)

    device = next(vae.parameters()).device
    flips = 2 if dataset.hflip else 1
    if rank == 0:
        size = dataset.image_size
        latent_shape = tuple(vae.encode(torch.zeros(1, 3, size, size, device=device)).mean.shape[1:])  # (C, h, w)
        with open(meta_path, "w") as f:
            json.dump(dict(wanted, complete=False), f)
        np.lib.format.open_memmap(latents_path, mode="w+", dtype=dtype, shape=(len(dataset), 2) + latent_shape).flush()
        np.save(os.path.join(cache_dir, "labels.npy"), np.repeat(dataset.labels, flips))
    if world_size > 1:
        dist.barrier()
    latents = np.load(latents_path, mmap_mode="r+")
    dataset.skipped = {}
    my_images = np.arange(rank, len(dataset.files), world_size)
    for images, pixels in read_images(dataset, my_images, batch_size, num_workers, rank):
        x = to_tensor(pixels)  # (B, 3, H, W)
        if flips == 2:  # rows 2j, 2j + 1: image j, then mirrored, as the dataset indexes them
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        posterior = vae.encode(x.to(device))
        moments = torch.stack([posterior.mean, posterior.std], dim=1) * vae.scaling_factor  # (B*flips, 2, C, h, w)
        rows = (images[:, None] * flips + np.arange(flips)).reshape(-1)
        latents[rows] = moments.float().cpu().numpy().astype(dtype)
    latents.flush()
    del latents
    skipped = [dataset.skipped] * world_size  # {file: why} of each rank
    if world_size > 1:
        dist.all_gather_object(skipped, dataset.skipped)
    if rank == 0:
        index_of = {str(f): j for j, f in enumerate(dataset.files)}
        report = sorted((index_of[f], f, why) for s in skipped for f, why in s.items())
        with open(meta_path, "w") as f:
            json.dump(dict(wanted, complete=True, skipped=[dict(index=j, file=f, reason=why) for j, f, why in report]),
                      f, indent=1)
        if report:
            print(f"latent cache: skipped {len(report)} unreadable images (listed in {meta_path}): "
                  + "; ".join(f"{f} ({why})" for _, f, why in report[:5]), file=sys.stderr)
        lock.release()
    if world_size > 1:
        dist.barrier()
    return LatentDataset(cache_dir)


class LatentDataset(Dataset):
    """Items ((mean, std) each (C, h, w) float32, already scaled by the VAE's scaling_factor, fine label) from a
    cache written by build_latent_cache; sample the posterior with z = mean + std * torch.randn_like(std)."""

    def __init__(self, cache_dir):
        self.meta = read_json(os.path.join(cache_dir, "meta.json"))
        if not self.meta.get("complete"):
            raise ValueError(f"latent cache {cache_dir} is incomplete (its build was interrupted): "
                             "delete it and rebuild")
        self.path = os.path.join(cache_dir, "latents.npy")
        self.latent_shape = tuple(np.load(self.path, mmap_mode="r").shape[2:])  # (C, h, w) the model sees
        self.labels = np.load(os.path.join(cache_dir, "labels.npy"))
        flips = 2 if self.meta["hflip"] else 1
        bad_rows = [s["index"] * flips + f for s in self.meta["skipped"] for f in range(flips)]
        self.rows = np.setdiff1d(np.arange(len(self.labels)), bad_rows)  # dataset index -> row of latents.npy
        self.latents = None  # opened on first use, in each DataLoader worker

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # workers reopen the memmap rather than receive a pickled copy of it
        return dict(self.__dict__, latents=None)

    def __getitem__(self, i):
        if self.latents is None:
            self.latents = np.load(self.path, mmap_mode="r")
        row = self.rows[i]
        moments = torch.from_numpy(self.latents[row].astype(np.float32))  # (2, C, h, w)
        return (moments[0], moments[1]), int(self.labels[row])


def model_input(batch, vae, device):
    """A batch as the DiT sees it: cached posterior moments are sampled afresh (z = mean + std * eps), images are
    encoded by the VAE and scaled, pixels pass as they are."""
    if isinstance(batch, (list, tuple)):
        mean, std = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return mean + std * torch.randn_like(std)
    x = batch.to(device, non_blocking=True)
    return vae.encode(x).sample() * vae.scaling_factor if vae is not None else x
