"""sample.py: determinism, what guidance does, class names, a moved base, official checkpoints in latent space with
the official three-channel guidance, and bulk sampling under torchrun."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample
from checkpoint import find_checkpoint, load_model, read_checkpoint, read_label_table, save_checkpoint
from conftest import ROOT, fixture, write_tiny_vae
import data
from data import Hierarchy
from model import DIT_CONFIGS, DiT
from checkpoint import LABEL_TABLE_KEY


def run(ckpt, tmp_path, *extra):
    """sample.py on `ckpt` (4 images, 5 steps) -> the grid it wrote, as an array."""
    out = str(tmp_path / f"grid{len(os.listdir(tmp_path))}.png")
    sample.main(sample.parse_args(["--ckpt", ckpt, "--n", "4", "--num-sampling-steps", "5", "--out", out, *extra]))
    return np.asarray(Image.open(out)).astype(int)


def test_same_seed_same_images(toy_runs, tmp_path):
    first = run(toy_runs["checkpoint"], tmp_path, "--class", "3", "--seed", "1")
    assert np.array_equal(first, run(toy_runs["checkpoint"], tmp_path, "--class", "3", "--seed", "1"))
    assert not np.array_equal(first, run(toy_runs["checkpoint"], tmp_path, "--class", "3", "--seed", "2"))
    assert first.shape == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2), 3)  # a 2x2 grid of 16 px images


def test_a_grid_larger_than_a_batch_is_sampled_in_parts(toy_runs, tmp_path, official_files):
    """--batch-size splits the sampling of a grid, not its noise: a deterministic sampler draws the same images in
    parts of 3 as in one batch. --class all on a model of more classes than a grid can show is refused."""
    whole = run(toy_runs["checkpoint"], tmp_path, "--class", "all", "--sampler", "ddim")
    assert np.abs(run(toy_runs["checkpoint"], tmp_path, "--class", "all", "--sampler", "ddim", "--batch-size",
                      "3") - whole).max() <= 1
    classes = official_files["official"].y_embedder.num_classes
    with pytest.raises((ValueError, FileNotFoundError), match=rf"this model has {classes:,} classes \(a grid takes at most 100\)"):
        run(str(official_files["root"] / "DiT-S-8.pt"), tmp_path, "--class", "all", "--vae", official_files["vae"])


def test_class_by_name_and_bad_inputs(toy_runs, tmp_path):
    names = read_checkpoint(toy_runs["checkpoint"]).hierarchy["class_names"]
    by_name = run(toy_runs["checkpoint"], tmp_path, "--class", names[3].upper(), "--seed", "1")
    assert np.array_equal(by_name, run(toy_runs["checkpoint"], tmp_path, "--class", "3", "--seed", "1"))
    with pytest.raises((ValueError, FileNotFoundError), match=rf"valid ids are 0\.\.{len(names) - 1}"):
        run(toy_runs["checkpoint"], tmp_path, "--class", str(len(names)))
    with pytest.raises((ValueError, FileNotFoundError), match=f"closest: .*{names[3]}"):
        run(toy_runs["checkpoint"], tmp_path, "--class", names[3][:-1] + "z")
    with pytest.raises((ValueError, FileNotFoundError), match="no null label row"):
        run(toy_runs["checkpoint"], tmp_path, "--class", "3", "--guidance", "cfg")


def test_moved_base_needs_and_takes_base(toy_runs, tmp_path):
    """A delta whose base has moved says to pass --base; with it, the same network as before the move."""
    moved = shutil.copytree(os.path.dirname(os.path.dirname(toy_runs["base"])), tmp_path / "moved-base")
    delta = str(tmp_path / "delta.pt")
    checkpoint = read_checkpoint(toy_runs["checkpoint"])
    checkpoint.base = dict(checkpoint.base, path=str(tmp_path / "gone.pt"))  # as if the base had moved
    save_checkpoint(delta, checkpoint)
    with pytest.raises(FileNotFoundError, match="sample.py --base"):
        run(delta, tmp_path, "--class", "2")
    run(delta, tmp_path, "--class", "2", "--base", str(moved / "checkpoints" / "0000003.pt"))
    before = load_model(toy_runs["checkpoint"])[0]
    after = load_model(delta, str(moved / "checkpoints" / "0000003.pt"))[0]
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        assert torch.equal(before.eval()(x, t, y), after.eval()(x, t, y))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """An official DiT file (raw state dict) and an official FineDiffusion training checkpoint ({"model", "ema"},
    affine LayerNorms, fine + superclass rows, no null row), both DiT-S/8 in the latent space of the tiny VAE, with
    non-trivial weights everywhere (adaLN-zero layers included) so that guidance has something to change."""
    root = tmp_path_factory.mktemp("official")
    vae_config = fixture("vae_tiny.pt")["config"]
    # 8x8 latents of the fixture's VAE: its channels, and images 2^(levels - 1) times as large
    channels, px = vae_config["latent_channels"], 8 * 2 ** (len(vae_config["block_out_channels"]) - 1)
    torch.manual_seed(0)
    official = DiT(input_size=8, in_channels=channels, num_classes=1000, **DIT_CONFIGS["DiT-S/8"]).eval()
    hierarchy = Hierarchy(["a", "b", "c", "d", "e"], ["P", "Q"], [0, 0, 1, 1, 1])
    hierarchy.to_json(str(root / "classes.json"))
    tiered = DiT(input_size=8, num_classes=5, num_superclasses=2, class_to_superclass=[0, 0, 1, 1, 1],
                 null_row=False, norm_affine=True, in_channels=channels, **DIT_CONFIGS["DiT-S/8"]).eval()
    with torch.no_grad():
        for p in list(official.parameters()) + list(tiered.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    torch.save(official.state_dict(), root / "DiT-S-8.pt")
    torch.save(dict(model=tiered.state_dict(), ema=tiered.state_dict()), root / "finediffusion.pt")
    return dict(root=root, official=official, tiered=tiered, vae=write_tiny_vae(root / "vae"), channels=channels,
                px=px)


def test_official_checkpoints_load_for_sampling(official_files):
    """Both load by their shapes; the FineDiffusion one needs --hierarchy for its split of rows."""
    root, x, t = official_files["root"], torch.randn(2, official_files["channels"], 8, 8), torch.tensor([10, 500])
    parents = Hierarchy.from_json(str(root / "classes.json")).class_to_superclass
    for file, reference, labels, classes in [("DiT-S-8.pt", official_files["official"], torch.tensor([1, 1000]), None),
                                             ("finediffusion.pt", official_files["tiered"], torch.tensor([4, 6]),
                                              parents)]:
        model = load_model(str(root / file), class_to_superclass=classes)[0]
        with torch.no_grad():
            assert torch.equal(model.eval()(x, t, labels), reference(x, t, labels))
    with pytest.raises(ValueError, match="its class list is needed"):
        load_model(str(root / "finediffusion.pt"))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_guidance_scale_one_is_the_conditional_model(official_files, tmp_path, sampler):
    """Eq. 1 at w = 1 is eps(x_t | c) itself: with a deterministic sampler the images equal unguided ones (up to
    rounding to uint8); at w = 4 the superclass pushes them away."""
    ckpt = str(official_files["root"] / "finediffusion.pt")
    common = ("--class", "3", "--seed", "1", "--sampler", sampler, "--vae", official_files["vae"],
              "--hierarchy", str(official_files["root"] / "classes.json"))
    unguided = run(ckpt, tmp_path, *common, "--guidance", "none")
    at_one = run(ckpt, tmp_path, *common, "--guidance", "fine", "--cfg-scale", "1")
    at_four = run(ckpt, tmp_path, *common, "--guidance", "fine", "--cfg-scale", "4")
    assert np.abs(at_one - unguided).max() <= 1
    assert np.abs(at_four - unguided).max() > 8


def cells(grid, count, px, tmp_path, **labels):
    """The `count` images of a labelled grid, found where data.save_grid puts them (it enlarges small images by an
    integer zoom, undone here by taking every zoom-th pixel) -> (count, px, px, 3)."""
    corners = data.save_grid(np.zeros((count, px, px, 3), np.uint8), str(tmp_path / "layout.png"), **labels)
    zoom = -(-48 // px)
    return np.stack([grid[y: y + px * zoom: zoom, x: x + px * zoom: zoom] for x, y in corners])


def test_every_class_in_one_grid(official_files, tmp_path):
    """--class all: a row per class, named, --n columns; row c is what --class c draws from the same noise."""
    common = ("--seed", "2", "--sampler", "dpm++", "--vae", official_files["vae"],
              "--hierarchy", str(official_files["root"] / "classes.json"))
    ckpt = str(official_files["root"] / "finediffusion.pt")
    names = Hierarchy.from_json(str(official_files["root"] / "classes.json")).class_names
    grid = cells(run(ckpt, tmp_path, "--class", "all", *common), 4 * len(names), official_files["px"], tmp_path,
                 cols=4, row_names=names)
    first = run(ckpt, tmp_path, "--class", "0", *common)
    px = official_files["px"]
    assert np.abs(grid[0] - first[2:2 + px, 2:2 + px]).max() <= 1


def test_guidances_side_by_side_after_the_training_images(toy_runs, tmp_path):
    """--guidance fine none --with-data: per class the first training images, then each guidance from the same
    noise as a run of that guidance alone."""
    checkpoint = read_checkpoint(toy_runs["checkpoint"])
    names = checkpoint.hierarchy["class_names"]
    grid = run(toy_runs["checkpoint"], tmp_path, "--class", "all", "--guidance", "fine", "none", "--with-data",
               "--seed", "4")
    px, n = 16, 4
    grid = cells(grid, 3 * n * len(names), px, tmp_path, cols=3 * n, row_names=names,
                 titles=["training images", "fine guidance, w=4", "no guidance"]).reshape(len(names), 3, n, px, px, 3)
    dataset, _ = data.load_dataset("toy", checkpoint.data["path"], px, split="target")
    for c in (0, len(names) - 1):
        assert np.array_equal(grid[c, 0, 0], dataset.read(int(np.flatnonzero(dataset.labels == c)[0])))
    for block, guidance in ((1, "fine"), (2, "none")):
        alone = cells(run(toy_runs["checkpoint"], tmp_path, "--class", "all", "--guidance", guidance, "--seed", "4"),
                      n * len(names), px, tmp_path, cols=n, row_names=names).reshape(len(names), n, px, px, 3)
        assert np.array_equal(grid[:, block], alone)
    with pytest.raises((ValueError, FileNotFoundError), match="exists and is not overwritten"):
        run(toy_runs["checkpoint"], tmp_path, "--class", "0", "--out", str(tmp_path / "grid0.png"))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_official_three_channels_from_the_command_line(official_files, tmp_path, sampler):
    """DiT's own sampler guides eps channels 0..2 only: on a 4-channel latent model that changes the images; at
    scale 1 guidance changes nothing on any channel, so the flag cannot either. (Ordinary CFG: the null row.)"""
    common = ("--class", "7", "--seed", "3", "--sampler", sampler, "--vae", official_files["vae"])
    ckpt = str(official_files["root"] / "DiT-S-8.pt")
    all_channels = run(ckpt, tmp_path, *common)
    three = run(ckpt, tmp_path, *common, "--official-three-channels")
    assert all_channels.shape == (2 + 2 * (official_files["px"] + 2),) * 2 + (3,)  # a 2x2 grid
    assert (np.abs(three - all_channels).max() > 8) == (official_files["channels"] > 3)  # 3 of 3: all of them
    at_one = [run(ckpt, tmp_path, *common, "--cfg-scale", "1", *flag) for flag in ((), ("--official-three-channels",))]
    assert np.abs(at_one[0] - at_one[1]).max() <= 1


def test_bulk_sampling_on_two_processes(toy_runs, tmp_path):
    """torchrun with 2 CPU processes writes every PNG and one .npz with the right labels, which evaluate.py reads."""
    out = tmp_path / "bulk"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "sample.py", "--ckpt", toy_runs["checkpoint"], "--num-samples", "13", "--batch-size", "4",
                             "--sampler", "dpm++", "--num-sampling-steps", "3", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    hierarchy = read_checkpoint(toy_runs["checkpoint"]).hierarchy
    with np.load(str(out) + ".npz") as npz:
        images, labels = npz["arr_0"], npz["labels"]
        assert images.shape == (13, 16, 16, 3) and images.dtype == np.uint8
        assert list(labels) == [i % len(hierarchy["class_names"]) for i in range(13)]
        assert list(npz["superclass_labels"]) == [hierarchy["class_to_superclass"][c] for c in labels]
    assert len(os.listdir(out)) == 13
    read = evaluate.read_image_set(str(out) + ".npz")
    assert np.array_equal(read["labels"], labels) and read["superclass_names"] == hierarchy["superclass_names"]


def test_list_classes_a_run_folder_and_a_superclass_name(toy_runs, tmp_path, capsys):
    """--list-classes filters by any name; a run folder stands for its newest checkpoint; a superclass given as a
    class says which classes it holds."""
    hierarchy = Hierarchy.from_dict(read_checkpoint(toy_runs["checkpoint"]).hierarchy)
    superclass = hierarchy.superclass_names[-1]
    members = [i for i, s in enumerate(hierarchy.class_to_superclass) if s == len(hierarchy.superclass_names) - 1]
    sample.main(sample.parse_args(["--ckpt", toy_runs["run_dir"], "--list-classes", superclass.upper()]))
    header, *listed = capsys.readouterr().out.strip().splitlines()
    assert header == f"classes of {find_checkpoint(toy_runs['run_dir'])} matching {superclass.upper()!r}:"
    assert [int(line.split()[0]) for line in listed] == members and all(f"[{superclass}]" in line for line in listed)
    with pytest.raises((ValueError, FileNotFoundError), match=f"'{superclass}' is a superclass of {len(members)} classes"):
        run(toy_runs["run_dir"], tmp_path, "--class", superclass)
    from_folder = load_model(find_checkpoint(toy_runs["run_dir"]))[0]
    from_file = load_model(toy_runs["checkpoint"])[0]
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), from_file.state_dict().values()))


def test_outputs_go_into_the_run_folder_and_never_overwrite(toy_runs, tmp_path):
    """Without --out, grids and bulk runs go to the run's samples/ folder; a second run gets the next free name."""
    run_dir = shutil.copytree(toy_runs["run_dir"], tmp_path / "run")
    for _ in range(2):
        sample.main(sample.parse_args(["--ckpt", str(run_dir), "--class", "1", "--n", "2", "--sampler", "dpm++",
                                       "--num-sampling-steps", "3"]))
        sample.main(sample.parse_args(["--ckpt", str(run_dir), "--num-samples", "2", "--sampler", "dpm++",
                                       "--num-sampling-steps", "3"]))
    assert sorted(os.listdir(run_dir / "samples")) == ["00001-fine-1.png", "00001-fine.png", "bulk", "bulk-1",
                                                       "bulk-1.npz", "bulk.npz"]


def test_raw_or_ema_weights(toy_runs, official_files, tmp_path):
    """--weights raw samples the trained values themselves, --weights ema their moving average: of our checkpoints
    (where after 4 steps at decay 0.9 they differ) and of official {model, ema} files alike; t-SNE reads either."""
    checkpoint = read_checkpoint(toy_runs["checkpoint"])
    models = {}
    for weights in ("ema", "raw"):
        models[weights] = load_model(toy_runs["checkpoint"], weights=weights)[0].state_dict()
        assert all(torch.equal(models[weights][name], tensor) for name, tensor in checkpoint.tensors(weights).items())
        table, _ = read_label_table(toy_runs["checkpoint"], weights)
        assert torch.equal(table, checkpoint.tensors(weights)[LABEL_TABLE_KEY])
    assert not torch.equal(models["ema"][LABEL_TABLE_KEY], models["raw"][LABEL_TABLE_KEY])
    grids = [run(toy_runs["checkpoint"], tmp_path, "--class", "2", "--sampler", "ddim", "--weights", w)
             for w in ("ema", "raw")]
    assert not np.array_equal(*grids)

    raw = {name: tensor + 0.01 for name, tensor in official_files["tiered"].state_dict().items()}
    torch.save(dict(model=raw, ema=official_files["tiered"].state_dict()), tmp_path / "official.pt")
    parents = Hierarchy.from_json(str(official_files["root"] / "classes.json")).class_to_superclass
    for weights, expected in (("ema", official_files["tiered"].state_dict()), ("raw", raw)):
        loaded = load_model(str(tmp_path / "official.pt"), class_to_superclass=parents, weights=weights)[0].state_dict()
        assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
