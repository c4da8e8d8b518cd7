"""Datasets with their label hierarchy (fine classes in superclasses), the ADM crop, a latent cache.

load_dataset(kind, path, image_size, split) -> (ImageDataset, Hierarchy), kind one of
    inat    iNaturalist 2021: path/train_mini/NNNNN_Kingdom_..._Genus_epithet/*.jpg, train_mini.json
    vegfru  VegFru: path/{veg200,fru92}_images/<class>/*.jpg, path/vegfru_list/vegfru_<split>.txt
    folder  path/<superclass>/<class>/*.jpg, or deeper (path/<superclass>/<group>/<class>/)
    toy     drawn with pillow from a seed (path/source, path/target); taxa: the same, three ranks
Item i is (image i // 2 (3, H, W) in [-1, 1], mirrored if i is odd; fine label): no random flips.
"""
import colorsys
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoint import LOCK_FILE, Lock, fingerprint, read_json, remove_temporaries

INAT_SOURCE = "get iNaturalist 2021 from https://github.com/visipedia/inat_comp/tree/master/2021"
VEGFRU_SOURCE = "get VegFru from https://github.com/ustc-vim/vegfru"


# -------------------------------------------------------------------------------------------------
# The label hierarchy, stored in checkpoints as lists of str and int (weights_only loads it).

def name_key(name):
    """Names compare case-insensitively, '_' as a space ('danaus_plexippus': 'Danaus plexippus')."""
    return " ".join(str(name).replace("_", " ").split()).lower()


class Hierarchy:
    """Fine classes in superclasses, and `levels`: the ranks between them, finest first."""
    def __init__(self, class_names, superclass_names, class_to_superclass, common_names=None,
                 levels=()):
        self.class_names = [str(n) for n in class_names]
        self.superclass_names = [str(n) for n in superclass_names]
        self.class_to_superclass = [int(s) for s in class_to_superclass]
        self.common_names = ([str(n) for n in common_names] if common_names is not None
                             else [""] * len(class_names))
        self.levels = [dict(name=str(lv["name"]), group_names=[str(n) for n in lv["group_names"]],
                            class_to_group=[int(g) for g in lv["class_to_group"]]) for lv in levels]
        count, ranks = len(self.class_names), self.ranks()
        if len(self.common_names) != count:
            raise ValueError(f"hierarchy: {len(self.common_names)} common names, {count} classes")
        for name, groups, of_class in ranks[1:]:
            bad = [i for i, g in enumerate(of_class) if not 0 <= g < len(groups)]
            if bad or len(of_class) != count:
                raise ValueError(f"hierarchy: {len(of_class)} {name} ids for {count} classes; "
                                 f"{bad[:5]} point at no {name} (valid: 0..{len(groups) - 1})")
        for (finer, _, fine_of), (coarser, _, coarse_of) in zip(ranks[1:], ranks[2:]):
            if len(set(zip(fine_of, coarse_of))) != len(set(fine_of)):
                raise ValueError(f"hierarchy: a {finer} lies in two different {coarser} groups")
        self._index = {}  # name key -> class ids
        for i, names in enumerate(zip(self.class_names, self.common_names)):
            for key in {name_key(n) for n in names if n}:
                self._index.setdefault(key, []).append(i)

    def ranks(self):
        """[(rank, names, the rank's id of each class)], from the fine classes to superclasses."""
        return ([("fine", self.class_names, list(range(len(self.class_names))))]
                + [(lv["name"], lv["group_names"], lv["class_to_group"]) for lv in self.levels]
                + [("superclass", self.superclass_names, self.class_to_superclass)])

    def to_dict(self):
        return dict(class_names=self.class_names, superclass_names=self.superclass_names,
                    class_to_superclass=self.class_to_superclass, common_names=self.common_names,
                    **{"levels": self.levels} if self.levels else {})

    @classmethod
    def from_dict(cls, d):
        keys = ["class_names", "superclass_names", "class_to_superclass"]
        if not (isinstance(d, dict) and all(k in d for k in keys)):
            raise ValueError(f"not a class hierarchy: a dict of {keys} (a checkpoint's or iNat's)")
        return cls(*(d[k] for k in keys), d.get("common_names"), d.get("levels", ()))

    def to_json(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path):
        """Our own JSON, or an iNat 2021 annotation file (train_mini.json: its categories)."""
        d = read_json(path)
        if isinstance(d, dict) and "categories" in d:
            check_inat_json(d, path, ["categories"])
            return inat_hierarchy(d["categories"])
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def lookup(self, query):
        """A fine class id from an id (412, "412") or a name, scientific or common, in any case."""
        text, count = str(query).strip(), len(self.class_names)
        if re.fullmatch(r"-?\d+", text):
            if not 0 <= int(text) < count:
                raise ValueError(f"class id {int(text)} out of range: valid ids are 0..{count - 1}")
            return int(text)
        key = name_key(text)
        ids = self._index.get(key, [])
        if len(ids) == 1:
            return ids[0]
        what = "names" if ids else "is a superclass of"
        ids = ids or [i for i, s in enumerate(self.class_to_superclass)
                      if name_key(self.superclass_names[s]) == key]
        if ids:
            raise ValueError(f"{text!r} {what} {len(ids)} classes: give one of them: "
                             + ", ".join(map(self.describe, ids[:10])) + ", ..." * (len(ids) > 10))
        close = difflib.get_close_matches(key, list(self._index), n=5, cutoff=0.6)
        close_ids = dict.fromkeys(i for k in close for i in self._index[k])
        hint = "; closest: " + ", ".join(map(self.describe, close_ids)) if close_ids else ""
        raise ValueError(f"no class named {text!r}{hint}")

    def describe(self, i):
        """Class i as messages name it: '412 Danaus plexippus (Monarch)'."""
        common = self.common_names[i]
        return f"{i} {self.class_names[i]}" + (f" ({common})" if common else "")

    def listing(self, text=""):
        """Lines "id name (common name) [superclass]" of the classes whose names contain `text`."""
        lines = [f"{self.describe(i)} [{self.superclass_names[s]}]"
                 for i, s in enumerate(self.class_to_superclass)]
        return [line for line in lines if name_key(text) in name_key(line.split(" ", 1)[1])]


def rank_level(name, lineages):
    """A level from each class's lineage: a group is its whole lineage (Morus: two genera)."""
    groups = {g: i for i, g in enumerate(sorted(set(lineages)))}
    return dict(name=name, group_names=[g[-1] for g in groups],
                class_to_group=[groups[g] for g in lineages])


# -------------------------------------------------------------------------------------------------
# The ADM centre crop (guided-diffusion's image_datasets.py, as DiT's train.py); tensors; grids.

def center_crop(image, size):
    """PIL image -> (size, size, 3) uint8: box-halved while >= 2x, bicubic, the centre cropped."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    pixels = np.array(image.resize(tuple(round(s * scale) for s in image.size), Image.BICUBIC))
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def to_tensor(pixels):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1] (ToTensor, Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float()
    return (x / 255 - 0.5) / 0.5


def to_pixels(x, vae=None):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy; with a VAE, x are scaled latents."""
    if vae is not None:
        x = vae.decode(x / vae.scaling_factor)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, cols=None, row_names=None, titles=None):
    """(N, H, W, 3) uint8 -> a PNG, `cols` a row, titles heading equal column groups -> corners."""
    n, h, w, _ = images.shape
    zoom = max(1, math.ceil(48 / h)) if row_names or titles else 1
    h, w = h * zoom, w * zoom
    cols = cols or math.ceil(math.sqrt(n))
    rows, groups, pad = math.ceil(n / cols), len(titles or [None]), 2
    font = ImageFont.load_default(size=max(12, min(24, h // 4)))
    left = round(max(map(font.getlength, row_names), default=0) + 4 * pad) if row_names else 0
    top = font.size + 4 * pad if titles else 0
    gap = w // 2 if groups > 1 else 0
    corners = [(left + pad + c * (w + pad) + c * groups // cols * gap, top + pad + r * (h + pad))
               for r, c in (divmod(i, cols) for i in range(n))]
    size = (left + pad + cols * (w + pad) + (groups - 1) * gap, top + pad + rows * (h + pad))
    canvas = Image.new("RGB", size, "white")
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


# -------------------------------------------------------------------------------------------------
# The image dataset. An unreadable image is reported once and replaced by the next readable one.

class ImageDataset(Dataset):
    """Images [(file under root, fine label)], each read with the ADM crop."""
    def __init__(self, root, images, image_size, hflip=True):
        self.root, self.image_size, self.hflip = root, image_size, hflip
        # numpy arrays, not lists of str: DataLoader workers share them without copy-on-access
        self.files = np.asarray([f for f, _ in images], dtype=str)
        self.labels = np.asarray([label for _, label in images], dtype=np.int64)
        self.skipped = {}  # file -> why it could not be read, in this process
        self.reported = tempfile.mkdtemp(prefix="finediffusion-reported-")  # shared by workers
        weakref.finalize(self, shutil.rmtree, self.reported, ignore_errors=True)

    def __len__(self):
        return len(self.files) * (2 if self.hflip else 1)

    def fingerprint(self):
        """Of its files and labels: what a latent cache or a judge was made from."""
        return fingerprint(dict(files=self.files, labels=self.labels))

    def read(self, j):
        """Image j -> (H, W, 3) uint8 after the centre crop (one upscaled over 2x is reported)."""
        with Image.open(os.path.join(self.root, self.files[j])) as image:
            if 2 * min(image.size) < self.image_size:
                self.report(j, f"{image.size[0]}x{image.size[1]} px, upscaled more than 2x to "
                               f"{self.image_size}")
            return center_crop(image, self.image_size)

    def try_read(self, j):
        """Image j -> (pixels, None), or (None, why): a bad file must not end a run hours in."""
        try:
            return self.read(j), None
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"

    def read_batch(self, indices):  # read_images' collate_fn, run in a DataLoader worker
        return [(j, *self.try_read(j)) for j in map(int, indices)]

    def __getitem__(self, i):
        j, flip = divmod(i, 2) if self.hflip else (i, 0)
        for k in (j + np.arange(len(self.files))) % len(self.files):  # j, else the next readable
            pixels, why = self.try_read(k)
            if why is None:
                return to_tensor(pixels[:, ::-1] if flip else pixels), int(self.labels[k])
            self.skip(k, why)
        raise ValueError(f"no image under {self.root} can be read: give images pillow reads")

    def skip(self, j, reason):
        self.skipped[str(self.files[j])] = reason
        self.report(j, f"unreadable, skipped ({reason})")

    def report(self, j, problem):
        """Say once, not once per worker and epoch: the process that makes j's marker says it."""
        marker = os.path.join(self.reported, hashlib.sha1(str(self.files[j]).encode()).hexdigest())
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except OSError:  # said already (or the markers are gone with the dataset)
            return
        print(f"data: {os.path.join(self.root, self.files[j])}: {problem}", file=sys.stderr)


def list_images(folder):
    extensions = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(extensions))


def subfolders(folder):
    return sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))


# -------------------------------------------------------------------------------------------------
# Folders: root/<superclass>/[<group>/...]<class>/*.jpg. Class ids follow the sorted paths.

def load_folder(root, image_size, hflip=True, rank_names=None):
    """Every class at one depth, the folders between ranks; empty folders left out, said once."""
    paths, found = [(name,) for name in subfolders(root)], []
    while paths and not any(images for _, images in found):  # one level deeper, till images
        paths = [p + (n,) for p in paths for n in subfolders(os.path.join(root, *p))]
        found = [(path, list_images(os.path.join(root, *path))) for path in paths]
    if not (classes := [(path, images) for path, images in found if images]):
        raise FileNotFoundError(f"no images in {root}: expected {root}/<superclass>/<class>/*.jpg")
    superclass_names = list(dict.fromkeys(path[0] for path, _ in classes))  # sorted, as subfolders
    empty = [os.path.join(*path) for path, images in found if not images]
    if (dropped := sorted(set(subfolders(root)) - set(superclass_names))) or empty:
        print(f"data: {root}: left out {len(empty)} class folders without images {empty[:5]} and "
              f"{len(dropped)} superclasses without classes {dropped[:5]}", file=sys.stderr)
    depth = len(classes[0][0])
    rank_names = rank_names or [f"group {k}" if depth > 3 else "group" for k in range(1, depth - 1)]
    levels = [rank_level(name, [path[:k + 1] for path, _ in classes])  # finest rank first
              for k, name in zip(range(depth - 2, 0, -1), rank_names[::-1])]
    images = [(os.path.join(*path, f), y) for y, (path, names) in enumerate(classes) for f in names]
    hierarchy = Hierarchy([path[-1] for path, _ in classes], superclass_names,
                          [superclass_names.index(path[0]) for path, _ in classes], levels=levels)
    return ImageDataset(root, images, image_size, hflip), hierarchy


# -------------------------------------------------------------------------------------------------
# iNaturalist 2021: the JSON (COCO-style) is authoritative; without it, the folder names give both.

INAT_JSON_KEYS = dict(images=("id", "file_name"), annotations=("image_id", "category_id"),
                      categories=("id", "name", "supercategory"))
INAT_SUPERCLASS_OF_CLASS = {
    "Insecta": "Insects", "Aves": "Birds", "Reptilia": "Reptiles", "Mammalia": "Mammals",
    "Actinopterygii": "Ray-finned Fishes", "Amphibia": "Amphibians", "Arachnida": "Arachnids"}
INAT_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")  # the JSON's keys
INAT_FOLDER = "NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet"


def inat_category(dir_name):
    """'00412_Animalia_..._Danaus_plexippus' -> its category as iNat's JSON has it, or None."""
    parts = dir_name.split("_", 7)
    if len(parts) != 8 or not parts[0].isdigit():
        return None
    number, kingdom, phylum, taxon_class, _, _, genus, epithet = parts
    superclass = ({"Plantae": "Plants"}.get(kingdom, kingdom) if kingdom != "Animalia"  # Fungi
                  else "Mollusks" if phylum == "Mollusca"
                  else INAT_SUPERCLASS_OF_CLASS.get(taxon_class, "Animalia"))
    return dict(id=int(number), name=f"{genus} {epithet}", supercategory=superclass,
                image_dir_name=dir_name, **dict(zip(INAT_RANKS, parts[1:7])))


def check_inat_json(meta, path, parts=tuple(INAT_JSON_KEYS)):
    """iNat's JSON has `parts`: lists of entries with the keys of INAT_JSON_KEYS."""
    for part in parts:
        entries = meta.get(part) if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: not iNat's JSON, which has a list {part!r} ({INAT_SOURCE})")
        keys = INAT_JSON_KEYS[part]
        if lacking := [e for e in entries if not (isinstance(e, dict) and set(keys) <= set(e))]:
            raise ValueError(f"{path}: every entry of {part!r} needs the keys {list(keys)}; one is "
                             f"{str(lacking[0])[:100]} ({INAT_SOURCE})")


def inat_hierarchy(categories):
    """Categories in id order, superclasses by name, the ranks that every category names."""
    categories = sorted(categories, key=lambda c: c["id"])
    superclass_names = sorted({c["supercategory"] for c in categories})
    levels = []
    for k in range(len(INAT_RANKS) - 1, 1, -1):  # genus, family, order, class: finest first
        ranks = INAT_RANKS[:k + 1]
        if all(r in c for c in categories for r in ranks):
            lineages = [(c["supercategory"], *(str(c[r]) for r in ranks)) for c in categories]
            levels.append(rank_level(INAT_RANKS[k], lineages))
    return Hierarchy([c["name"] for c in categories], superclass_names,
                     [superclass_names.index(c["supercategory"]) for c in categories],
                     [c.get("common_name", "") for c in categories], levels)


def load_inat(root, split, image_size, hflip=True):
    """root/split/ and root/split.json (either may be missing) -> (ImageDataset, Hierarchy)."""
    folder, json_path = os.path.join(root, split), os.path.join(root, f"{split}.json")
    on_disk = subfolders(folder) if os.path.isdir(folder) else None
    if not os.path.isfile(json_path):  # folders only: the categories their names give
        if on_disk is None:
            raise FileNotFoundError(f"neither {folder}/ nor {json_path} exists: {INAT_SOURCE}")
        bad = [d for d in on_disk if inat_category(d) is None]
        if bad or not on_disk:
            raise ValueError(f"{folder}: class folders must be named {INAT_FOLDER}, found "
                             f"{bad[:3] or 'none'}; {INAT_SOURCE}")
        categories = sorted(map(inat_category, on_disk), key=lambda c: c["id"])
        images = [(os.path.join(split, c["image_dir_name"], f), label)
                  for label, c in enumerate(categories)
                  for f in list_images(os.path.join(folder, c["image_dir_name"]))]
        return ImageDataset(root, images, image_size, hflip), inat_hierarchy(categories)

    meta = read_json(json_path)
    if isinstance(meta, dict) and "annotations" not in meta:
        raise ValueError(f"{json_path}: no annotations (test split): use train_mini, train or val")
    check_inat_json(meta, json_path)
    categories = sorted(meta["categories"], key=lambda c: c["id"])
    dir_names = [c.get("image_dir_name", "") for c in categories]
    if on_disk is not None and set(on_disk) != set(dir_names):
        extra, absent = sorted(set(on_disk) - set(dir_names)), sorted(set(dir_names) - set(on_disk))
        raise ValueError(f"{folder} and {json_path} disagree: folders not in the JSON {extra[:2]}, "
                         f"JSON classes without a folder {absent[:2]}; use files of one release")
    if mismatches := [f"{d}: JSON {c['supercategory']!r}, folder taxonomy {t['supercategory']!r}"
                      for d, c in zip(dir_names, categories)
                      if (t := inat_category(d)) and t["supercategory"] != c["supercategory"]]:
        warnings.warn(f"{len(mismatches)} classes in {json_path} have a supercategory other than "
                      f"their folder names give (using the JSON's): " + "; ".join(mismatches[:5]))
    label_of_category = {c["id"]: i for i, c in enumerate(categories)}
    category_of_image = {a["image_id"]: a["category_id"] for a in meta["annotations"]}
    unknown = sorted(set(category_of_image.values()) - set(label_of_category), key=str)
    unlabelled = [im["id"] for im in meta["images"] if im["id"] not in category_of_image]
    problems = [f"annotations name {len(unknown)} categories it does not define {unknown[:3]}",
                f"{len(unlabelled)} images have no annotation {unlabelled[:3]}"]
    if problems := [p for p, bad in zip(problems, (unknown, unlabelled)) if bad]:
        raise ValueError(f"{json_path} is inconsistent: " + "; ".join(problems)
                         + f": use the JSON of the release as distributed ({INAT_SOURCE})")
    names = [im["file_name"] for im in meta["images"]]
    prefix = "" if names and names[0].startswith(split + "/") else split  # the release: with it
    images = [(os.path.join(prefix, f), label_of_category[category_of_image[im["id"]]])
              for f, im in zip(names, meta["images"])]
    return ImageDataset(root, images, image_size, hflip), inat_hierarchy(categories)


# -------------------------------------------------------------------------------------------------
# VegFru: vegfru_list/vegfru_<split>.txt lines '<image path> <label 0..291>', supvegfru_* ids 0..24.

VEGFRU_FILE = re.compile(r"([vf])_(\d+)_\d+_\d+\.\w+$")  # v_SS_CC_NNNN.jpg: superclass SS


def load_vegfru(root, split, image_size, hflip=True):
    """VegFru's split train, val, test or trainval -> (ImageDataset, Hierarchy)."""
    lists = os.path.join(root, "vegfru_list")
    parts = ["train", "val"] if split == "trainval" else [split]
    paths = [os.path.join(lists, f"vegfru_{p}.txt") for p in parts]
    if not all(map(os.path.isfile, paths)):
        raise FileNotFoundError(f"no VegFru split {split!r}: missing {paths}; {VEGFRU_SOURCE}")

    def read_lists(prefix, splits):  # {split: [(image path, id)]} of the lists present
        files = {p: Path(lists, f"{prefix}_{p}.txt") for p in splits}
        return {p: [(path, int(i)) for path, i in (line.split() for line in
                                                   f.read_text().splitlines() if line.strip())]
                for p, f in files.items() if f.is_file()}

    all_lists = read_lists("vegfru", ("train", "val", "test"))  # all: one table for every split
    sup_lists = read_lists("supvegfru", all_lists)
    class_of_label, group_of_label, sup_of_label = {}, {}, {}
    for p, entries in all_lists.items():
        sup_of_path = dict(sup_lists.get(p, []))
        for path, label in entries:
            name, match = path.split("/")[1], VEGFRU_FILE.search(path)
            group = f"{'veg' if match[1] == 'v' else 'fru'}_{match[2]}" if match else None
            sup = [(sup_of_label, sup_of_path.get(path))] if sup_of_path else []
            for table, value in [(class_of_label, name), (group_of_label, group)] + sup:
                if table.setdefault(label, value) != value:
                    raise ValueError(f"{lists}: label {label} appears with {table[label]!r} and "
                                     f"{value!r} ({path})")
    if sorted(class_of_label) != list(range(count := len(class_of_label))):
        raise ValueError(f"{lists}: labels must be 0..{count - 1}")
    groups = [group_of_label[i] for i in range(count)]  # 'veg_01', ...; None: another name
    if sup_lists:  # superclass ids from the lists, named by the file-name code they carry
        superclass_of = [sup_of_label[i] for i in range(count)]
        if (ids := sorted(set(superclass_of))) != list(range(len(ids))):
            raise ValueError(f"{lists}: supvegfru_*.txt superclass ids must be 0..{len(ids) - 1}")
        codes = [{g for g, t in zip(groups, superclass_of) if t == s} for s in ids]
        names = [c.pop() if len(c) == 1 else None for c in codes]
        if None not in groups and (None in names or len(set(names)) != len(names)):
            raise ValueError(f"{lists}: supvegfru_*.txt ids and v_SS/f_SS names are not one to one")
        superclass_names = [name or f"superclass {s}" for s, name in enumerate(names)]
    elif None in groups:
        raise ValueError(f"{lists}: no supvegfru_*.txt, no v_SS_CC_NNNN.jpg names: no superclasses")
    else:  # from the file names: vegetable groups, then fruit groups
        superclass_names = sorted(set(groups), key=lambda g: (g[:3] != "veg", g))
        superclass_of = [superclass_names.index(g) for g in groups]
    return (ImageDataset(root, [e for p in parts for e in all_lists[p]], image_size, hflip),
            Hierarchy([class_of_label[i] for i in range(count)], superclass_names, superclass_of))


# -------------------------------------------------------------------------------------------------
# The toy sets, drawn from a seed: superclasses differ at a glance (shape, colour, background), fine
# classes subtly (hue shift, stripes, corner marks); 'target' has new fine classes in the source's
# superclasses and in one new superclass. toy: 12 source and 10 target classes, two ranks (toy.py's
# quick first run); taxa: superclass / genus (stripes) / species (hue shift, marks), 96 source and
# 120 target species, each target species a new combination of the source's attributes.

TOY_VERSION = 1
TOY_SUPERCLASSES = [  # name, shape, hue, background
    ("discs", "disc", 0.00, "gradient"), ("squares", "square", 0.33, "stripes"),
    ("triangles", "triangle", 0.60, "checker"), ("diamonds", "diamond", 0.13, "dots"),
    ("crosses", "cross", 0.80, "diagonal")]
# fine classes in a superclass: (hue shift, stripes, corners holding a mark: 0 1 top, 2 3 bottom)
TOY_VARIANTS = [(0.00, 1, (0,)), (0.06, 1, (1,)), (0.00, 2, (2,)), (0.06, 2, (3,)),
                (0.03, 3, (0,)), (0.03, 3, (3,))]
TOY_SPLITS = {"source": [(s, v) for s in range(3) for v in range(4)],
              "target": [(s, v) for s in range(3) for v in (4, 5)] + [(3, v) for v in range(4)]}
TAXA_STRIPES = ("plain", "1stripe", "2stripes", "3stripes")  # the genera of each superclass
TAXA_MARKS = {"nomark": (), "top": (0, 1), "bottom": (2, 3), "corners": (0, 1, 2, 3)}  # mirrored
TAXA_HUE_SHIFTS = (0.0, 0.05, 0.10)


def toy_classes(kind, split):
    """[(folder path (superclass, ..., class), superclass, look)] of toy set `kind` in `split`."""
    if kind == "toy":
        return [((TOY_SUPERCLASSES[s][0], f"{TOY_SUPERCLASSES[s][1]}_{'abcdef'[v]}"), s,
                 TOY_VARIANTS[v]) for s, v in TOY_SPLITS[split]]
    return [((superclass, f"{shape}-{genus}", f"{shape}-{genus}-{mark}-hue{h}"), s,
             (hue_shift, stripes, corners))
            for s, (superclass, shape, *_) in enumerate(TOY_SUPERCLASSES[:5 - (split == "source")])
            for stripes, genus in enumerate(TAXA_STRIPES)
            for m, (mark, corners) in enumerate(TAXA_MARKS.items())
            for h, hue_shift in enumerate(TAXA_HUE_SHIFTS)
            if (m + h + stripes) % 2 == (split == "target")]  # complementary combinations


def toy_superclass_color(name):
    """The colour of a toy superclass's objects as RGB 0..255 (for figures), or None."""
    if (hue := {s: h for s, _, h, _ in TOY_SUPERCLASSES}.get(name)) is not None:
        return tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.8, 0.85))


def draw_toy_image(superclass, look, rng, size):
    """A picture of a superclass with `look` (hue shift, stripes, marks): drawn 4x, box-filtered."""
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
    canvas = Image.fromarray((base * (0.75 + 0.35 * pattern[..., None])).clip(0, 255)
                             .astype(np.uint8))
    (cx, cy), r = S * (0.5 + rng.uniform(-0.08, 0.08, 2)), S * rng.uniform(0.24, 0.3)
    mask = Image.new("L", (S, S))
    draw = ImageDraw.Draw(mask)
    box, w = [cx - r, cy - r, cx + r, cy + r], r / 2.5
    plus = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
            (-r, w), (-r, -w), (-w, -w)]  # a plus sign, arms 2w wide
    outline, points = {
        "disc": (draw.ellipse, box), "square": (draw.rectangle, box),
        "triangle": (draw.polygon, [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]),
        "diamond": (draw.polygon, [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]),
        "cross": (draw.polygon, [(cx + a, cy + b) for a, b in plus])}[shape]
    outline(points, fill=255)
    color = np.array(colorsys.hsv_to_rgb((hue + hue_shift) % 1, 0.8, rng.uniform(0.8, 0.95))) * 255
    layer = Image.new("RGB", (S, S), tuple(int(c) for c in color))
    band, dark = 2 * r / (2 * stripes + 1), tuple(int(c * 0.45) for c in color)
    for k in range(stripes):  # dark bands at 1, 3, 5... band heights down the object
        top = cy - r + (2 * k + 1) * band
        ImageDraw.Draw(layer).rectangle([0, top, S, top + band], fill=dark)
    canvas.paste(layer, mask=mask)
    m, far = S // 16, S - 3 * S // 16
    for corner in corners:  # the marks: tiny white squares in corners
        x0, y0 = m + (corner % 2) * far, m + (corner // 2) * far
        ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + m, y0 + m], fill=(255, 255, 255))
    pixels = np.asarray(canvas.resize((size, size), resample=Image.BOX)).astype(np.float64)
    noisy = pixels + rng.normal(0, 3, pixels.shape)
    return Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8))


def make_toy_dataset(root, seed=0, image_size=32, images_per_class=32, kind="toy"):
    """Toy set `kind` -> its folder, drawn once under a Lock into a temporary folder renamed."""
    name = (f"{'taxa-' * (kind == 'taxa')}{image_size}px-seed{seed}-n{images_per_class}"
            f"-v{TOY_VERSION}")
    folder, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    if os.path.isdir(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    with Lock(tmp + ".lock", f"the toy set {folder}"):
        if os.path.isdir(folder):  # drawn by the process that held the lock just before
            return folder
        remove_temporaries(tmp)  # a killed generation's
        for split in TOY_SPLITS:
            classes = tqdm(toy_classes(kind, split), desc=f"{kind} {split}", leave=False)
            for c, (path, s, look) in enumerate(classes):
                os.makedirs(class_folder := os.path.join(tmp, split, *path), exist_ok=True)
                stream = [s, TOY_VARIANTS.index(look)] if kind == "toy" else [split == "target", c]
                for n in range(images_per_class):
                    rng = np.random.default_rng([seed, *stream, n])  # an image redraws alone
                    image = draw_toy_image(s, look, rng, image_size)
                    image.save(os.path.join(class_folder, f"{n:04d}.png"))
        os.rename(tmp, folder)
    return folder


# -------------------------------------------------------------------------------------------------
# The entry point the training script calls.

DATA_KINDS = ("inat", "vegfru", "folder", "toy", "taxa")  # --data; toy and taxa are drawn
DATA_PATH_HELP = dict(
    inat=f"expected the iNat 2021 root holding train_mini/ and train_mini.json ({INAT_SOURCE})",
    vegfru=f"expected VegFru's root: veg200_images/, fru92_images/, vegfru_list/ ({VEGFRU_SOURCE})",
    folder="expected a folder root/<superclass>/<class>/*.jpg")


def data_path_problem(kind, path):
    """Why `path` cannot hold a dataset of `kind`, or None: told before any slow work."""
    if kind in ("toy", "taxa"):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            return f"the {kind} path {path!r} is a file; the {kind} set is generated into a folder"
    elif path is None:
        return f"no {kind} data path given; {DATA_PATH_HELP[kind]}"
    elif not os.path.isdir(path):
        return f"the {kind} data path {path!r} is not a folder; {DATA_PATH_HELP[kind]}"


def load_dataset(kind, path, image_size, split=None, hflip=True):
    """kind in DATA_KINDS. toy, taxa: drawn into path (or cache/toy); folder: split, a subfolder."""
    split = split or dict(inat="train_mini", vegfru="train", toy="source", taxa="source").get(kind)
    if problem := data_path_problem(kind, path):
        raise FileNotFoundError(problem)
    if kind == "folder":
        return load_folder(os.path.join(path, split) if split else path, image_size, hflip)
    if kind in ("inat", "vegfru"):
        return (load_inat if kind == "inat" else load_vegfru)(path, split, image_size, hflip)
    path = path or os.path.join("cache", "toy")
    if split not in TOY_SPLITS:
        raise ValueError(f"{kind} split {split!r}: choose from {list(TOY_SPLITS)}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:  # rank 0 draws the set; the other ranks wait for its files
            make_toy_dataset(path, image_size=image_size, kind=kind)
        dist.barrier()
    folder = make_toy_dataset(path, image_size=image_size, kind=kind)  # draws, or finds it
    return load_folder(os.path.join(folder, split), image_size, hflip, ["genus"])


# -------------------------------------------------------------------------------------------------
# The latent cache: cache_dir/latents.npy (len, 2, C, h, w), per dataset index the VAE posterior's
# (mean, std) ALREADY MULTIPLIED BY vae.scaling_factor (float16 by default: half the disk, rounding
# far below the posterior's noise); labels.npy; meta.json: what it was built from (a mismatch is
# refused), the skipped images. Rank r encodes images r, r + W, ...; rank 0 writes meta.json last.

def read_images(dataset, indices=None, batch_size=64, num_workers=4, rank=0):
    """Decode images in DataLoader workers -> (indices, (B, H, W, 3) uint8) of readable ones."""
    indices = np.arange(len(dataset.files)) if indices is None else indices
    loader = DataLoader(indices, batch_size, num_workers=num_workers, collate_fn=dataset.read_batch)
    for batch in tqdm(loader, desc="reading images", disable=rank != 0, dynamic_ncols=True):
        for j, _, why in batch:
            if why is not None:
                dataset.skip(j, why)
        if good := [(j, pixels) for j, pixels, why in batch if why is None]:
            yield np.array([j for j, _ in good]), torch.from_numpy(np.stack([p for _, p in good]))


def cache_folder_problem(cache_dir):
    """Why cache_dir cannot take a latent cache (so nothing of the user's is written over)."""
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        return f"{cache_dir} is a file, not a folder for a latent cache: give a new or empty folder"
    others = os.path.isdir(cache_dir) and set(os.listdir(cache_dir)) - {"meta.json", LOCK_FILE}
    if others and not os.path.isfile(os.path.join(cache_dir, "meta.json")):
        return f"{cache_dir} holds other files and no latent cache (no meta.json): give a new one"


@torch.no_grad()
def build_latent_cache(dataset, vae, cache_dir, rank=0, world_size=1, batch_size=32, num_workers=4,
                       dtype="float16"):
    """ImageDataset -> LatentDataset, encoded once into cache_dir or reused; every rank calls it."""
    meta_path, latents_path = (os.path.join(cache_dir, f) for f in ("meta.json", "latents.npy"))
    wanted = dict(format=2, files=dataset.fingerprint(), num_images=len(dataset.files),
                  image_size=dataset.image_size, hflip=dataset.hflip,
                  vae=fingerprint(vae.state_dict()), scaling_factor=float(vae.scaling_factor),
                  dtype=np.dtype(dtype).name)
    # rank 0 decides, holding the cache's lock: "ready" (reuse), "build", or why it is refused
    state, lock = (cache_folder_problem(cache_dir) or "build") if rank == 0 else None, None
    if state == "build":
        os.makedirs(cache_dir, exist_ok=True)
        try:
            lock = Lock(os.path.join(cache_dir, LOCK_FILE), f"the latent cache {cache_dir}")
        except ValueError as busy:  # being built by another process
            state = str(busy)
    found = read_json(meta_path) if lock and os.path.isfile(meta_path) else {}
    if found.get("complete"):  # (an interrupted build is built again)
        differs = [k for k in wanted if found.get(k) != wanted[k]]
        was = ", ".join(f"{k} ({found.get(k)!r} there, {wanted[k]!r} now)" for k in differs)
        state = "ready" if not differs else (f"latent cache {cache_dir} is stale: it was built from"
                                             f" a different {was}: delete it or give a new folder")
    if world_size > 1:
        dist.broadcast_object_list(box := [state])
        state = box[0]
    if lock and state != "build":
        lock.release()
    if state == "ready":
        return LatentDataset(cache_dir)
    if state != "build":
        raise ValueError(state)

    device, flips = next(vae.parameters()).device, 2 if dataset.hflip else 1
    if rank == 0:
        zeros = torch.zeros(1, 3, dataset.image_size, dataset.image_size, device=device)
        shape = (len(dataset), 2, *vae.encode(zeros).mean.shape[1:])  # (len, 2, C, h, w)
        Path(meta_path).write_text(json.dumps(dict(wanted, complete=False)))
        np.lib.format.open_memmap(latents_path, mode="w+", dtype=dtype, shape=shape).flush()
        np.save(os.path.join(cache_dir, "labels.npy"), np.repeat(dataset.labels, flips))
    if world_size > 1:
        dist.barrier()
    latents = np.load(latents_path, mmap_mode="r+")
    dataset.skipped = {}
    mine = np.arange(rank, len(dataset.files), world_size)
    for images, pixels in read_images(dataset, mine, batch_size, num_workers, rank):
        x = to_tensor(pixels)  # (B, 3, H, W)
        if flips == 2:  # rows 2j, 2j + 1: image j, then mirrored, as the dataset indexes them
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        posterior = vae.encode(x.to(device))
        moments = torch.stack([posterior.mean, posterior.std], dim=1) * vae.scaling_factor
        rows = (images[:, None] * flips + np.arange(flips)).reshape(-1)
        latents[rows] = moments.float().cpu().numpy().astype(dtype)  # (B*flips, 2, C, h, w)
    latents.flush()
    del latents
    skipped = [dataset.skipped] * world_size  # {file: why} of each rank
    if world_size > 1:
        dist.all_gather_object(skipped, dataset.skipped)
    if rank == 0:
        index_of = {str(f): j for j, f in enumerate(dataset.files)}
        report = sorted((index_of[f], f, why) for s in skipped for f, why in s.items())
        skips = [dict(index=j, file=f, reason=why) for j, f, why in report]
        Path(meta_path).write_text(json.dumps(dict(wanted, complete=True, skipped=skips), indent=1))
        if report:
            print(f"latent cache: skipped {len(report)} unreadable images (listed in {meta_path}): "
                  + "; ".join(f"{f} ({why})" for _, f, why in report[:5]), file=sys.stderr)
        lock.release()
    if world_size > 1:
        dist.barrier()
    return LatentDataset(cache_dir)


class LatentDataset(Dataset):
    """Items ((mean, std), (C, h, w) float32 scaled already; fine label): z = mean + std * eps."""
    def __init__(self, cache_dir):
        self.meta = read_json(os.path.join(cache_dir, "meta.json"))
        if not self.meta.get("complete"):
            raise ValueError(f"latent cache {cache_dir} is incomplete: delete it and rebuild")
        self.path = os.path.join(cache_dir, "latents.npy")
        self.latent_shape = tuple(np.load(self.path, mmap_mode="r").shape[2:])  # (C, h, w)
        self.labels = np.load(os.path.join(cache_dir, "labels.npy"))
        flips = 2 if self.meta["hflip"] else 1
        bad_rows = [s["index"] * flips + f for s in self.meta["skipped"] for f in range(flips)]
        self.rows = np.setdiff1d(np.arange(len(self.labels)), bad_rows)  # index -> latents row
        self.latents = None  # opened on first use, in each DataLoader worker

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # workers reopen the memmap rather than receive a pickled copy
        return dict(self.__dict__, latents=None)

    def __getitem__(self, i):
        if self.latents is None:
            self.latents = np.load(self.path, mmap_mode="r")
        moments = torch.from_numpy(self.latents[self.rows[i]].astype(np.float32))  # (2, C, h, w)
        return (moments[0], moments[1]), int(self.labels[self.rows[i]])


def model_input(batch, vae, device):
    """A batch as the DiT sees it: cached moments sampled afresh, images VAE-encoded, or pixels."""
    if isinstance(batch, (list, tuple)):
        mean, std = (t.to(device, non_blocking=True) for t in batch[:2])
        return mean + std * torch.randn_like(std)
    x = batch.to(device, non_blocking=True)
    return vae.encode(x).sample() * vae.scaling_factor if vae is not None else x
