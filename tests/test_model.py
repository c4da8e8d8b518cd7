"""DiT and TieredEmbedder against the official implementations' golden outputs and checkpoint manifests."""
import pytest
import torch

from conftest import fixture, rel_err
from model import DIT_CONFIGS, DiT, describe_dit, load_dit_weights


def dit_from_fixture(f):
    """Build the fixture's model from its own config and load its weights (eval mode, as recorded)."""
    cfg = dict(f["config"])
    num_superclasses = cfg.pop("num_super_classes", 0)
    parents = None
    if num_superclasses:  # the official FineDiffusion table: fine rows then superclass rows, no null row
        parents = torch.arange(cfg["num_classes"]) % num_superclasses
    model = DiT(**cfg, learn_sigma=f.get("learn_sigma", True), num_superclasses=num_superclasses,
                class_to_superclass=parents, null_row=not num_superclasses, norm_affine=bool(num_superclasses))
    return load_dit_weights(model, f["state_dict"]).eval()


def test_dit_forward_matches_official():
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    with torch.no_grad():
        assert rel_err(model(f["x"], f["t"], f["y"]), f["out"]) <= 1e-4


def test_dit_three_channel_guidance_matches_official():
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    with torch.no_grad():
        out = model.forward_with_cfg(f["cfg_x"], f["cfg_t"], f["cfg_y"], f["cfg_scale"], guided_channels=3)
    assert rel_err(out, f["cfg_out_first3channels"]) <= 1e-4


def test_guidance_on_all_eps_channels_is_eq1():
    """Default guidance applies Eq. 1 to every eps channel; variance channels stay each row's own."""
    f = fixture("dit_tiny.pt")
    model = dit_from_fixture(f)
    x, t, y, w = f["cfg_x"], f["cfg_t"], f["cfg_y"], f["cfg_scale"]
    n, c = len(x) // 2, model.in_channels
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, w)
        plain = model(torch.cat([x[:n], x[:n]]), t, y)
    expected = plain[n:, :c] + w * (plain[:n, :c] - plain[n:, :c])
    assert torch.allclose(out[:n, :c], expected, atol=1e-5) and torch.equal(out[:n, :c], out[n:, :c])
    assert torch.equal(out[:, c:], plain[:, c:])


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
    state_dict["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError) as err:
        load_dit_weights(DiT(**f["config"]), state_dict, source="tiny.pt")
    assert "blocks.1.attn.proj.weight" in str(err.value) and "(64, 32)" in str(err.value)
    with pytest.raises(ValueError) as err:  # a 1000-class table into a 5-class model
        load_dit_weights(DiT(**{**f["config"], "num_classes": 5}), f["state_dict"])
    assert "y_embedder.embedding_table.weight" in str(err.value) and "11 label rows" in str(err.value)


def test_xl2_file_description():
    with torch.device("meta"):
        model = DiT(input_size=64, **DIT_CONFIGS["DiT-XL/2"])
    text = describe_dit(model.state_dict())
    assert text.startswith("DiT-XL/2") and "--image-size 512" in text and "1001 label rows" in text


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
