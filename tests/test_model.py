"""DiT and TieredEmbedder against the official implementations' golden outputs and checkpoint manifests; loading a
DiT of any shape from what its file holds."""
import pytest
import torch

from checkpoint import describe_dit, dit_name, load_dit, load_dit_weights, read_dit_shape
from conftest import dit_from_fixture, fixture, rel_err, write_safetensors
from diffusion import guided, sample
from model import DIT_CONFIGS, DiT


def test_dit_forward_matches_official():
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    with torch.no_grad():
        assert rel_err(model(f["x"], f["t"], f["y"]), f["out"]) <= 1e-4


def test_dit_three_channel_guidance_matches_official():
    """The official forward_with_cfg: a doubled batch whose second half carries the rows guided away from."""
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    n = len(f["cfg_x"]) // 2
    model_fn = guided(model, f["cfg_y"][:n], f["cfg_y"][n:], f["cfg_scale"], guided_channels=3)
    with torch.no_grad():
        out = model_fn(f["cfg_x"], f["cfg_t"])
    assert rel_err(out, f["cfg_out_first3channels"]) <= 1e-4


def test_guidance_on_all_eps_channels_is_eq1():
    """Default guidance applies Eq. 1 to every eps channel; variance channels stay each row's own."""
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    x, t, y, w = f["cfg_x"], f["cfg_t"], f["cfg_y"], f["cfg_scale"]
    n, c = len(x) // 2, model.in_channels
    model_fn = guided(model, y[:n], y[n:], w)
    with torch.no_grad():
        out = model_fn(x, t)
        plain = model(torch.cat([x[:n], x[:n]]), t, y)
    expected = plain[n:, :c] + w * (plain[:n, :c] - plain[n:, :c])
    assert torch.allclose(out[:n, :c], expected, atol=1e-5) and torch.equal(out[:n, :c], out[n:, :c])
    assert torch.equal(out[:, c:], plain[:, c:])


def test_guidance_kinds_pick_the_right_parent_rows():
    """fine: each class's own superclass row; cfg: the null row; none: the plain model on an undoubled batch; the
    default: fine for a table with superclass rows, else cfg."""
    parents = [2, 0, 1, 1, 0]
    model = DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5, num_superclasses=3,
                class_to_superclass=parents, null_row=True).eval()
    plain = DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5).eval()
    seen = []
    for m in (model, plain):
        m.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    labels, z = torch.tensor([0, 1, 2, 3, 4]), torch.randn(5, 4, 4, 4)
    with torch.no_grad():
        for m, guidance, rows in [(model, "fine", 5 + torch.tensor(parents)), (model, "cfg", torch.full((5,), 8)),
                                  (model, None, 5 + torch.tensor(parents)), (plain, None, torch.full((5,), 5))]:
            x = sample(m, z, labels, guidance, sampler="ddim", steps=2, progress=False)
            assert x.shape == z.shape and torch.equal(seen[-1], torch.cat([labels, rows]))
        out = sample(model, z, labels, "none", sampler="dpm++", steps=1, progress=False)
        assert torch.equal(seen[-1], labels) and torch.equal(out, sample(model, z, labels, "none", sampler="dpm++",
                                                                         steps=1, progress=False))
    with pytest.raises(ValueError, match="use cfg or none"):
        sample(plain, z, labels, "fine", progress=False)


def test_official_finediffusion_forward():
    f = fixture("finediffusion_official_tiny.pt")
    model = dit_from_fixture(f)
    with torch.no_grad():
        assert rel_err(model(f["x"], f["t"], f["y"]), f["out"]) <= 1e-4


@pytest.mark.parametrize("name", list(fixture("dit_manifests.json")))
def test_official_checkpoint_manifests(name):
    """Our DiT has exactly the official checkpoints' keys and shapes (built on meta: no memory, no time)."""
    entry = fixture("dit_manifests.json")[name]
    model_name, image_size = name.split("@")
    with torch.device("meta"):
        model = DiT(input_size=int(image_size) // 8, num_classes=1000, **DIT_CONFIGS[model_name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == entry["manifest"]
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]


def test_pos_embed_is_the_official_fixed_embedding():
    f = fixture("dit_tiny.pt")
    fresh = DiT(**f["config"])
    assert rel_err(fresh.pos_embed, f["state_dict"]["pos_embed"]) <= 1e-6


def test_wrong_shape_error_names_key_and_what_the_file_fits():
    f = fixture("dit_tiny.pt")
    state_dict = dict(f["state_dict"])
    key = f"blocks.{f['config']['depth'] - 1}.attn.proj.weight"
    proj = state_dict[key]
    state_dict[key] = torch.zeros(proj.shape[0], proj.shape[1] // 2)
    with pytest.raises(ValueError) as err:
        load_dit_weights(DiT(**f["config"]), state_dict, source="tiny.pt")
    assert key in str(err.value)
    assert str((proj.shape[0], proj.shape[1] // 2)) in str(err.value)
    rows = f["state_dict"]["y_embedder.embedding_table.weight"].shape[0]
    with pytest.raises(ValueError) as err:  # the file's table into a model with another number of classes
        load_dit_weights(DiT(**{**f["config"], "num_classes": rows + 3}), f["state_dict"])
    assert "y_embedder.embedding_table.weight" in str(err.value) and f"{rows} label rows" in str(err.value)


def test_xl2_file_description():
    with torch.device("meta"):
        model = DiT(input_size=64, **DIT_CONFIGS["DiT-XL/2"])
    text = describe_dit(read_dit_shape(model.state_dict()))
    assert text.startswith("DiT-XL/2") and "512 px images" in text and "1001 label rows" in text


def test_load_dit_builds_what_the_file_holds(tmp_path):
    """Any shape, from the file alone: the fixture's DiT as .pt and .safetensors, and a DiT of a shape no named
    configuration has (depth 6, width 256, patch 4); heads by the stated rule unless given."""
    f = fixture("dit_tiny.pt")
    torch.save(f["state_dict"], tmp_path / "tiny.pt")
    write_safetensors(f["state_dict"], tmp_path / "tiny.safetensors")
    for path in ("tiny.pt", "tiny.safetensors"):
        model = load_dit(str(tmp_path / path), num_heads=f["config"]["num_heads"]).eval()
        assert {k: model.config[k] for k in f["config"]} == f["config"]
        with torch.no_grad():
            assert rel_err(model(f["x"], f["t"], f["y"]), f["out"]) <= 1e-4
    other = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=256, depth=6, num_heads=4, num_classes=7)
    torch.save(dict(model=other.state_dict(), ema=other.state_dict()), tmp_path / "other.pt")
    loaded = load_dit(str(tmp_path / "other.pt"))
    assert loaded.config == other.config and dit_name(loaded.config) is None
    resized = load_dit(str(tmp_path / "other.pt"), input_size=32)  # DiffFit's trick: positions (i/2, j/2)
    assert resized.pos_embed_scale == 0.5
    assert torch.equal(resized.pos_embed.reshape(8, 8, -1)[::2, ::2].reshape(1, 16, -1), other.pos_embed)


def test_tiered_label_replacement():
    """A fine label becomes its superclass row with probability p; superclass rows are never replaced."""
    torch.manual_seed(0)
    parents = torch.tensor([0, 0, 1, 1, 2])
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=5,
                num_superclasses=3, class_to_superclass=parents, null_row=False)
    embedder = model.y_embedder
    labels = torch.randint(0, 5, (20000,))
    out = embedder.replace_by_parent(labels)
    replaced = out != labels
    assert torch.equal(out[replaced], 5 + parents[labels[replaced]])
    assert abs(replaced.float().mean().item() - 0.1) < 0.01
    supers = torch.full((100,), 6)
    assert torch.equal(embedder.replace_by_parent(supers), supers)
    assert embedder.embedding_table.num_embeddings == 8


def test_difffit_positional_trick():
    """512 px from a 256 px model (DiffFit): positions (i/2, j/2), so every other token keeps its 256 px code."""
    small = DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4)
    large = DiT(input_size=16, patch_size=2, hidden_size=64, depth=1, num_heads=4, pos_embed_scale=0.5)
    every_other = large.pos_embed.reshape(8, 8, 64)[::2, ::2].reshape(1, 16, 64)
    assert torch.equal(every_other, small.pos_embed)
    assert torch.equal(DiT(**small.config).resize(16).pos_embed, large.pos_embed)
