"""Evaluation: FID Inception, Fréchet distance, LPIPS against the reference fixtures; per-superclass bookkeeping,
LPIPS diversity pairs, t-SNE, Figure 7, image-set reading and the tables."""
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fixture, rel_err
import evaluate as E
from data import load_dataset, make_toy_dataset, toy_superclass_color


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ---- FID Inception and the Fréchet distance against pytorch-fid ----

def test_inception_keys_match_the_real_weights_file():
    assert shapes(E.FIDInceptionV3()) == fixture("fid_inception_manifest.json")


def test_inception_pool3_matches_pytorch_fid():
    f = fixture("inception_fid_random_fp16.pt")
    assert next(iter(f["state_dict"].values())).dtype == torch.float16
    model = E.inception_from_state_dict(f["state_dict"])
    with torch.no_grad():
        pool3 = model(f["images"])
    assert pool3.dtype == torch.float32 and pool3.shape == f["pool3"].shape
    assert rel_err(pool3, f["pool3"]) <= 1e-4


def test_inception_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases"):
        E.load_inception(str(tmp_path / "missing.pth"))
    state_dict = dict(fixture("inception_fid_random_fp16.pt")["state_dict"])
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        E.inception_from_state_dict(state_dict)


def test_one_pass_gives_pool3_spatial_features_and_logits():
    """features(): pool3 as pytorch-fid's; sFID's spatial features are the first 7 channels of the TF graph's
    mixed_6/conv (Mixed_6d's 1x1 branch, 192 channels at 17x17), flattened as (H, W, C); IS's logits are pool3 times
    the fc weight."""
    f = fixture("inception_fid_random_fp16.pt")
    model = E.inception_from_state_dict(f["state_dict"])
    seen = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        pool3, spatial, logits = model.features(f["images"])
    hook.remove()
    assert rel_err(pool3, f["pool3"]) <= 1e-4
    assert seen[0].shape == (3, 192, 17, 17) and spatial.shape == (3, 2023)
    assert torch.equal(spatial, seen[0][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    assert logits.shape == (3, 1008) and torch.allclose(logits, pool3 @ model.fc.weight.T)


def test_frechet_distance_matches_pytorch_fid():
    f = fixture("inception_fid_random_fp16.pt")
    fid = E.frechet_distance(*E.feature_stats(f["feats1"].numpy()), *E.feature_stats(f["feats2"].numpy()))
    assert rel_err(fid, f["fid"]) <= 1e-6


def test_frechet_distance_identical_symmetric_and_rank_deficient():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) * 1.5 + 0.3
    stats_a, stats_b = E.feature_stats(a), E.feature_stats(b)
    assert abs(E.frechet_distance(*stats_a, *stats_a)) < 1e-9
    assert E.frechet_distance(*stats_a, *stats_b) == pytest.approx(E.frechet_distance(*stats_b, *stats_a), rel=1e-9)
    # 10 samples in 64 dimensions: covariances of rank 9. A shifted copy has the same covariance, so FID = |shift|^2
    few = rng.normal(size=(10, 64))
    shift = rng.normal(size=64)
    fid = E.frechet_distance(*E.feature_stats(few), *E.feature_stats(few + shift))
    assert fid == pytest.approx(shift @ shift, rel=1e-6)
    broken = np.array(a)
    broken[3, 5] = np.nan  # one non-finite feature: the distance is NaN, never the best possible 0
    assert np.isnan(E.frechet_distance(*E.feature_stats(broken), *stats_b))


# ---- FID per superclass (Table 1) ----

def test_per_superclass_fid_uses_the_right_subsets():
    rng = np.random.default_rng(1)
    names = ["Plants", "Birds", "Fungi"]
    sample_super, ref_super = rng.integers(0, 3, 300), rng.integers(0, 2, 240)  # the reference has no Fungi
    samples = rng.normal(size=(300, 8)) + sample_super[:, None]
    reference = rng.normal(size=(240, 8)) * 1.2 + ref_super[:, None]
    sample_stats = E.set_statistics(samples, sample_super, names)
    ref_stats = E.set_statistics(reference, ref_super, names)
    fids = E.fid_by_superclass(sample_stats, ref_stats)
    assert list(fids) == ["overall", "Plants", "Birds"]
    expected = {"overall": (samples, reference)}
    expected.update({names[s]: (samples[sample_super == s], reference[ref_super == s]) for s in (0, 1)})
    for name, (x, y) in expected.items():
        assert fids[name] == pytest.approx(E.frechet_distance(*E.feature_stats(x), *E.feature_stats(y)), rel=1e-9)


# ---- The rest of ADM's suite: Inception Score, precision and recall, the ref-stats file ----

def test_inception_score_of_uniform_and_confident_predictions():
    assert E.inception_score(np.zeros((10, 1008))) == pytest.approx(1, abs=1e-12)  # p(y|x) = p(y): KL 0
    for k in (1, 4, 10):  # each image sure of its class, the classes equally often: IS = k
        confident = 100 * np.eye(1008)[np.arange(20) % k]
        assert E.inception_score(confident) == pytest.approx(k, rel=1e-9)
    halves = np.concatenate([100 * np.eye(1008)[np.arange(8) % 2], np.zeros((8, 1008))])
    assert E.inception_score(halves, split_size=8) == pytest.approx((2 + 1) / 2, rel=1e-9)  # the mean over splits


def test_precision_recall_identical_far_apart_and_by_hand():
    a = np.random.default_rng(5).normal(size=(40, 8))
    assert E.precision_recall(a, a) == (1.0, 1.0)
    assert E.precision_recall(a, a, block_entries=50) == (1.0, 1.0)  # 1 row per block: the same
    assert E.precision_recall(a + 1000, a) == (0.0, 0.0)
    # on a line, k = 1: the reference 0, 1, 5 has balls of radius 1, 1, 4; the samples 0.5, 2, 10, 11 of 1.5, 1.5, 1, 1
    reference = np.array([[0.0, 0], [1, 0], [5, 0]])
    samples = np.array([[0.5, 0], [2, 0], [10, 0], [11, 0]])
    assert E.manifold_radii(torch.from_numpy(reference), k=1).tolist() == [1, 1, 16]  # squared
    # precision: 0.5 and 2 (on the sphere around 1) are inside, 10 and 11 are not; recall: 0 and 1 are, 5 is not
    for block_entries in (E.BLOCK_ENTRIES, 1):
        assert E.precision_recall(samples, reference, k=1, block_entries=block_entries) == (0.5, pytest.approx(2 / 3))


def test_ref_stats_file_round_trip_and_an_older_file(tmp_path):
    rng = np.random.default_rng(6)
    features = dict(pool3=rng.normal(size=(30, 16)).astype(np.float32), spatial=rng.normal(size=(30, 6)),
                    logits=rng.normal(size=(30, 5)))
    stats = E.image_set_statistics(features, rng.integers(0, 2, 30), ["Plants", "Birds"])
    E.save_statistics(tmp_path / "ref.npz", stats)
    loaded = E.load_statistics(tmp_path / "ref.npz")
    assert list(loaded["fid"]) == list(stats["fid"]) == ["overall", "Plants", "Birds"]
    assert all(np.array_equal(x, y) for name in stats["fid"] for x, y in zip(loaded["fid"][name], stats["fid"][name]))
    assert all(np.array_equal(x, y) for x, y in zip(loaded["sfid"], stats["sfid"]))
    assert loaded["pool3"].dtype == np.float16 and np.array_equal(loaded["pool3"], features["pool3"].astype(np.float16))
    values = E.suite_metrics(stats, loaded)  # the samples are the reference
    assert list(values) == ["fid", "sfid", "is", "precision", "recall"] and E.missing_metrics(loaded) == []
    assert all(fid < 1e-9 for fid in values["fid"].values()) and values["sfid"] < 1e-9
    assert values["precision"] == values["recall"] == 1
    # a file of the previous ref-stats: FID's statistics alone
    np.savez(tmp_path / "old.npz", names=np.array(["overall"]), mu=stats["fid"]["overall"][0][None],
             sigma=stats["fid"]["overall"][1][None])
    old = E.load_statistics(str(tmp_path / "old.npz"))
    assert old["sfid"] is None and old["pool3"] is None
    assert E.missing_metrics(old) == ["sFID", "precision", "recall"]
    assert list(E.suite_metrics(stats, old)) == ["fid", "is"]
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    assert E.load_statistics(str(tmp_path / "images.npz")) is None  # an images .npz is not statistics


# ---- LPIPS against the lpips package ----

def test_lpips_keys_match_the_real_weights():
    assert shapes(E.LPIPS()) == fixture("lpips_alex_manifest.json")


def test_lpips_distance_matches_lpips_package():
    f = fixture("lpips_alex_random.pt")
    with torch.no_grad():
        distance = E.lpips_from_state_dict(f["state_dict"])(f["a"], f["b"])
    assert distance.shape == f["distance"].shape
    assert rel_err(distance, f["distance"]) <= 1e-4


def test_lpips_assembles_from_lin_file_and_torchvision_alexnet(tmp_path):
    """The two files a user downloads: lpips' weights/v0.1/alex.pth and torchvision's alexnet-owt-7be5be79.pth."""
    f = fixture("lpips_alex_random.pt")
    sd = f["state_dict"]
    lins = {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins.")}
    alexnet = {k.replace(f"net.slice{s}.", "features."): v for k, v in sd.items() for s in range(1, 6)
               if k.startswith(f"net.slice{s}.")}
    alexnet["classifier.1.weight"] = torch.zeros(4096, 9216)  # torchvision's classifier, not part of LPIPS
    torch.save(lins, tmp_path / "alex.pth")
    torch.save(alexnet, tmp_path / "alexnet.pth")
    model = E.load_lpips([str(tmp_path / "alex.pth"), str(tmp_path / "alexnet.pth")])
    with torch.no_grad():
        assert rel_err(model(f["a"], f["b"]), f["distance"]) <= 1e-4
    with pytest.raises(ValueError, match="net.slice1.0.weight"):  # the AlexNet file forgotten
        E.load_lpips([str(tmp_path / "alex.pth")])
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79"):
        E.load_lpips([str(tmp_path / "nothing.pth")])


def test_same_class_pairs():
    labels = np.array([0, 1, 0, 2, 0, 1, 3])
    pairs = E.same_class_pairs(labels, pairs_per_class=10)
    assert sorted(map(tuple, pairs)) == [(0, 2), (0, 4), (1, 5), (2, 4)]
    capped = E.same_class_pairs(np.repeat(np.arange(3), 6), pairs_per_class=4, seed=3)  # 15 pairs per class
    assert len(capped) == 12 and len(set(map(tuple, capped))) == 12
    assert np.all(capped[:, 0] // 6 == capped[:, 1] // 6) and np.all(capped[:, 0] < capped[:, 1])


def test_lpips_diversity_averages_same_class_pairs_per_superclass():
    model = E.lpips_from_state_dict(fixture("lpips_alex_random.pt")["state_dict"])
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(7, 64, 64, 3), dtype=np.uint8)
    images[6] = images[5]  # class 3 holds two identical images
    labels = np.array([0, 0, 0, 1, 1, 3, 3])
    superclass_of = np.array([0, 1, 1, 1])  # class 0 -> A; classes 1 and 3 -> B
    result = E.lpips_diversity(model, images, labels, superclass_of[labels], ["A", "B"], batch_size=2)
    to_input = lambda i: torch.from_numpy(images[i]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        d = {p: model(to_input(p[0]), to_input(p[1])).item() for p in [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6)]}
    assert d[(5, 6)] == pytest.approx(0, abs=1e-6)
    assert result["A"] == pytest.approx(np.mean([d[(0, 1)], d[(0, 2)], d[(1, 2)]]), rel=1e-5)
    assert result["B"] == pytest.approx(np.mean([d[(3, 4)], d[(5, 6)]]), rel=1e-5, abs=1e-7)
    assert result["overall"] == pytest.approx(np.mean(list(d.values())), rel=1e-5)


# ---- t-SNE and Figure 7 ----

def clusters(seed=0, k=5, per=30, dim=20):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), per)
    return rng.normal(size=(k, dim))[labels] * 10 + rng.normal(size=(k * per, dim)), labels


def nearest_neighbour_agreement(y, labels):
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return (labels[d.argmin(axis=1)] == labels).mean()


def test_tsne_keeps_separated_clusters_apart_and_is_deterministic():
    x, labels = clusters()
    y = E.tsne(x, perplexity=15, iterations=500, seed=0, progress=False)
    assert y.shape == (len(x), 2) and np.isfinite(y).all()
    assert nearest_neighbour_agreement(y, labels) >= 0.9
    assert np.array_equal(y, E.tsne(x, perplexity=15, iterations=500, seed=0, progress=False))


def test_tsne_perplexity_is_reached():
    x, _ = clusters(seed=1)
    x = torch.as_tensor(x)
    p = E.conditional_probabilities(torch.cdist(x, x).square(), 12.0)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    assert torch.allclose(p.sum(dim=1), torch.ones(len(x), dtype=p.dtype))
    assert torch.allclose(entropy.exp(), torch.full_like(entropy, 12.0), rtol=1e-4)


def test_figure7_from_a_label_table(tmp_path):
    x, class_to_superclass = clusters(seed=2, k=4, per=15)
    superclass_rows = np.stack([x[class_to_superclass == s].mean(0) for s in range(4)]) + 0.5
    table = np.concatenate([x, superclass_rows, np.zeros((1, x.shape[1]))])  # fine | superclass | null
    fine, means, supers = E.embed_label_table(table, class_to_superclass, 4, perplexity=10, iterations=500,
                                              progress=False)
    assert fine.shape == (60, 2) and means.shape == supers.shape == (4, 2)
    assert nearest_neighbour_agreement(fine, class_to_superclass) >= 0.9
    for s in range(4):  # the star and the cross of a superclass land among its own fine classes
        for point in (means[s], supers[s]):
            assert class_to_superclass[((fine - point) ** 2).sum(1).argmin()] == s
    names = ["Plants", "Insects", "Birds", "Fungi"]
    E.draw_figure7(fine, class_to_superclass, means, supers, names, tmp_path / "fig7.png", size=(640, 480))
    image = Image.open(tmp_path / "fig7.png")
    assert image.format == "PNG" and image.size == (640, 480)
    present = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert all(color in present for color in E.superclass_colors(names))


# ---- Image sets, class maps and tables ----

def test_sample_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    labels, class_to_superclass = np.array([0, 1, 2, 3, 0, 2]), np.array([1, 0, 1, 0])
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=labels, superclass_labels=class_to_superclass[labels],
             superclass_names=np.array(["Birds", "Plants"]), class_names=np.array(["a", "b", "c", "d"]))
    data = E.read_image_npz(tmp_path / "samples.npz")
    assert np.array_equal(data["images"], images) and np.array_equal(data["labels"], labels)
    assert np.array_equal(data["superclass_labels"], class_to_superclass[labels])
    assert data["superclass_names"] == ["Birds", "Plants"] and data["class_names"] == ["a", "b", "c", "d"]
    # a bare ADM-style file plus a class map (JSON of names, listed as sorted ids)
    np.savez(tmp_path / "bare.npz", arr_0=images, labels=labels)
    (tmp_path / "map.json").write_text(json.dumps(["Plants", "Birds", "Plants", "Birds"]))
    data = E.read_image_npz(tmp_path / "bare.npz", str(tmp_path / "map.json"))
    assert data["superclass_names"] == ["Birds", "Plants"]
    assert np.array_equal(data["superclass_labels"], class_to_superclass[labels])
    ids, names = E.read_class_map({"class_to_superclass": [1, 0, 1, 0], "superclass_names": ["Birds", "Plants"]})
    assert np.array_equal(ids, class_to_superclass) and names == ["Birds", "Plants"]


def test_image_folder_tree_is_read_and_centre_cropped(tmp_path):
    layout = {("Birds", "robin"): 2, ("Birds", "wren"): 1, ("Plants", "oak"): 3}
    for (superclass, name), count in layout.items():
        (tmp_path / superclass / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (90 + 10 * i, 60), (40 * i, 100, 200)).save(tmp_path / superclass / name / f"{i}.jpg")
    for kind in (None, "folder"):  # a folder is read as data.py's "folder" kind unless told otherwise
        data = E.read_image_set(str(tmp_path), kind, image_size=32)
        assert data["superclass_names"] == ["Birds", "Plants"] and data["class_names"] == ["robin", "wren", "oak"]
        assert data["labels"].tolist() == [0, 0, 1, 2, 2, 2]
        assert data["superclass_labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(data["images"]) == 6  # unmirrored: one item per image
    rows, batch = next(E.image_batches(data["images"], batch_size=6, num_workers=0))
    assert rows.tolist() == list(range(6))
    assert batch.shape == (6, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    assert torch.equal(batch[2], torch.from_numpy(data["images"].read(2)).permute(2, 0, 1) / 255)


def test_image_batches_of_an_array_cover_it_in_order():
    images = np.random.default_rng(4).integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    batches = list(E.image_batches(images, batch_size=3))
    assert [rows.tolist() for rows, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([b for _, b in batches]) * 255, torch.from_numpy(images).permute(0, 3, 1, 2).float())


def test_results_table():
    old = {"method": "FineDiffusion", "fid": {"overall": 9.776, "Plants": 15.752},
           "lpips": {"overall": 0.721, "Plants": 0.693}}
    table = E.results_table([old])
    assert table.splitlines()[0] == "| Method | Plants FID↓ | Plants LPIPS↑ | overall FID↓ | overall LPIPS↑ |"
    assert "| FineDiffusion | 15.752 | 0.693 | 9.776 | 0.721 |" in table
    new = {"method": "DiT", "fid": {"overall": 9.5}, "sfid": 6.25, "is": 121.5, "precision": 0.75, "recall": 0.625}
    lines = E.results_table([old, new]).splitlines()
    assert lines[0].endswith("| overall LPIPS↑ | sFID↓ | IS↑ | Precision↑ | Recall↑ |")
    assert lines[2] == "| FineDiffusion | 15.752 | 0.693 | 9.776 | 0.721 | – | – | – | – |"
    assert lines[3] == "| DiT | – | – | 9.500 | – | 6.250 | 121.500 | 0.750 | 0.625 |"


# ---- The command line, end to end ----

def test_fid_and_tsne_from_the_command_line(toy_runs, tmp_path, capsys):
    """ref-stats of a folder tree, then fid of an .npz of the same images (FID 0 overall and per superclass) and of
    other images (FID > 0), with the fixture's random-weight FID Inception; then t-SNE of the toy checkpoint."""
    torch.save(fixture("inception_fid_random_fp16.pt")["state_dict"], tmp_path / "inception.pth")
    source = pathlib.Path(make_toy_dataset(str(toy_runs["root"] / "data"), image_size=16)) / "target"  # made already
    for superclass in sorted(os.listdir(source)):  # two images of every class: a small, quick reference
        for name in sorted(os.listdir(source / superclass)):
            os.makedirs(tmp_path / "ref" / superclass / name)
            for image in sorted(os.listdir(source / superclass / name))[:2]:
                shutil.copy(source / superclass / name / image, tmp_path / "ref" / superclass / name)
    common = ["--inception", str(tmp_path / "inception.pth"), "--image-size", "16", "--num-workers", "0",
              "--device", "cpu"]
    E.main(["ref-stats", "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.npz")] + common)
    reference = E.read_image_set(str(tmp_path / "ref"), image_size=16)
    images = np.stack([reference["images"].read(j) for j in range(len(reference["labels"]))])
    np.savez(tmp_path / "same.npz", arr_0=images, labels=reference["labels"],
             superclass_labels=reference["superclass_labels"], superclass_names=reference["superclass_names"])
    np.savez(tmp_path / "other.npz", arr_0=255 - images)  # no superclasses: FID overall alone (each FID is seconds)
    capsys.readouterr()
    results = {}
    for name in ("same", "other"):
        E.main(["fid", "--samples", str(tmp_path / f"{name}.npz"), "--ref", str(tmp_path / "ref.npz"),
                "--results", str(tmp_path / "results.json"), "--method", name] + common)
        results[name] = json.loads((tmp_path / "results.json").read_text())
    assert list(results["same"]) == ["method", "fid", "sfid", "is", "precision", "recall"]
    fids = {name: result["fid"] for name, result in results.items()}
    assert list(fids["same"]) == ["overall"] + reference["superclass_names"]
    assert all(abs(value) < 1e-3 for value in fids["same"].values()) and abs(results["same"]["sfid"]) < 1e-3
    assert results["same"]["precision"] == results["same"]["recall"] == 1
    assert list(fids["other"]) == ["overall"] and fids["other"]["overall"] > 1 and results["other"]["sfid"] > 1
    out = capsys.readouterr().out
    assert "FID overall: 0.000" in out and "sFID: 0.000" in out and "precision: 1.000" in out
    # ref-stats of the previous version (FID's statistics alone): FID and IS, and one line on what the rest need;
    # the results JSON keeps no sFID, precision or recall of the run before beside them
    with np.load(tmp_path / "ref.npz") as f:
        np.savez(tmp_path / "old.npz", names=f["names"], mu=f["mu"], sigma=f["sigma"])
    np.savez(tmp_path / "four.npz", arr_0=images[:4])
    E.main(["fid", "--samples", str(tmp_path / "four.npz"), "--ref", str(tmp_path / "old.npz"),
            "--results", str(tmp_path / "results.json")] + common)
    notes = [line for line in capsys.readouterr().out.splitlines() if "made by this version" in line]
    assert len(notes) == 1 and "sFID, precision, recall need a ref-stats made by this version" in notes[0]
    assert "python evaluate.py ref-stats" in notes[0]
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["method", "fid", "is"]
    np.savez(tmp_path / "three.npz", arr_0=images[:3])
    with pytest.raises(ValueError, match="3 images, and precision and recall need at least 4"):
        E.main(["fid", "--samples", str(tmp_path / "three.npz"), "--ref", str(tmp_path / "ref.npz")] + common)

    E.main(["tsne", "--checkpoint", toy_runs["checkpoint"], "--out", str(tmp_path / "tsne.png"), "--iterations",
            "100", "--size", "320", "240", "--device", "cpu"])
    image = Image.open(tmp_path / "tsne.png")
    assert image.size == (320, 240)
    present = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert all(color in present for color in E.superclass_colors(reference["superclass_names"]))
    assert E.superclass_colors(reference["superclass_names"]) == [toy_superclass_color(name)
                                                                  for name in reference["superclass_names"]]
    with pytest.raises((ValueError, FileNotFoundError), match="exists and is not overwritten"):  # before any slow work
        E.main(["ref-stats", "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.npz")] + common)

    # by default into the run folder; the plot fills the area left of the legend
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    E.main(["tsne", "--checkpoint", str(run_dir), "--iterations", "100", "--device", "cpu"])
    figure = np.asarray(Image.open(run_dir / "tsne.png").convert("RGB"))
    plot = figure[60:, : figure.shape[1] * 3 // 4]  # below the title, left of the legend
    ys, xs = np.nonzero((plot != 255).any(axis=2))
    assert np.ptp(xs) > 0.9 * plot.shape[1] and np.ptp(ys) > 0.9 * plot.shape[0]


# ---- the judge ----

@pytest.fixture(scope="module")
def taxa_judge(taxa):
    """The judge of the toy taxonomy's target split (conftest), and those images."""
    dataset, hierarchy = load_dataset("taxa", str(taxa["root"]), 32, "target", hflip=False)
    images = np.stack([dataset.read(j) for j in range(len(dataset.files))])
    return dict(path=taxa["judge"], images=images, labels=dataset.labels, hierarchy=hierarchy)


def score(taxa_judge, images, labels, tmp_path, name="s.npz", **extra):
    np.savez(tmp_path / name, arr_0=images, labels=labels, **extra)
    E.main(["score", "--judge", taxa_judge["path"], "--samples", str(tmp_path / name), "--device", "cpu",
            "--results", str(tmp_path / "r.json")])
    return json.loads((tmp_path / "r.json").read_text())["judge"]


def test_the_judge_tells_the_toy_taxonomy_apart_and_shuffled_labels_score_at_chance(taxa_judge, tmp_path):
    _, contents = E.load_judge(taxa_judge["path"])
    assert list(contents["held_out"]) == ["fine", "genus", "superclass"]
    assert contents["held_out"]["fine"] >= 0.95 and contents["data"]["held_out_images"] == 120 * 32 // 8
    images, labels = taxa_judge["images"], taxa_judge["labels"]
    test = E.held_out(labels)
    real = score(taxa_judge, images[test], labels[test], tmp_path)
    assert real["accuracy"] == pytest.approx(contents["held_out"]) and real["real"] == contents["held_out"]
    assert real["chance"] == pytest.approx(dict(fine=1 / 120, genus=1 / 20, superclass=1 / 5))  # balanced classes
    shuffled = score(taxa_judge, images[test], np.random.default_rng(0).permutation(labels[test]), tmp_path)
    for rank in ("fine", "genus", "superclass"):  # 480 images: chance +- 4 standard deviations at the most
        sd = math.sqrt(real["chance"][rank] * (1 - real["chance"][rank]) / test.sum())
        assert abs(shuffled["accuracy"][rank] - real["chance"][rank]) < 4 * sd, rank
    # every real image: the judge's features of real images are the reference, so FD 0 and diversity 1
    everything = score(taxa_judge, images, labels, tmp_path, class_names=np.array(taxa_judge["hierarchy"].class_names))
    assert everything["fd"]["overall"] == pytest.approx(0, abs=1e-6) and everything["diversity"] == pytest.approx(1)
    assert set(everything["fd"]) == {"overall"} | set(taxa_judge["hierarchy"].superclass_names)
    # one image per class, repeated: no spread within a class
    first = np.unique(labels, return_index=True)[1]
    copies = score(taxa_judge, images[np.repeat(first, 2)], labels[np.repeat(first, 2)], tmp_path)
    assert copies["diversity"] == pytest.approx(0, abs=1e-9) and copies["accuracy"]["superclass"] == 1


def test_a_folder_of_pngs_scores_as_its_npz(taxa_judge, tmp_path):
    images, labels = taxa_judge["images"], taxa_judge["labels"]
    rows = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(120)]).reshape(120, 2).T.reshape(-1)
    (tmp_path / "pngs").mkdir()
    for i, row in enumerate(rows):  # as sample.py writes them: image i is of class i mod 120
        Image.fromarray(images[row]).save(tmp_path / "pngs" / f"{i:06d}.png")
    E.main(["score", "--judge", taxa_judge["path"], "--samples", str(tmp_path / "pngs"), "--results",
            str(tmp_path / "a.json")])
    from_pngs = json.loads((tmp_path / "a.json").read_text())["judge"]
    assert from_pngs == score(taxa_judge, images[rows], labels[rows], tmp_path)
