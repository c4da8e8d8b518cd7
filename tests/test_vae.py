"""The hand-written AutoencoderKL against diffusers' golden outputs, and the checkpoint file readers."""
import json
import struct

import pytest
import torch

from checkpoint import load_state_dict_file, load_vae, load_vae_state_dict, read_safetensors
from conftest import fixture, rel_err, write_safetensors
from model import AutoencoderKL


@pytest.fixture(scope="module")
def ref():
    return fixture("vae_tiny.pt")


def assert_matches_reference(vae, ref):
    with torch.no_grad():
        posterior = vae.encode(ref["image"])
        decoded = vae.decode(ref["latent"])
    assert rel_err(posterior.mean, ref["posterior_mean"]) <= 1e-4
    assert rel_err(posterior.std, ref["posterior_std"]) <= 1e-4
    assert rel_err(decoded, ref["decoded"]) <= 1e-4


# ---- the model against diffusers ----

@pytest.mark.parametrize("names", ["state_dict", "state_dict_legacy_names"])
def test_tiny_vae_matches_diffusers(ref, names):
    vae = AutoencoderKL.from_config(ref["config"]).eval()
    load_vae_state_dict(vae, ref[names])
    assert_matches_reference(vae, ref)
    assert vae.scaling_factor == ref["scaling_factor"]


def test_posterior_sample_is_mean_plus_std_times_seeded_noise(ref):
    vae = AutoencoderKL.from_config(ref["config"]).eval()
    load_vae_state_dict(vae, ref["state_dict"])
    with torch.no_grad():
        posterior = vae.encode(ref["image"])
    z = posterior.sample(torch.Generator().manual_seed(0))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, posterior.mean + posterior.std * eps)
    assert not torch.allclose(z, posterior.sample(torch.Generator().manual_seed(1)))
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_sd_vae_has_the_real_checkpoint_keys_and_shapes():
    manifest = fixture("sd_vae_manifest.json")
    with torch.device("meta"):
        vae = AutoencoderKL()
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == manifest["manifest"]
    assert sum(p.numel() for p in vae.parameters()) == manifest["n_params"]


# ---- loading from files ----

def test_load_vae_from_diffusers_files(ref, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ref["config"]))
    write_safetensors(ref["state_dict"], tmp_path / "diffusion_pytorch_model.safetensors")
    for path in (tmp_path, tmp_path / "diffusion_pytorch_model.safetensors"):  # folder, then the file itself
        vae = load_vae(str(path))
        assert not vae.training
        assert_matches_reference(vae, ref)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(json.dumps(ref["config"]))
    torch.save(ref["state_dict_legacy_names"], bin_dir / "diffusion_pytorch_model.bin")
    assert_matches_reference(load_vae(str(bin_dir)), ref)


def test_vae_state_dict_errors_name_the_keys(ref, tmp_path):
    vae = AutoencoderKL.from_config(ref["config"])
    bad = dict(ref["state_dict"])
    bad["decoder.conv_out.weight"] = bad["decoder.conv_out.weight"][:, :, :1]
    del bad["quant_conv.bias"]
    bad["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_vae_state_dict(vae, bad)
    for key in ("decoder.conv_out.weight", "quant_conv.bias", "encoder.extra.weight"):
        assert key in str(err.value)
    assert "huggingface.co/stabilityai/sd-vae-ft-" in str(err.value)
    # a tiny checkpoint without its config.json is checked against the SD architecture and refused
    write_safetensors(ref["state_dict"], tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="mis-shaped keys"):
        load_vae(str(tmp_path / "vae.safetensors"))
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-mse"):
        load_vae(str(tmp_path / "missing"))


# ---- safetensors ----

def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (3,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 2), dtype=torch.int32, generator=g),
        "i16": torch.randint(-2**15, 2**15 - 1, (7,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (3,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 5, generator=g).t(),  # non-contiguous input
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    assert torch.equal(load_state_dict_file(str(path))["bf16"], tensors["bf16"])


def test_safetensors_byte_layout(tmp_path):
    # bytes composed by hand from the format description, independently of our writer
    header = json.dumps({"__metadata__": {"k": "v"},
                         "b": {"dtype": "I16", "shape": [], "data_offsets": [8, 10]},
                         "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "hand.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2fh", 1.5, -2.0, -7))
    back = read_safetensors(tmp_path / "hand.safetensors")
    assert torch.equal(back["a"], torch.tensor([1.5, -2.0])) and torch.equal(back["b"], torch.tensor(-7, dtype=torch.int16))
    # and our writer's bytes: size field, JSON header (padded to 8 bytes), raw little-endian data
    write_safetensors({"a": torch.tensor([1.5, -2.0])}, tmp_path / "ours.safetensors")
    blob = (tmp_path / "ours.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and json.loads(blob[8:8 + n]) == {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert blob[8 + n:] == struct.pack("<2f", 1.5, -2.0)


def test_safetensors_rejects_broken_files(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors({"w": torch.arange(10.0), "v": torch.ones(3, dtype=torch.int64)}, path)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    cases = {
        "truncated data": (blob[:-4], "outside the"),
        "truncated header": (blob[:8 + n // 2], "truncated"),
        "no header size": (blob[:5], "8-byte header size"),
        "garbage header": (blob[:8] + b"{not json" + blob[17:], "not valid JSON"),
        "wrong size": (blob.replace(b"[10]", b"[11]"), "'w' has 40 bytes"),
        "unknown dtype": (blob.replace(b'"I64"', b'"X64"'), "bad header entry for 'v'"),
    }
    for case, (data, message) in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_safetensors(path)
