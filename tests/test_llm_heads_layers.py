"""Attention heads and blocks: importance, removal equal to the masked model, reload by transformers."""

import math

import pytest
import torch

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.llm import heads as H  # noqa: E402
from prunekit.llm import hf  # noqa: E402
from prunekit.llm import layers as L  # noqa: E402
from prunekit.llm.models import ARCHITECTURES, tiny_model  # noqa: E402


def _out(model, ids):
    with torch.no_grad():
        result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _gates(attns, remove):
    gates = []
    for a in attns:
        g = torch.ones(a.num_heads)
        g[remove.get(a.block, [])] = 0
        gates.append(g)
    return gates


def _removal(a):
    """Block 0: a whole key/value group (or one head); block 1: the first head of every group."""
    g = a.group_size
    return {0: list(range(g, 2 * g)), 1: [j * g for j in range(a.num_kv_heads)] if g > 1 else [0, 2]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_removal_equals_masked_heads_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    ids = pk.llm.random_calibration(256, 2, 12)
    attns = H.attention_layers(model)
    remove = _removal(attns[0])
    counts = [a.num_heads for a in attns]
    with torch.no_grad(), H.mask_heads(model, _gates(attns, remove)):
        masked = _out(model, ids)
    dense_params = sum(p.numel() for p in model.parameters())
    H.remove_heads(model, remove)
    torch.testing.assert_close(_out(model, ids), masked, rtol=1e-5, atol=1e-6)
    after = H.attention_layers(model)
    assert [a.num_heads for a in after] == [counts[0] - len(remove[0]), counts[1] - len(remove[1])]
    assert sum(p.numel() for p in model.parameters()) < dense_params
    assert model.config.prunekit_attention["num_heads"] == [a.num_heads for a in after]
    hf.save_pretrained(model, tmp_path)
    reloaded = hf.load_model(tmp_path)  # rebuilds the per-block head counts
    torch.testing.assert_close(_out(reloaded, ids), masked, rtol=1e-5, atol=1e-6)


def test_masked_head_equals_zeroed_output_projection_columns():
    # The masked equivalent in prunekit terms: a mask on the o_proj columns of the head.
    model = tiny_model("llama")
    ids = pk.llm.random_calibration(256, 2, 12)
    attns = H.attention_layers(model)
    with torch.no_grad(), H.mask_heads(model, _gates(attns, {0: [3]})):
        gated = _out(model, ids)
    mask = torch.ones_like(attns[0].o.weight, dtype=torch.bool)
    d = attns[0].head_dim
    mask[:, 3 * d : 4 * d] = False
    pk.masking.attach(model, "model.layers.0.self_attn.o_proj.weight", mask)
    torch.testing.assert_close(_out(model, ids), gated)


@pytest.mark.parametrize("arch,amount,heads", [("mistral", 0.25, 6), ("qwen2", 0.25, 6), ("llama", 0.5, 4)])
def test_uniform_head_removal_reloads_with_plain_from_pretrained(arch, amount, heads, tmp_path):
    # Llama's config refuses hidden_size % num_attention_heads != 0, so 8 -> 6 heads needs load_pretrained
    # (tested above); 8 -> 4 heads is expressible.
    model = tiny_model(arch)
    ids = pk.llm.random_calibration(256, 2, 12)
    removed = H.prune_heads(model, amount=amount, method="magnitude", scope="uniform")
    assert all(len(r) == 8 - heads for r in removed.values())  # whole groups of 2 query heads per block
    assert model.config.num_attention_heads == heads and model.config.num_key_value_heads == heads // 2
    expected = _out(model, ids)
    hf.save_pretrained(model, tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    torch.testing.assert_close(_out(reloaded, ids), expected)


def test_gqa_structure_is_enforced_before_anything_changes():
    model = tiny_model("llama")  # 8 query heads, 4 key/value heads: groups of 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="same number of query heads per key/value head"):
        H.remove_heads(model, {0: [0, 2, 3]})  # would keep [1, 0->removed? , ...] unevenly
    with pytest.raises(ValueError, match="cannot remove all 8 heads"):
        H.remove_heads(model, {1: list(range(8))})
    with pytest.raises(ValueError, match="out of range"):
        H.remove_heads(model, {0: [8]})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    pk.llm.prune(model, pk.llm.random_calibration(256, 2, 8), method="magnitude")
    with pytest.raises(ValueError, match="finalize"):
        H.remove_heads(model, {0: [0, 1]})
    # Equal numbers per group are fine: the first query head of every group goes.
    pk.finalize(model)
    H.remove_heads(model, {0: [0, 2, 4, 6]})
    a = H.attention_layers(model)[0]
    assert (a.num_heads, a.num_kv_heads, a.module.num_key_value_groups) == (4, 4, 1)


def test_magnitude_head_importance_by_hand():
    model = tiny_model("opt")
    a = H.attention_layers(model)[1]
    d = a.head_dim
    h = 2
    expected = (a.q.weight[h * d : (h + 1) * d].square().sum() + a.k.weight[h * d : (h + 1) * d].square().sum()
                + a.v.weight[h * d : (h + 1) * d].square().sum() + a.o.weight[:, h * d : (h + 1) * d].square().sum()).sqrt()
    scores = H.head_importance(model, method="magnitude", normalize=False)
    torch.testing.assert_close(scores[1][h], expected.detach())


def test_gradient_head_importance_is_the_expected_abs_derivative_of_the_loss():
    # Michel et al.: I_h = E_x |dL/d xi_h| at xi = 1, checked against central finite differences per batch.
    model = tiny_model("gpt2")
    calib = pk.llm.random_calibration(256, 4, 16)
    scores = H.head_importance(model, calib, method="gradient", normalize=False, batch_size=2)
    attns = H.attention_layers(model)
    block, head, eps = 1, 2, 1e-2

    def loss(xi, batch):
        gates = [torch.ones(a.num_heads, dtype=torch.float64) for a in attns]
        gates[block][head] = xi
        with torch.no_grad(), H.mask_heads(model, gates):
            return float(model(batch, labels=batch).loss)

    fd = [abs(loss(1 + eps, b) - loss(1 - eps, b)) / (2 * eps) for b in calib.split(2)]
    assert float(scores[block][head]) == pytest.approx(sum(fd) / len(fd), rel=2e-2, abs=1e-5)
    normalized = H.head_importance(model, calib, method="gradient", batch_size=2)
    assert all(float(s.norm()) == pytest.approx(1.0) for s in normalized)


def test_select_heads_scopes():
    model = tiny_model("gpt2", n_layer=3)
    attns = H.attention_layers(model)
    scores = [torch.tensor([0.1, 0.9, 0.8, 0.7]), torch.tensor([0.05, 0.06, 0.07, 0.08]), torch.tensor([1.0, 2, 3, 4])]
    uniform = H.select_heads(scores, attns, 0.25, scope="uniform")
    assert uniform == {0: [0], 1: [0], 2: [0]}
    glob = H.select_heads(scores, attns, 0.25, scope="global")  # the 3 lowest of all 12 heads
    assert glob == {1: [0, 1, 2]}
    glob = H.select_heads(scores, attns, 1 / 3, scope="global")  # block 1's last head stays: 0.1 goes next
    assert glob == {0: [0], 1: [0, 1, 2]}
    many = H.select_heads(scores, attns, 0.9, scope="global")
    assert all(len(v) <= 3 for v in many.values())
    gqa_model = tiny_model("llama")
    gattns = H.attention_layers(gqa_model)
    s = [torch.arange(8.0), torch.arange(8.0).flip(0)]
    assert H.select_heads(s, gattns, 0.25, scope="uniform", gqa="group") == {0: [0, 1], 1: [6, 7]}
    assert H.select_heads(s, gattns, 0.5, scope="uniform", gqa="query") == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
    with pytest.raises(ValueError, match="scope='uniform'"):
        H.select_heads(s, gattns, 0.5, scope="global", gqa="query")
    with pytest.raises(ValueError, match="did you mean 'gradient'"):
        H.head_importance(gqa_model, method="gradiant")


def test_angular_distance_matches_hidden_states_by_hand():
    model = tiny_model("llama", num_hidden_layers=4)
    calib = pk.llm.random_calibration(256, 4, 16)
    d = L.angular_distances(model, calib, n=1)  # Gromov et al.: the last token of each sequence
    every = L.angular_distances(model, calib, n=1, tokens="all")
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states  # inputs of blocks 0..3, then normed output
    for layer in range(3):  # hidden_states[4] is after the final norm: compare blocks 0..2 only
        cos = torch.nn.functional.cosine_similarity(hs[layer], hs[layer + 1], dim=-1).clamp(-1, 1)
        angle = torch.arccos(cos) / math.pi  # (sequences, tokens)
        assert float(d[layer]) == pytest.approx(float(angle[:, -1].mean()), rel=1e-4)
        assert float(every[layer]) == pytest.approx(float(angle.mean()), rel=1e-4)
    assert not torch.allclose(d, every)
    d2 = L.angular_distances(model, calib, n=2)
    cos = torch.nn.functional.cosine_similarity(hs[1], hs[3], dim=-1).clamp(-1, 1)
    assert float(d2[1]) == pytest.approx(float((torch.arccos(cos) / math.pi)[:, -1].mean()), rel=1e-4)
    assert d2.shape == (3,)
    with pytest.raises(ValueError, match="tokens must be one of"):
        L.angular_distances(model, calib, tokens="first")


def test_angular_distance_takes_the_last_real_token_under_padding():
    a = torch.randn(2, 5, 8)
    b = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # right and left padding
    total, count = L._angular(a, b, mask, "last")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    expected = (torch.arccos(cos[0, 2]) + torch.arccos(cos[1, 4])) / math.pi
    assert count == 2 and total == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_removal_equals_skipping_and_reloads(arch, tmp_path):
    kw = {"n_layer": 4} if arch == "gpt2" else {"num_hidden_layers": 4}
    model = tiny_model(arch, **kw)
    ids = pk.llm.random_calibration(256, 2, 12)
    with torch.no_grad(), L.skip_layers(model, [1, 2]):
        skipped = _out(model, ids)
    kept = L.remove_layers(model, [1, 2])
    assert kept == [0, 3]
    torch.testing.assert_close(_out(model, ids), skipped)
    assert model.config.num_hidden_layers == 2
    hf.save_pretrained(model, tmp_path)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp_path, local_files_only=True).eval()
    torch.testing.assert_close(_out(reloaded, ids), skipped)


def test_prune_layers_angular_contiguous_and_perplexity():
    calib = pk.llm.random_calibration(256, 4, 16)
    model = tiny_model("qwen2", num_hidden_layers=5)
    d = L.angular_distances(model, calib, n=2)
    removed = L.prune_layers(model, calib, 2, method="angular")
    start = int(torch.argmin(d))
    assert removed == [start, start + 1] and len(model.model.layers) == 3
    model = tiny_model("opt", num_hidden_layers=4)
    scores = L.layer_importance(model, calib, method="perplexity")
    base = pk.llm.perplexity(model, calib, seq_len=16)
    with L.skip_layers(model, [2]):
        assert float(scores[2]) == pytest.approx(pk.llm.perplexity(model, calib, seq_len=16) - base, rel=1e-4)
    removed = L.prune_layers(model, calib, 1, method="perplexity")
    assert removed == [int(torch.argmin(scores))]
    with pytest.raises(ValueError, match="num_layers must be in"):
        L.prune_layers(model, calib, 3)
    with pytest.raises(ValueError, match="cannot remove all"):
        L.remove_layers(model, [0, 1, 2])


def test_heads_then_layers_keep_the_config_consistent(tmp_path):
    model = tiny_model("bert", num_hidden_layers=3)
    ids = pk.llm.random_calibration(256, 2, 12)
    H.remove_heads(model, {0: [1], 2: [0, 3]})
    L.remove_layers(model, [1])
    assert model.config.prunekit_attention["num_heads"] == [3, 2]
    expected = _out(model, ids)
    hf.save_pretrained(model, tmp_path)
    torch.testing.assert_close(_out(hf.load_pretrained(tmp_path), ids), expected)
