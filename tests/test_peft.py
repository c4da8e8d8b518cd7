"""Fine-tuning methods: exact parameter counts, what trains, what a fresh model promises, merging."""
import pytest
import torch

from conftest import dit_from_fixture, fixture
from model import DIT_CONFIGS, DiT
from peft import METHODS, merge, parameter_table, prepare, trainable_state_dict

PARENTS = [0, 0, 1, 1, 1, 2]  # target set: 6 fine classes in 3 superclasses


def xl2_counts():
    """Hand-derived DiT-XL/2 @256 counts (depth 28, D 1152, patch 2, 4->8 channels, 10,000 classes, 11 super)."""
    D, L, C, S = 1152, 28, 10000, 11
    block_weights = D * 3 * D + D * D + D * 4 * D + 4 * D * D + D * 6 * D  # qkv, proj, fc1, fc2, adaLN
    block_biases = 3 * D + D + 4 * D + D + 6 * D
    final_weights, final_biases = D * 2 * 2 * 8 + D * 2 * D, 2 * 2 * 8 + 2 * D
    stem_weights = 4 * 2 * 2 * D + 256 * D + D * D  # x_embedder conv, t_embedder mlp
    stem_biases = D + D + D
    biases = L * block_biases + final_biases + stem_biases
    weights = L * block_weights + final_weights + stem_weights
    pos_embed = 256 * D
    base = weights + biases + pos_embed  # without a label table
    norms = (2 * L + 1) * 2 * D  # affine LayerNorms: norm1, norm2 per block + norm_final, scale and offset
    table_null, table_tiered = (C + 1) * D, (C + S) * D
    gammas = 14 * 2 * D + L * 3 * D + 2 * 2 * 8  # blocks 1..14 attn+mlp, every qkv, final linear outputs
    lora = L * 8 * ((D + 3 * D) + (D + D))  # r=8: A (r x in) + B (out x r) on qkv and proj
    affiner = lambda n, m: 2 * m + 1 + 64 * n + m * 64  # a, b, s, W_down, W_up
    diffscaler = L * (affiner(D, 3 * D) + affiner(D, D) + affiner(D, 4 * D) + affiner(4 * D, D)
                      + affiner(D, 6 * D)) + affiner(D, 2 * D)
    return {
        "full": (base + table_null, base - pos_embed + table_null),
        "bitfit": (base + table_null, biases + table_null),
        "difffit": (base + table_null + gammas, biases + table_null + gammas),
        "finediffusion": (base + table_tiered + norms, biases + table_tiered + norms),
        "lora": (base + table_null + lora, table_null + lora),
        "diffscaler": (base + table_null + diffscaler, table_null + diffscaler),
    }


def test_xl2_parameter_counts():
    expected = xl2_counts()
    rows = {row[0]: row for row in parameter_table(dict(DIT_CONFIGS["DiT-XL/2"], input_size=32),
                                                   [c % 11 for c in range(10000)])}
    assert rows["finediffusion"][1:3] == (685_640_480, 12_153_632)  # FineDiffusion Table 2: 1.77%
    assert round(rows["finediffusion"][3], 2) == 1.77
    for method in METHODS:
        assert rows[method][1:3] == expected[method], method


def test_finediffusion_delta_is_under_two_percent_of_the_checkpoint():
    with torch.device("meta"):
        base = DiT(input_size=32, num_classes=1000, **DIT_CONFIGS["DiT-XL/2"])
    full_bytes = sum(t.numel() * 4 for t in base.state_dict().values())  # the official fp32 .pt
    with torch.device("meta"):
        model = prepare(base, "finediffusion", [c % 11 for c in range(10000)])
    delta_bytes = sum(t.numel() * 4 for t in trainable_state_dict(model).values())
    assert delta_bytes / full_bytes < 0.02


def fresh(method):
    f = fixture("dit_tiny.pt")
    return f, prepare(dit_from_fixture(f), method, PARENTS)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_exactly_the_trainable_tensors(method):
    f, model = fresh(method)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    labels = torch.arange(model.y_embedder.embedding_table.num_embeddings)  # every row: fine, superclass or null
    x = torch.randn(len(labels), *f["x"].shape[1:], generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two steps: LoRA's A and the Affiner branch get gradients once B / s are non-zero
        loss = model(x, torch.full((len(labels),), 500), labels).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, value in model.state_dict().items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{method}: trainable {name} did not change"
        else:
            assert torch.equal(value, before[name]), f"{method}: frozen {name} changed"


@pytest.mark.parametrize("method", ["bitfit", "difffit", "lora", "diffscaler", "full"])
def test_fresh_model_keeps_the_base_unconditional_output(method):
    """gammas 1, LoRA B 0, Affiner a, b, s 0, and the pretrained null row: the base model, unchanged."""
    f, model = fresh(method)
    base = dit_from_fixture(f)
    null_new, null_old = model.y_embedder.null_index, base.y_embedder.null_index
    with torch.no_grad():
        ours = model.eval()(f["x"], f["t"], torch.full_like(f["y"], null_new))
        ref = base(f["x"], f["t"], torch.full_like(f["y"], null_old))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_fresh_finediffusion_and_diffscaler_promises():
    """Identity LayerNorms keep the function; DiffScaler's new classes start as the null embedding."""
    f, model = fresh("finediffusion")
    base = dit_from_fixture(f)
    with torch.no_grad():  # give the base's row 0 the embedding of FineDiffusion's superclass row 6
        base.y_embedder.embedding_table.weight[0] = model.y_embedder.embedding_table.weight[6]
        ours = model.eval()(f["x"], f["t"], torch.full_like(f["y"], 6))
        same_embedding = base(f["x"], f["t"], torch.zeros_like(f["y"]))
        null = base(f["x"], f["t"], torch.full_like(f["y"], base.y_embedder.null_index))
    torch.testing.assert_close(ours, same_embedding, rtol=0, atol=1e-6)
    f, model = fresh("diffscaler")
    with torch.no_grad():
        new_classes = model.eval()(f["x"], f["t"], torch.tensor(range(len(PARENTS)))[: len(f["x"])])
    torch.testing.assert_close(new_classes, null[: len(new_classes)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["difffit", "lora", "diffscaler"])
def test_merged_equals_unmerged(method):
    f, model = fresh(method)
    with torch.no_grad():  # move every added parameter away from its neutral start
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        model.eval()
        labels = torch.arange(len(f["x"])) * 2 % model.y_embedder.embedding_table.num_embeddings
        unmerged = model(f["x"], f["t"], labels)
        merged = merge(model)(f["x"], f["t"], labels)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()).item() <= 1e-5
    names = dict(merged=set(model.state_dict()), official=set(fixture("dit_tiny.pt")["state_dict"]))
    if method != "diffscaler":  # the Affiner's ReLU branch is not linear and stays
        assert names["merged"] == names["official"]


def test_unknown_method_and_missing_hierarchy():
    f = fixture("dit_tiny.pt")
    with pytest.raises(ValueError, match="choose one of"):
        prepare(dit_from_fixture(f), "adapter", PARENTS)
    with pytest.raises(ValueError, match="hierarchy"):
        prepare(dit_from_fixture(f), "finediffusion", [0] * len(PARENTS), num_superclasses=0)
    with pytest.raises(ValueError, match="no option"):
        prepare(dit_from_fixture(f), "bitfit", PARENTS, lora_rank=4)
