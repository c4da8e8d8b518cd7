"""data.py: hierarchies from iNat / VegFru / folder layouts, name lookup, the toy set, the ADM crop, flips by index,
unreadable images, and the VAE latent cache against the tiny VAE's posterior."""
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
from checkpoint import LOCK_FILE, load_vae_state_dict
from conftest import fixture, lock_held_elsewhere, rel_err
from model import AutoencoderKL


def write_image(path, rng, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


# ---- iNat 2021 ----

INAT_TAXA = [  # kingdom phylum class order family genus epithet, common name, iNat 2021 supercategory (all 11)
    ("Animalia Annelida Clitellata Haplotaxida Lumbricidae Lumbricus terrestris", "Common Earthworm", "Animalia"),
    ("Animalia Arthropoda Arachnida Araneae Araneidae Araneus diadematus", "Cross Orbweaver", "Arachnids"),
    ("Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus", "Monarch", "Insects"),
    ("Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus gilippus", "Queen", "Insects"),
    ("Animalia Chordata Actinopterygii Perciformes Centrarchidae Lepomis macrochirus", "Bluegill", "Ray-finned Fishes"),
    ("Animalia Chordata Amphibia Anura Ranidae Lithobates catesbeianus", "American Bullfrog", "Amphibians"),
    ("Animalia Chordata Aves Passeriformes Turdidae Turdus migratorius", "American Robin", "Birds"),
    ("Animalia Chordata Mammalia Carnivora Canidae Vulpes vulpes", "Red Fox", "Mammals"),
    ("Animalia Chordata Reptilia Squamata Colubridae Thamnophis sirtalis", "Common Garter Snake", "Reptiles"),
    ("Animalia Mollusca Gastropoda Stylommatophora Helicidae Cornu aspersum", "Garden Snail", "Mollusks"),
    ("Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita muscaria", "Fly Agaric", "Fungi"),
    ("Plantae Tracheophyta Magnoliopsida Asterales Asteraceae Taraxacum officinale", "Common Dandelion", "Plants"),
]


def write_inat(root, split="train_mini", images_per_class=2):
    """A tiny tree in the iNat 2021 layout: split/<NNNNN_Kingdom_..._epithet>/<uuid>.jpg plus split.json."""
    rng = np.random.default_rng(0)
    categories, images, annotations = [], [], []
    for cid, (taxonomy, common, sup) in enumerate(INAT_TAXA):
        k, p, c, o, f, g, e = taxonomy.split()
        dir_name = f"{cid:05d}_" + "_".join(taxonomy.split())
        categories.append(dict(id=cid, name=f"{g} {e}", common_name=common, supercategory=sup, kingdom=k, phylum=p,
                               **{"class": c}, order=o, family=f, genus=g, specific_epithet=e, image_dir_name=dir_name))
        for n in range(images_per_class):
            file_name = f"{split}/{dir_name}/{cid:03d}{n:02d}-uuid.jpg"
            write_image(os.path.join(root, file_name), rng)
            images.append(dict(id=len(images), width=12, height=10, file_name=file_name))
            annotations.append(dict(id=len(annotations), image_id=images[-1]["id"], category_id=cid))
    meta = dict(info={}, images=images[::-1], categories=categories[::-1], annotations=annotations, licenses=[])
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump(meta, f)
    return meta


def test_inat_json_and_folders_give_the_same_hierarchy(tmp_path):
    meta = write_inat(tmp_path)
    from_json, h_json = data.load_dataset("inat", str(tmp_path), 8)
    os.remove(tmp_path / "train_mini.json")
    from_dirs, h_dirs = data.load_dataset("inat", str(tmp_path), 8)
    by_id = sorted(meta["categories"], key=lambda c: c["id"])
    assert h_json.class_names == h_dirs.class_names == [c["name"] for c in by_id]
    assert h_json.superclass_names == h_dirs.superclass_names == sorted({t[-1] for t in INAT_TAXA})
    assert len(h_json.superclass_names) == 11
    assert h_json.class_to_superclass == h_dirs.class_to_superclass
    assert [h_json.superclass_names[s] for s in h_json.class_to_superclass] == [t[-1] for t in INAT_TAXA]
    assert h_json.common_names == [t[1] for t in INAT_TAXA] and h_dirs.common_names == [""] * len(INAT_TAXA)
    assert h_json.levels == h_dirs.levels and [name for name, _, _ in h_json.ranks()] == \
        ["fine", "genus", "family", "order", "class", "superclass"]
    danaus = h_json.ranks()[1][2]  # the two Danaus species share a genus, and no other two do
    assert danaus[2] == danaus[3] and len(set(danaus)) == len(INAT_TAXA) - 1
    pairs = lambda d: sorted(zip(d.files.tolist(), d.labels.tolist()))
    assert pairs(from_json) == pairs(from_dirs) and len(from_json) == 2 * len(meta["images"])
    label_of_dir = {c["image_dir_name"]: c["id"] for c in meta["categories"]}
    assert all(label_of_dir[f.split("/")[1]] == label for f, label in pairs(from_json))


def test_inat_mismatches_are_detected(tmp_path):
    meta = write_inat(tmp_path)
    monarch = next(c for c in meta["categories"] if c["name"] == "Danaus plexippus")
    monarch["supercategory"] = "Birds"
    with open(tmp_path / "train_mini.json", "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match=f"{monarch['image_dir_name']}: JSON 'Birds', folder taxonomy 'Insects'"):
        _, hierarchy = data.load_dataset("inat", str(tmp_path), 8)
    assert hierarchy.superclass_names[hierarchy.class_to_superclass[monarch["id"]]] == "Birds"  # the JSON wins
    os.makedirs(tmp_path / "train_mini" / "00099_Animalia_Chordata_Aves_Strigiformes_Strigidae_Bubo_bubo")
    with pytest.raises(ValueError, match="disagree"):
        data.load_dataset("inat", str(tmp_path), 8)
    with pytest.raises(FileNotFoundError, match="train_mini"):
        data.load_dataset("inat", str(tmp_path / "nothing"), 8)


@pytest.mark.parametrize("damage, message", [
    (lambda m: m["categories"][0].pop("id"), r"every entry of 'categories' needs the keys \['id', 'name'"),
    (lambda m: m.pop("images"), "which has a list 'images'"),
    (lambda m: m["annotations"][0].update(category_id=999), r"annotations name 1 categories it does not define"),
    (lambda m: m["annotations"].pop(), "1 images have no annotation"),
    (lambda m: m.update(categories={"id": 1}), "which has a list 'categories'"),
])
def test_a_malformed_inat_json_is_refused_by_name(tmp_path, damage, message):
    """Each in one line that names the file and what iNat's JSON has instead, never a KeyError; as a --hierarchy too."""
    meta = write_inat(tmp_path)
    damage(meta)
    with open(tmp_path / "train_mini.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=f"train_mini.json.*{message}"):
        data.load_dataset("inat", str(tmp_path), 8)
    if "'categories'" in message:  # what a class list read from the JSON relies on
        with pytest.raises(ValueError, match=f"train_mini.json.*{message}"):
            data.Hierarchy.from_json(str(tmp_path / "train_mini.json"))


# ---- the hierarchy: lookup and serialisation ----

def test_lookup_by_id_scientific_and_common_name(tmp_path):
    write_inat(tmp_path)
    _, h = data.load_dataset("inat", str(tmp_path), 8)
    monarch = [t[1] for t in INAT_TAXA].index("Monarch")
    assert h.lookup("Danaus plexippus") == h.lookup("danaus_PLEXIPPUS") == h.lookup("  monarch ") == monarch
    assert h.lookup(monarch) == h.lookup(str(monarch)) == monarch
    for bad in (len(INAT_TAXA), -1):
        with pytest.raises(ValueError, match=f"valid ids are 0..{len(INAT_TAXA) - 1}"):
            h.lookup(bad)
    with pytest.raises(ValueError, match="closest: .*Danaus plexippus"):
        h.lookup("Danaus plexipus")
    with pytest.raises(ValueError, match="closest: .*Monarch"):
        h.lookup("monarc")
    with pytest.raises(ValueError, match="no class named 'qqqqqq'$"):
        h.lookup("qqqqqq")
    twins = data.Hierarchy(["A a", "B b"], ["S"], [0, 0], ["same", "Same"])
    with pytest.raises(ValueError, match="names 2 classes"):
        twins.lookup("same")


def test_hierarchy_round_trips_through_checkpoints_and_json(tmp_path):
    write_inat(tmp_path)
    _, h = data.load_dataset("inat", str(tmp_path), 8)
    torch.save({"hierarchy": h.to_dict()}, tmp_path / "ckpt.pt")
    loaded = data.Hierarchy.from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["hierarchy"])
    h.to_json(tmp_path / "h.json")
    for other in (loaded, data.Hierarchy.from_json(tmp_path / "h.json"),
                  data.Hierarchy.from_json(tmp_path / "train_mini.json")):  # iNat's own JSON works too
        assert other.to_dict() == h.to_dict()
    with pytest.raises(ValueError, match="class_to_superclass"):
        data.Hierarchy.from_dict({"class_names": [], "superclass_names": []})
    with pytest.raises(ValueError, match="point at no superclass"):
        data.Hierarchy(["a"], ["S"], [1])


# ---- VegFru ----

VEGFRU = [  # folder, class, file-name superclass code, superclass id in supvegfru_*.txt
    ("veg200_images", "chive", "v_01", 0), ("veg200_images", "leek", "v_01", 0),
    ("veg200_images", "broccoli", "v_04", 1), ("fru92_images", "banana", "f_01", 2),
    ("fru92_images", "apple", "f_02", 3), ("fru92_images", "pear", "f_02", 3)]


def write_vegfru(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "vegfru_list")
    counts = dict(train=2, val=1, test=1)
    n = 0
    for split, count in counts.items():
        lines, sup_lines = [], []
        for label, (folder, name, code, sup) in enumerate(VEGFRU):
            for _ in range(count):
                path = f"{folder}/{name}/{code}_{label % 3 + 1:02d}_{n:04d}.jpg"
                write_image(os.path.join(root, path), rng)
                lines.append(f"{path} {label}\n")
                sup_lines.append(f"{path} {sup}\n")
                n += 1
        (root / "vegfru_list" / f"vegfru_{split}.txt").write_text("".join(lines))
        (root / "vegfru_list" / f"supvegfru_{split}.txt").write_text("".join(sup_lines))


def test_vegfru_layout(tmp_path):
    write_vegfru(tmp_path)
    train, h = data.load_dataset("vegfru", str(tmp_path), 8)
    assert h.class_names == [v[1] for v in VEGFRU]
    assert h.class_to_superclass == [v[3] for v in VEGFRU]
    assert h.superclass_names == ["veg_01", "veg_04", "fru_01", "fru_02"]
    listed = [line.split() for line in (tmp_path / "vegfru_list" / "vegfru_train.txt").read_text().splitlines()]
    assert train.files.tolist() == [p for p, _ in listed] and train.labels.tolist() == [int(y) for _, y in listed]
    trainval, _ = data.load_dataset("vegfru", str(tmp_path), 8, split="trainval")
    assert len(trainval.files) == len(train.files) + len(VEGFRU)
    x, y = train[3]
    assert x.shape == (3, 8, 8) and y == train.labels[1]
    # without the superclass lists the file names' codes give the same grouping
    for split in ("train", "val", "test"):
        os.remove(tmp_path / "vegfru_list" / f"supvegfru_{split}.txt")
    _, derived = data.load_dataset("vegfru", str(tmp_path), 8)
    named = lambda hh: [hh.superclass_names[s] for s in hh.class_to_superclass]
    assert named(derived) == named(h)
    # a superclass list that contradicts the file names is refused
    lines = (tmp_path / "vegfru_list" / "vegfru_train.txt").read_text().splitlines()
    (tmp_path / "vegfru_list" / "supvegfru_train.txt").write_text("".join(
        f"{line.split()[0]} {0 if int(line.split()[1]) < 4 else 1}\n" for line in lines))
    with pytest.raises(ValueError, match="one to one"):
        data.load_dataset("vegfru", str(tmp_path), 8)
    with pytest.raises(FileNotFoundError, match="vegfru_list"):
        data.load_dataset("vegfru", str(tmp_path), 8, split="nosuchsplit")


# ---- the generic folder layout ----

def test_folder_layout(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"reptiles": ["gecko", "anole"], "birds": ["wren", "crow", "auk"]}
    for superclass, classes in tree.items():
        for name in classes:
            for n in range(2):
                write_image(str(tmp_path / superclass / name / f"{n}.png"), rng, size=(20 + n, 14))
    dataset, h = data.load_dataset("folder", str(tmp_path), 8)
    assert h.superclass_names == sorted(tree)
    assert h.class_names == [c for s in sorted(tree) for c in sorted(tree[s])]
    assert [h.superclass_names[s] for s in h.class_to_superclass] == [s for s in sorted(tree) for _ in tree[s]]
    for f, label in zip(dataset.files, dataset.labels):
        assert f.split(os.sep)[1] == h.class_names[label]
    x, y = dataset[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    with pytest.raises(FileNotFoundError, match="superclass"):
        data.load_dataset("folder", str(tmp_path / "birds" / "wren"), 8)


def test_a_deeper_folder_tree_gives_every_rank(tmp_path):
    rng = np.random.default_rng(0)
    tree = {("birds", "corvids", "crow"), ("birds", "corvids", "raven"), ("birds", "wrens", "wren"),
            ("reptiles", "geckos", "gecko")}
    for path in tree:
        write_image(str(tmp_path.joinpath(*path, "0.png")), rng)
    dataset, h = data.load_dataset("folder", str(tmp_path), 8)
    assert [(rank, names) for rank, names, _ in h.ranks()] == [
        ("fine", ["crow", "raven", "wren", "gecko"]), ("group", ["corvids", "wrens", "geckos"]),
        ("superclass", ["birds", "reptiles"])]
    assert [ids for _, _, ids in h.ranks()] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 1]]
    assert [f.split(os.sep)[1] for f in dataset.files] == ["corvids", "corvids", "wrens", "geckos"]
    assert data.Hierarchy.from_dict(h.to_dict()).ranks() == h.ranks()
    with pytest.raises(ValueError, match="a group lies in two different superclass groups"):
        data.Hierarchy(["a", "b"], ["S", "T"], [0, 1], levels=[dict(name="group", group_names=["g"],
                                                                    class_to_group=[0, 0])])


# ---- the toy set ----

def test_toy_set_is_deterministic_and_has_source_and_target(tmp_path):
    def read_all(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, files in os.walk(root) for f in files if f.endswith(".png")}

    folder_a = data.make_toy_dataset(str(tmp_path / "a"), seed=0, images_per_class=4)
    a = read_all(folder_a)
    b = read_all(data.make_toy_dataset(str(tmp_path / "b"), seed=0, images_per_class=4))
    c = read_all(data.make_toy_dataset(str(tmp_path / "c"), seed=1, images_per_class=4))
    assert a == b and a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)
    # generated once: a second call keeps the files; a new seed is made beside it, the first one untouched
    stamp = os.stat(os.path.join(folder_a, next(iter(a)))).st_mtime_ns
    assert data.make_toy_dataset(str(tmp_path / "a"), seed=0, images_per_class=4) == folder_a
    assert os.stat(os.path.join(folder_a, next(iter(a)))).st_mtime_ns == stamp
    assert read_all(data.make_toy_dataset(str(tmp_path / "a"), seed=1, images_per_class=4)) == c
    assert read_all(folder_a) == a

    source, hs = data.load_folder(os.path.join(folder_a, "source"), 32)  # what load_dataset("toy", ...) reads
    target, ht = data.load_folder(os.path.join(folder_a, "target"), 32)
    assert not set(hs.class_names) & set(ht.class_names)  # the target's fine classes are all new
    assert set(hs.superclass_names) < set(ht.superclass_names)  # ... in the source's superclasses and a new one
    for dataset, h in ((source, hs), (target, ht)):
        assert np.bincount(dataset.labels).tolist() == [4] * len(h.class_names)
        assert all(h.class_to_superclass.count(s) >= 2 for s in range(len(h.superclass_names)))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy"))


def test_toy_fine_classes_differ_less_than_superclasses(toy_root):
    dataset, h = data.load_dataset("toy", toy_root, 32, split="source")
    means = np.stack([np.mean([dataset.read(j) for j in np.flatnonzero(dataset.labels == c)], axis=0)
                      for c in range(len(h.class_names))]).reshape(len(h.class_names), -1)
    distance = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = np.equal.outer(h.class_to_superclass, h.class_to_superclass)
    assert distance[same & ~np.eye(len(same), dtype=bool)].max() < distance[~same].min()


# ---- the ADM centre crop, flips by index ----

def test_center_crop_sizes_and_a_known_case():
    rng = np.random.default_rng(0)
    for w, h in ((12, 7), (37, 101), (300, 200), (64, 64)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert data.center_crop(image, 16).shape == (16, 16, 3)
    # 2x2 blocks of constant colour, 64 wide x 32 high: one exact box halving to 32 x 16, no resize, then the
    # centre 16 columns
    small = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    image = Image.fromarray(small.repeat(2, axis=0).repeat(2, axis=1))
    np.testing.assert_array_equal(data.center_crop(image, 16), small[:, 8:24])


def test_flips_come_from_the_index(toy_root):
    dataset, _ = data.load_dataset("toy", toy_root, 32, split="target")
    assert len(dataset) == 2 * len(dataset.files)
    for j in (0, 7, len(dataset.files) - 1):
        (x, y), (x_flip, y_flip) = dataset[2 * j], dataset[2 * j + 1]
        assert y == y_flip == dataset.labels[j]
        assert torch.equal(x_flip, x.flip(-1)) and not torch.equal(x, x_flip)
        assert torch.equal(x, data.to_tensor(dataset.read(j)))
    plain, _ = data.load_dataset("toy", toy_root, 32, split="target", hflip=False)
    assert len(plain) == len(dataset.files) and torch.equal(plain[7][0], dataset[14][0])


def write_tree_with_bad_images(root, size=(40, 48)):
    """root/<superclass>/<class>/*.png with 8 readable images, one garbage file and one truncated JPEG."""
    rng = np.random.default_rng(0)
    for s in ("sa", "sb"):
        for c in ("c1", "c2"):
            for n in range(2):
                write_image(str(root / s / f"{s}{c}" / f"{n}.png"), rng, size=size)
    (root / "sa" / "sac2" / "2_garbage.jpg").write_bytes(b"not an image at all")
    write_image(str(root / "sb" / "sbc1" / "2_truncated.jpg"), rng, size=(64, 64))
    jpeg = (root / "sb" / "sbc1" / "2_truncated.jpg").read_bytes()
    (root / "sb" / "sbc1" / "2_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])


def test_unreadable_images_are_skipped_and_reported(tmp_path, capsys):
    write_tree_with_bad_images(tmp_path)
    dataset, _ = data.load_dataset("folder", str(tmp_path), 16)
    bad = [j for j, f in enumerate(dataset.files) if os.path.basename(f).startswith("2_")]
    for j in bad:
        x, y = dataset[2 * j + 1]
        nxt = (j + 1) % len(dataset.files)  # the next readable image stands in, with its own label
        assert torch.equal(x, data.to_tensor(dataset.read(nxt)).flip(-1)) and y == dataset.labels[nxt]
    assert sorted(dataset.skipped) == sorted(dataset.files[bad].tolist())
    assert "truncated" in dataset.skipped[dataset.files[bad[1]]]
    err = capsys.readouterr().err
    assert all(os.path.join(str(tmp_path), dataset.files[j]) in err for j in bad)


def test_read_images_in_workers_yields_the_readable_ones(tmp_path):
    write_tree_with_bad_images(tmp_path)
    dataset, _ = data.load_dataset("folder", str(tmp_path), 16)
    bad = [j for j, f in enumerate(dataset.files) if os.path.basename(f).startswith("2_")]
    batches = list(data.read_images(dataset, batch_size=3, num_workers=2))
    assert np.concatenate([j for j, _ in batches]).tolist() == [j for j in range(len(dataset.files)) if j not in bad]
    assert all(np.array_equal(p, dataset.read(j)) for js, pixels in batches for j, p in zip(js, pixels.numpy()))
    assert sorted(dataset.skipped) == sorted(dataset.files[bad].tolist())  # recorded in this process


def test_each_bad_or_tiny_image_is_reported_once_per_run(tmp_path, capfd):
    """Two DataLoader workers, two epochs: one line for each unreadable file and for the 1x1 PNG that is upscaled."""
    write_tree_with_bad_images(tmp_path)
    write_image(str(tmp_path / "sa" / "sac1" / "3_tiny.png"), np.random.default_rng(1), size=(1, 1))
    dataset, _ = data.load_dataset("folder", str(tmp_path), 16)
    capfd.readouterr()
    for epoch in range(2):
        for _ in torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2):
            pass
    lines = capfd.readouterr().err.strip().splitlines()
    assert sorted(os.path.basename(line.split(": ")[1]) for line in lines) == [
        "2_garbage.jpg", "2_truncated.jpg", "3_tiny.png"]
    assert any("1x1 px, upscaled more than 2x to 16" in line for line in lines)


# ---- the latent cache ----

@pytest.fixture(scope="module")
def vae():
    ref = fixture("vae_tiny.pt")
    model = AutoencoderKL.from_config(ref["config"]).eval()
    return load_vae_state_dict(model, ref["state_dict"])


def encode_directly(vae, x):
    with torch.no_grad():
        posterior = vae.encode(x)
    return posterior.mean * vae.scaling_factor, posterior.std * vae.scaling_factor


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 1e-3)])
def test_latent_cache_holds_the_posterior_moments(tmp_path, vae, dtype, tolerance):
    write_tree_with_bad_images(tmp_path / "images")
    dataset, _ = data.load_dataset("folder", str(tmp_path / "images"), 16)
    cache = data.build_latent_cache(dataset, vae, str(tmp_path / "cache"), batch_size=3, num_workers=0, dtype=dtype)
    skipped = {s["file"] for s in cache.meta["skipped"]}
    assert skipped == {f for f in dataset.files.tolist() if os.path.basename(f).startswith("2_")}
    assert len(cache) == len(dataset) - 2 * len(skipped)
    rows = cache.rows
    images = torch.stack([dataset[int(i)][0] for i in rows])  # the dataset's own items, mirrors included
    mean, std = encode_directly(vae, images)
    assert cache.latent_shape == mean.shape[1:]
    cached = [cache[k] for k in range(len(cache))]
    assert rel_err(torch.stack([m for (m, _), _ in cached]), mean) <= tolerance
    assert rel_err(torch.stack([s for (_, s), _ in cached]), std) <= tolerance
    assert [y for _, y in cached] == [int(dataset.labels[i // 2]) for i in rows]


def test_latent_cache_is_reused_and_a_stale_one_refused(tmp_path, vae):
    write_tree_with_bad_images(tmp_path / "images")
    dataset, _ = data.load_dataset("folder", str(tmp_path / "images"), 16)
    cache_dir = str(tmp_path / "cache")
    first = data.build_latent_cache(dataset, vae, cache_dir, num_workers=0)
    encode = vae.encode
    vae.encode = None  # a matching cache is reused: nothing is encoded again
    try:
        again = data.build_latent_cache(dataset, vae, cache_dir, num_workers=0)
    finally:
        del vae.encode
    assert again.meta == first.meta and len(again) == len(first) and vae.encode == encode
    resized, _ = data.load_dataset("folder", str(tmp_path / "images"), 8)
    with pytest.raises(ValueError, match=r"stale: it was built from a different image_size \("):
        data.build_latent_cache(resized, vae, cache_dir, num_workers=0)
    unflipped, _ = data.load_dataset("folder", str(tmp_path / "images"), 16, hflip=False)
    with pytest.raises(ValueError, match=r"stale: it was built from a different hflip \(True there, False now"):
        data.build_latent_cache(unflipped, vae, cache_dir, num_workers=0)
    os.remove(tmp_path / "images" / "sa" / "sac1" / "0.png")
    fewer, _ = data.load_dataset("folder", str(tmp_path / "images"), 16)
    with pytest.raises(ValueError, match="stale.*files"):
        data.build_latent_cache(fewer, vae, cache_dir, num_workers=0)
    other_vae = AutoencoderKL.from_config(fixture("vae_tiny.pt")["config"]).eval()
    with pytest.raises(ValueError, match="stale.*vae"):
        data.build_latent_cache(dataset, other_vae, cache_dir, num_workers=0)
    (tmp_path / "mine").mkdir()  # a folder of the user's: refused, and nothing written into it
    (tmp_path / "mine" / "labels.npy").write_bytes(b"the user's")
    with pytest.raises(ValueError, match="holds other files and no latent cache"):
        data.build_latent_cache(dataset, vae, str(tmp_path / "mine"), num_workers=0)
    assert os.listdir(tmp_path / "mine") == ["labels.npy"]
    assert (tmp_path / "mine" / "labels.npy").read_bytes() == b"the user's"


def test_a_cache_or_toy_set_being_written_is_refused_to_a_second_writer(tmp_path, vae):
    """While another process builds a latent cache or draws a toy set (holds its lock), a second one is refused in one
    line naming it, and writes nothing; once that process is gone (killed), its lock is free and the work is done."""
    write_tree_with_bad_images(tmp_path / "images")
    dataset, _ = data.load_dataset("folder", str(tmp_path / "images"), 16)
    (tmp_path / "cache").mkdir()
    with lock_held_elsewhere(tmp_path / "cache" / LOCK_FILE) as pid:
        with pytest.raises(ValueError, match=f"the latent cache .* is in use by process {pid} on "):
            data.build_latent_cache(dataset, vae, str(tmp_path / "cache"), num_workers=0)
        assert os.listdir(tmp_path / "cache") == [LOCK_FILE]
    assert data.build_latent_cache(dataset, vae, str(tmp_path / "cache"), num_workers=0).meta["complete"]
    assert sorted(os.listdir(tmp_path / "cache")) == ["labels.npy", "latents.npy", "meta.json"]  # the lock: gone
    (tmp_path / "toy").mkdir()
    name = f"8px-seed0-n4-v{data.TOY_VERSION}"
    with lock_held_elsewhere(tmp_path / "toy" / f".{name}.tmp.lock") as pid:
        with pytest.raises(ValueError, match=f"the toy set .*{name} is in use by process {pid} on "):
            data.make_toy_dataset(str(tmp_path / "toy"), image_size=8, images_per_class=4)
    assert os.path.isdir(data.make_toy_dataset(str(tmp_path / "toy"), image_size=8, images_per_class=4))
    assert sorted(os.listdir(tmp_path / "toy")) == [name]


def build_on_rank(rank, world_size, images, cache_dir, rendezvous):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    ref = fixture("vae_tiny.pt")
    vae = load_vae_state_dict(AutoencoderKL.from_config(ref["config"]).eval(), ref["state_dict"])
    dataset, _ = data.load_dataset("folder", images, 16)
    data.build_latent_cache(dataset, vae, cache_dir, rank=rank, world_size=world_size, num_workers=0, dtype="float32")
    torch.distributed.destroy_process_group()


def test_latent_cache_built_by_two_ranks_equals_one_process(tmp_path, vae):
    write_tree_with_bad_images(tmp_path / "images")
    mp.spawn(build_on_rank, args=(2, str(tmp_path / "images"), str(tmp_path / "two"), str(tmp_path / "rdv")), nprocs=2)
    dataset, _ = data.load_dataset("folder", str(tmp_path / "images"), 16)
    one = data.build_latent_cache(dataset, vae, str(tmp_path / "one"), num_workers=0, dtype="float32")
    two = data.LatentDataset(str(tmp_path / "two"))
    assert two.meta == one.meta and np.array_equal(two.rows, one.rows)
    a, b = np.load(tmp_path / "one" / "latents.npy"), np.load(tmp_path / "two" / "latents.npy")
    assert rel_err(torch.from_numpy(b[one.rows]), torch.from_numpy(a[one.rows])) <= 1e-5


def test_toy_sets_of_two_sizes_side_by_side_and_an_interrupted_generation(tmp_path):
    """Another size is made beside the first (which a running job may be reading), never over it; a generation that
    was killed left only its temporary folder and its (free) lock file, which the next generation of it removes."""
    first, _ = data.load_dataset("toy", str(tmp_path), 8, split="target")
    files = sorted(first.files)
    stale = tmp_path / ".12px-seed0-n32-v1.tmp" / "target"  # a killed process's half-drawn set
    stale.mkdir(parents=True)
    (tmp_path / ".12px-seed0-n32-v1.tmp.lock").write_text("process 1 on elsewhere since 2026-01-01 00:00")
    second, _ = data.load_dataset("toy", str(tmp_path), 12, split="target")
    assert sorted(first.files) == files and os.path.isdir(first.root) and first.root != second.root
    assert np.asarray(first[0][0]).shape == (3, 8, 8) and np.asarray(second[0][0]).shape == (3, 12, 12)
    assert sorted(os.listdir(tmp_path)) == ["12px-seed0-n32-v1", "8px-seed0-n32-v1"]


def test_empty_class_folders_and_superclasses_are_left_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_image(str(tmp_path / "Birds" / "robin" / "0.png"), rng)
    write_image(str(tmp_path / "Plants" / "oak" / "0.png"), rng)
    (tmp_path / "Birds" / "wren").mkdir()
    (tmp_path / "Fungi" / "amanita").mkdir(parents=True)
    dataset, hierarchy = data.load_dataset("folder", str(tmp_path), 8)
    assert hierarchy.class_names == ["robin", "oak"] and hierarchy.superclass_names == ["Birds", "Plants"]
    assert hierarchy.class_to_superclass == [0, 1] and dataset.labels.tolist() == [0, 1]
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "2 class folders without images" in warning and "1 superclasses" in warning


def test_model_input_samples_the_cached_posterior():
    """What a step feeds the DiT from cached moments: z = mean + std * eps, drawn afresh each time."""
    torch.manual_seed(0)
    mean, std = torch.randn(1, 4, 3, 3).expand(20000, -1, -1, -1), torch.rand(1, 4, 3, 3).expand(20000, -1, -1, -1)
    z = data.model_input((mean, std), None, torch.device("cpu"))
    assert (z.mean(0) - mean[0]).abs().max() <= 5 * std.max() / 20000 ** 0.5
    assert (z.std(0) / std[0] - 1).abs().max() <= 0.03
    f = fixture("vae_tiny.pt")
    vae = load_vae_state_dict(AutoencoderKL.from_config(f["config"]), f["state_dict"]).eval()
    with torch.no_grad():
        posterior = vae.encode(f["image"])
        torch.manual_seed(1)
        z = data.model_input(f["image"], vae, torch.device("cpu"))
    torch.manual_seed(1)
    expected = (posterior.mean + posterior.std * torch.randn_like(posterior.std)) * vae.scaling_factor
    torch.testing.assert_close(z, expected)


def test_the_toy_taxonomy_has_three_ranks_and_new_combinations_in_the_target(tmp_path):
    folder = data.make_toy_dataset(str(tmp_path), image_size=32, images_per_class=2, kind="taxa")
    assert os.path.basename(folder) == f"taxa-32px-seed0-n2-v{data.TOY_VERSION}"
    (source, hs), (target, ht) = (data.load_folder(os.path.join(folder, split), 32, rank_names=["genus"])
                                  for split in ("source", "target"))  # as load_dataset("taxa", ...) reads them
    assert [(rank, len(names)) for rank, names, _ in ht.ranks()] == [("fine", 120), ("genus", 20), ("superclass", 5)]
    assert [(rank, len(names)) for rank, names, _ in hs.ranks()] == [("fine", 96), ("genus", 16), ("superclass", 4)]
    assert set(ht.superclass_names) - set(hs.superclass_names) == {"crosses"}  # one superclass the source never saw
    assert np.bincount(target.labels).tolist() == [2] * 120
    looks = lambda h: {tuple(name.split("-")[1:]) for name in h.class_names}  # (stripes, marks, hue) of each species
    assert not looks(hs) & looks(ht)  # no target species has a source species' look ...
    for pair in ((0, 1), (0, 2), (1, 2)):  # ... but every two of its attributes appear together in the source
        seen = {tuple(look[k] for k in pair) for look in looks(hs)}
        assert {tuple(look[k] for k in pair) for look in looks(ht)} <= seen
    # the smallest attribute, a corner mark, is at least 2 x 2 px at 32 px; marks are alike in a mirror
    plain, marked = (np.asarray(data.draw_toy_image(0, (0.0, 1, corners), np.random.default_rng(0), 32), float)
                     for corners in ((), (0,)))
    changed = np.abs(marked - plain).max(axis=2) > 40
    assert changed.sum() >= 4 and changed[:8, :8].sum() == changed.sum()
    assert all({c ^ 1 for c in corners} == set(corners) for corners in data.TAXA_MARKS.values())
