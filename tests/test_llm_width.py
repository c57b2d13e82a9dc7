"""Width pruning (MLP channels, attention heads): FLAP's metric and bias compensation by hand, removal equal to
the zeroed dense model, reload equality, parameter counts, and clear errors before any change."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.llm import heads as H  # noqa: E402
from prunekit.llm import width as W  # noqa: E402
from prunekit.llm.models import tiny_model  # noqa: E402
from prunekit.llm.sequential import real_tokens  # noqa: E402


def _out(model, ids, mask=None):
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _matrix(module):
    w = module.weight.detach()
    return w.t() if W.is_gpt_conv1d(module) else w


def _inputs_of(model, modules, calib):
    """The inputs each module receives over the real tokens of ``calib`` (a dict with an attention mask)."""
    seen = {id(m): [] for m in modules}
    real = calib["attention_mask"].bool()

    def hook(module, args):
        x = args[0].detach()
        seen[id(module)].append((x[real] if x.dim() == 3 else x[real.reshape(-1)]).double())  # OPT: (tokens, in)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    with torch.no_grad():
        model(**calib)
    for h in handles:
        h.remove()
    return [torch.cat(seen[id(m)]) for m in modules]


def _calib(n=4, seq=16, seed=0):
    ids = pk.llm.random_calibration(256, n, seq, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # padding: left out of every statistic
    return {"input_ids": ids, "attention_mask": mask}


def test_fluctuation_and_wanda_scores_by_hand():
    torch.manual_seed(0)
    weight = torch.randn(3, 6)
    x = torch.randn(40, 6) * torch.tensor([0.1, 1, 2, 3, 0.5, 1]) + torch.tensor([5.0, 0, -2, 1, 100, 0])
    moments = W.InputMoments(6)
    for part in x.split([7, 20, 13]):  # batches merge exactly
        moments.add(part)
    x64, w64 = x.double(), weight.double()
    var = ((x64 - x64.mean(0)) ** 2).sum(0) / (40 - 1)  # FLAP: the sample variance of each input channel
    col_sq = (w64**2).sum(0)
    torch.testing.assert_close(W.channel_scores(weight, moments, "flap"), var * col_sq)
    torch.testing.assert_close(W.channel_scores(weight, moments, "wanda"), w64.abs().sum(0) * x64.norm(dim=0))
    torch.testing.assert_close(moments.mean, x64.mean(0))
    big = torch.randn(2500, 4000) + 10  # more rows than one float64 chunk holds: split and merged exactly
    chunked = W.InputMoments(4000)
    chunked.add(big)
    torch.testing.assert_close(chunked.variance, big.double().var(0))
    torch.testing.assert_close(chunked.sq_sum, big.double().square().sum(0))


@pytest.mark.parametrize("method", ["flap", "wanda"])
def test_width_importance_is_the_metric_on_the_down_and_output_projections(method):
    model = tiny_model("llama")
    calib = _calib()
    mlp_scores, head_scores = pk.llm.width_importance(model, calib, method)
    mlps, attns = W.mlp_layers(model), H.attention_layers(model)
    xs = _inputs_of(model, [m.down for m in mlps] + [a.o for a in attns], calib)
    for i, (mlp, attn) in enumerate(zip(mlps, attns)):
        x_down, x_o = xs[i], xs[len(mlps) + i]
        assert x_down.shape[0] == 4 * 16 - 5  # the 5 padding tokens are out
        w_down, w_o = _matrix(mlp.down).double(), _matrix(attn.o).double()
        if method == "flap":
            down, o = x_down.var(0) * (w_down**2).sum(0), x_o.var(0) * (w_o**2).sum(0)
        else:
            down, o = w_down.abs().sum(0) * x_down.norm(dim=0), w_o.abs().sum(0) * x_o.norm(dim=0)
        torch.testing.assert_close(mlp_scores[i].double(), down, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(head_scores[i].double(), o.reshape(attn.num_heads, -1).sum(1), rtol=1e-5, atol=1e-9)


def _output_means(model, module, calib):
    real = calib["attention_mask"].bool()
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach()[real].double()))  # not OPT
    with torch.no_grad():
        model(**calib)
    handle.remove()
    return torch.cat(seen).mean(0)


@pytest.mark.parametrize("part", ["mlp", "heads"])
def test_bias_compensation_keeps_the_calibration_mean_of_the_outputs(part):
    # Llama has no MLP or attention biases: compensation creates them (config.mlp_bias / attention_bias)
    dense = tiny_model("llama")
    calib = _calib()
    model = copy.deepcopy(dense)
    report = pk.llm.prune_width(model, calib, mlp=0.5 if part == "mlp" else 0.0,
                                heads=0.5 if part == "heads" else 0.0, method="flap")
    if part == "mlp":
        assert report.compensated_mlp and model.config.mlp_bias and not report.compensated_heads
        d_layer, layer = W.mlp_layers(dense)[0].down, W.mlp_layers(model)[0].down
        idx = torch.tensor(report.removed_channels[0])
    else:
        assert report.compensated_heads and model.config.attention_bias and not report.compensated_mlp
        d_layer, layer = H.attention_layers(dense)[0].o, H.attention_layers(model)[0].o
        idx = (torch.tensor(report.removed_heads[0]).reshape(-1, 1) * 8 + torch.arange(8)).reshape(-1)
    # the bias is W[:, removed] @ mean(X[removed]) over the real calibration tokens (FLAP)
    x = _inputs_of(dense, [d_layer], calib)[0]
    torch.testing.assert_close(layer.bias.double(), _matrix(d_layer).double()[:, idx] @ x.mean(0)[idx],
                               rtol=1e-5, atol=1e-7)
    # so block 0's projection (whose inputs pruning has not changed) keeps the dense output mean exactly
    dense_mean = _output_means(dense, d_layer, calib)
    error = (_output_means(model, layer, calib) - dense_mean).abs().max()
    assert error < 1e-6
    # without compensation it does not
    plain = copy.deepcopy(dense)
    pk.llm.prune_width(plain, calib, mlp=0.5 if part == "mlp" else 0.0, heads=0.5 if part == "heads" else 0.0,
                       method="flap", compensate=False)
    p_layer = W.mlp_layers(plain)[0].down if part == "mlp" else H.attention_layers(plain)[0].o
    assert p_layer.bias is None
    gap = (_output_means(plain, p_layer, calib) - dense_mean).abs().max()
    assert gap > 100 * error and gap > 1e-4


def _zero_columns(layer, idx, x, compensate):
    """Zero a layer's input columns ``idx``; with ``compensate`` add ``W[:, idx] @ mean(x[:, idx])`` to its bias."""
    shift = _matrix(layer).double()[:, idx] @ x.mean(0)[idx]
    w = _matrix(layer)
    w[:, idx] = 0
    if compensate:
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0]))
        layer.bias += shift.float()


def _zeroed_equivalent(dense, calib, report):
    """The dense model with the removed channels and heads zeroed and the compensation added by hand."""
    ref = copy.deepcopy(dense)
    mlps, attns = W.mlp_layers(ref), H.attention_layers(ref)
    xs = _inputs_of(dense, [m.down for m in W.mlp_layers(dense)] + [a.o for a in H.attention_layers(dense)], calib)
    with torch.no_grad():
        for i, mlp in enumerate(mlps):
            removed = torch.tensor(report.removed_channels.get(i, []), dtype=torch.long)
            _zero_columns(mlp.down, removed, xs[i], report.compensated_mlp)
        for i, attn in enumerate(attns):
            heads = torch.tensor(report.removed_heads.get(i, []), dtype=torch.long)
            idx = (heads.reshape(-1, 1) * attn.head_dim + torch.arange(attn.head_dim)).reshape(-1)
            _zero_columns(attn.o, idx, xs[len(mlps) + i], report.compensated_heads)
    return ref


@pytest.mark.parametrize("arch,scope", [("llama", "uniform"), ("llama", "global"), ("opt", "global"),
                                        ("gpt2", "uniform"), ("bert", "global"), ("mistral", "uniform")])
def test_pruned_model_equals_zeroed_dense_model_and_reloads(arch, scope, tmp_path):
    dense = tiny_model(arch)
    calib = _calib()
    model = copy.deepcopy(dense)
    report = pk.llm.prune_width(model, calib, mlp=0.25, heads=0.25, method="flap", scope=scope)
    assert report.removed_channels and report.removed_heads
    assert report.compensated_mlp == report.compensated_heads == (arch != "mistral")  # Mistral cannot hold a bias
    ref = _zeroed_equivalent(dense, calib, report)
    test = pk.llm.random_calibration(256, 2, 12, seed=1)
    torch.testing.assert_close(_out(model, test), _out(ref, test), rtol=1e-4, atol=1e-5)
    # the sizes the report gives are the model's, and the config records them
    mlps, attns = W.mlp_layers(model), H.attention_layers(model)
    dense_width, dense_heads = W.mlp_layers(dense)[0].width, H.attention_layers(dense)[0].num_heads
    assert [m.width for m in mlps] == report.mlp_widths == model.config.prunekit_mlp["widths"]
    assert [dense_width - len(report.removed_channels.get(i, [])) for i in range(len(mlps))] == report.mlp_widths
    assert [a.num_heads for a in attns] == report.head_counts
    if scope == "uniform":
        assert report.mlp_widths == [dense_width - round(0.25 * dense_width)] * len(mlps)
    else:
        assert sum(report.mlp_widths) == len(mlps) * dense_width - round(0.25 * len(mlps) * dense_width)
    assert sum(dense_heads - h for h in report.head_counts) >= 1
    pk.llm.save_pretrained(model, tmp_path)
    reloaded = pk.llm.load_model(tmp_path)  # rebuilds per-block widths and heads
    torch.testing.assert_close(_out(reloaded, test), _out(model, test))


def test_parameter_counts_drop_exactly():
    dense = tiny_model("llama")  # hidden 64, MLP 128, 2 blocks, 8 heads of 8 in 4 groups
    model = copy.deepcopy(dense)
    report = pk.llm.prune_width(model, _calib(), mlp=0.25, heads=0.5, method="flap", scope="uniform")
    hidden, d, blocks = 64, 8, 2
    kept_width, kept_heads, kept_kv = 96, 4, 2
    removed = blocks * (3 * hidden * 32 + 2 * hidden * 4 * d + 2 * hidden * 2 * d)  # gate/up/down; q, o; k, v
    added = blocks * (2 * kept_width + hidden + (kept_heads + 2 * kept_kv) * d + hidden)  # the new biases
    assert report.params_before == sum(p.numel() for p in dense.parameters())
    assert report.params_after == sum(p.numel() for p in model.parameters()) == report.params_before - removed + added
    model = copy.deepcopy(dense)
    report = pk.llm.prune_width(model, _calib(), mlp=0.25, method="flap", compensate=False)
    assert report.params_after == report.params_before - blocks * 3 * hidden * 32


def test_uniform_llama_reloads_with_plain_from_pretrained(tmp_path):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    calib = _calib()
    pk.llm.prune_width(model, calib, mlp=0.25, heads=0.5, method="flap")  # 8 -> 4 heads divides hidden 64
    assert model.config.intermediate_size == 96 and model.config.num_attention_heads == 4
    pk.llm.save_pretrained(model, tmp_path)
    plain = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    test = pk.llm.random_calibration(256, 2, 12, seed=1)
    torch.testing.assert_close(_out(plain, test), _out(model, test))


def test_gqa_query_heads_evenly_within_groups():
    model = tiny_model("llama")  # 8 query heads in 4 groups of 2
    report = pk.llm.prune_width(model, _calib(), mlp=0.0, heads=0.5, gqa="query", method="wanda")
    for heads in report.removed_heads.values():
        assert sorted(h // 2 for h in heads) == [0, 1, 2, 3]  # one from each group
    attn = H.attention_layers(model)[0]
    assert (attn.num_heads, attn.num_kv_heads) == (4, 4)


def test_depth_and_width_in_one_call(tmp_path):
    dense = tiny_model("llama", num_hidden_layers=4)
    calib = _calib()
    model = copy.deepcopy(dense)
    report = pk.llm.prune_depth_width(model, calib, layers=1, mlp=0.25, heads=0.25, method="flap", scope="global")
    assert len(report.removed_layers) == 1 and model.config.num_hidden_layers == 3
    assert len(report.mlp_widths) == 3 and sum(report.mlp_widths) == 3 * 128 - 96
    # the same as the two steps by hand
    by_hand = copy.deepcopy(dense)
    pk.llm.prune_layers(by_hand, calib, 1)
    pk.llm.prune_width(by_hand, calib, mlp=0.25, heads=0.25, method="flap", scope="global")
    test = pk.llm.random_calibration(256, 2, 12, seed=1)
    torch.testing.assert_close(_out(model, test), _out(by_hand, test))
    pk.llm.save_pretrained(model, tmp_path)
    torch.testing.assert_close(_out(pk.llm.load_model(tmp_path), test), _out(model, test))


def test_width_then_depth_keeps_the_record_consistent(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    calib = _calib()
    pk.llm.prune_width(model, calib, mlp=0.3, method="flap", scope="global")
    widths = model.config.prunekit_mlp["widths"]
    pk.llm.remove_layers(model, [1])
    assert model.config.prunekit_mlp["widths"] == [widths[0], widths[2]]
    pk.llm.save_pretrained(model, tmp_path)
    test = pk.llm.random_calibration(256, 2, 12, seed=1)
    torch.testing.assert_close(_out(pk.llm.load_model(tmp_path), test), _out(model, test))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def _unchanged(model, snapshot):
    state, config = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == config


@pytest.mark.parametrize("kwargs,message", [
    ({"mlp": 1.0}, "mlp must be"), ({"mlp": -0.1}, "mlp must be"), ({"heads": 1.5}, "heads must be"),
    ({"method": "taylor"}, "width method"), ({"scope": "local"}, "scope"),
    ({"heads": 0.25, "gqa": "query", "scope": "global"}, "uniform"),
    ({"method": "magnitude", "compensate": True}, "magnitude"),
])
def test_bad_input_raises_before_any_change(kwargs, message):
    model = tiny_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        pk.llm.prune_width(model, _calib(), **kwargs)
    _unchanged(model, snapshot)


def test_missing_calibration_and_impossible_compensation_raise_before_any_change():
    model = tiny_model("mistral")  # no config.mlp_bias: its MLP cannot hold a bias
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="calibration"):
        pk.llm.prune_width(model, None, mlp=0.25)
    with pytest.raises(ValueError, match="bias compensation is not possible"):
        pk.llm.prune_width(model, _calib(), mlp=0.25, compensate=True)
    with pytest.raises(ValueError, match="layers must be"):
        pk.llm.prune_depth_width(model, _calib(), layers=2)
    _unchanged(model, snapshot)


class _NoMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

    def forward(self, input_ids=None, attention_mask=None):
        h = torch.nn.functional.one_hot(input_ids % 8, 8).float()
        for layer in self.layers:
            h = layer(h)
        return h


def test_a_model_without_an_mlp_raises_before_any_change():
    model = _NoMLP()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no MLP with a known layout"):
        pk.llm.prune_width(model, _calib(), mlp=0.25, method="magnitude")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_magnitude_needs_no_data_and_scores_whole_channels():
    model = tiny_model("opt")
    mlp = W.mlp_layers(model)[0]
    expected = ((mlp.down.weight.double() ** 2).sum(0) + (mlp.inputs[0].weight.double() ** 2).sum(1)).sqrt()
    scores, _ = pk.llm.width_importance(model, method="magnitude")
    torch.testing.assert_close(scores[0].double(), expected.float().double())
    report = pk.llm.prune_width(model, mlp=0.25, method="magnitude")
    assert report.removed_channels[0] == sorted(torch.topk(expected, 32, largest=False).indices.tolist())
    assert not report.compensated_mlp


def test_padding_never_reaches_the_statistics_even_when_opt_flattens_the_tokens():
    # OPT's MLP sees (batch * seq, features): the padded positions must still be left out, here and in pk.llm.prune.
    # Right padding under causal attention: the real tokens do not see what the padded positions hold.
    model = tiny_model("opt")
    a = _calib()
    b = {"input_ids": a["input_ids"].clone(), "attention_mask": a["attention_mask"]}
    b["input_ids"][1, 11:] = (a["input_ids"][1, 11:] + 100) % 256  # other tokens in the padded positions
    flat = torch.arange(6.0).reshape(6, 1)  # (batch 2 * seq 3, 1)
    assert real_tokens(flat, torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()).flatten().tolist() == [0.0, 1.0, 3.0]
    for method in ("flap", "wanda"):
        torch.testing.assert_close(pk.llm.width_importance(model, a, method), pk.llm.width_importance(model, b, method))
    masks = []
    for calib in (a, b):
        pruned = copy.deepcopy(model)
        pk.llm.prune(pruned, calib, method="wanda", sparsity=0.5)
        masks.append(pk.masks(pruned))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
