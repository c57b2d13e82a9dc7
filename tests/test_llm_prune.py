"""pk.llm.prune end to end on tiny random transformers of every supported family."""

import sys
import weakref

import pytest
import torch

pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.llm.methods import LayerMethod, LayerResult  # noqa: E402
from prunekit.llm.models import ARCHITECTURES, tiny_model  # noqa: E402
from prunekit.llm.wanda import InputNorms  # noqa: E402


def _out(model, ids):
    with torch.no_grad():
        result = model(ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _in_first(name, model, mask):
    """The mask as (out, in): GPT-2's Conv1D stores (in, out)."""
    module = model.get_submodule(name.rpartition(".")[0])
    return mask.t() if "Conv1D" in [c.__name__ for c in type(module).__mro__] else mask


@pytest.mark.slow
def test_import_prunekit_and_pk_llm_do_not_import_transformers():
    import subprocess

    code = ("import sys, prunekit as pk; pk.llm; from prunekit.llm import prune, perplexity; import prunekit.cli; "
            "prunekit.cli.build_parser(); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_family_every_method_exact_sparsity(arch, method):
    model = tiny_model(arch)
    calib = pk.llm.random_calibration(256, 8, 32)
    report = pk.llm.prune(model, calib, method=method, sparsity=0.5, batch_size=4)
    masks = pk.masks(model)
    assert len(masks) == len(report.layers) > 0
    assert all(".layers." in n or ".h." in n or ".layer." in n for n in masks)  # only inside the blocks
    for name, mask in masks.items():
        m = _in_first(name, model, mask)
        if method == "wanda":
            assert torch.all((~m).sum(dim=1) == m.shape[1] // 2), name  # per output row
        else:
            assert int((~m).sum()) == m.numel() // 2, name
    assert pk.sparsity(model) == pytest.approx(0.5)
    assert report.sparsity == pytest.approx(0.5)
    assert len(report.block_seconds) == 2
    assert torch.isfinite(_out(model, calib[:2])).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_along_the_input_dimension(arch, pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(arch)
    pk.llm.prune(model, pk.llm.random_calibration(256, 4, 32), method="sparsegpt", pattern=pattern)
    for name, mask in pk.masks(model).items():
        rows = _in_first(name, model, mask)
        assert torch.all(rows.reshape(rows.shape[0], -1, m).sum(dim=2) == n), name


def test_sparsegpt_changes_kept_weights_wanda_and_magnitude_do_not():
    calib = pk.llm.random_calibration(256, 8, 32)
    for method, updates in (("sparsegpt", True), ("wanda", False), ("magnitude", False)):
        model = tiny_model("opt")
        before = model.model.decoder.layers[0].fc1.weight.detach().clone()
        pk.llm.prune(model, calib, method=method)
        after = model.model.decoder.layers[0].fc1.weight.detach()
        kept = pk.masks(model)["model.decoder.layers.0.fc1.weight"]
        assert torch.equal(after[~kept], torch.zeros_like(after[~kept]))
        assert (not torch.equal(after[kept], before[kept])) == updates, method


def test_sparsegpt_keeps_outputs_closest_to_dense():
    calib = pk.llm.random_calibration(256, 16, 64)
    ids = pk.llm.random_calibration(256, 4, 64, seed=1)
    dense = _out(tiny_model("llama"), ids)
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = tiny_model("llama")
        pk.llm.prune(model, calib, method=method, sparsity=0.6)
        errors[method] = float((_out(model, ids) - dense).norm())
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_sequential_calibration_feeds_pruned_outputs_forward():
    calib = pk.llm.random_calibration(256, 4, 16)
    model = tiny_model("llama")
    dense = tiny_model("llama")
    seen = []
    # What block 1's first layer receives while its statistics are collected (the capture pass runs the
    # blocks as identities, so q_proj runs only in the statistics pass).
    q1 = "model.layers.1.self_attn.q_proj"
    hook = model.get_submodule(q1).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    pk.llm.prune(model, calib, method="wanda", batch_size=4)
    hook.remove()
    captured = {}

    def grab(m, args):
        captured["x"] = args[0].detach().clone()

    for net, key in ((model, "pruned"), (dense, "dense")):
        handle = net.get_submodule(q1).register_forward_pre_hook(grab)
        with torch.no_grad():
            net(calib, use_cache=False)
        handle.remove()
        captured[key] = captured.pop("x")
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], captured["pruned"])  # the pruned block 0's output ...
    assert not torch.allclose(seen[0], captured["dense"], atol=1e-4)  # ... not the dense one's


class _Spy(LayerMethod):
    """Wanda that records how many accumulators are alive when each is created."""

    name = "spy"

    def __init__(self):
        self.alive: list = []
        self.peak = 0
        self.tokens: list[int] = []

    def statistics(self, in_features, device):
        acc = InputNorms(in_features, device)
        self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(acc)]
        self.peak = max(self.peak, len(self.alive))
        return acc

    def prune(self, weight, stats, sparsity, pattern, kept):
        self.tokens.append(stats.tokens)
        return LayerResult(torch.ones_like(weight, dtype=torch.bool))


def test_one_block_of_statistics_at_a_time_and_padding_left_out():
    model = tiny_model("bert", num_hidden_layers=3)
    spy = _Spy()
    ids = pk.llm.random_calibration(256, 4, 12)
    attention = torch.ones_like(ids)
    attention[0, 5:] = 0  # padding
    attention[2, 9:] = 0
    pk.llm.prune(model, {"input_ids": ids, "attention_mask": attention}, method=spy, batch_size=2)
    assert spy.peak == 4  # one block's six Linear layers (q/k/v share their input, so one accumulator), never more
    assert set(spy.tokens) == {int(attention.sum())}  # padding tokens are not statistics


def test_exclude_patterns_and_block_names():
    calib = pk.llm.random_calibration(256, 4, 16)
    model = tiny_model("llama")
    pk.llm.prune(model, calib, method="wanda", exclude=["mlp.down_proj", "model.layers.1.self_attn"])
    names = set(pk.masks(model))
    assert "model.layers.0.mlp.down_proj.weight" not in names
    assert not any(n.startswith("model.layers.1.self_attn") for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names


def test_bad_input_is_refused_before_anything_changes():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = pk.llm.random_calibration(256, 4, 16)
    cases = [
        (dict(method="sparsgpt"), ValueError, "did you mean 'sparsegpt'"),
        (dict(method="wanda", sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(method="wanda", pattern="2:4", sparsity=0.7), ValueError, "fixes sparsity at 0.5"),
        (dict(method="wanda", pattern="3:48"), ValueError, "not divisible by M=48"),
        (dict(method="wanda", exclude=["nothing.here"]), ValueError, "matches no layer"),
        (dict(method="wanda", calibration=None), ValueError, "needs calibration data"),
        (dict(method="wanda", calibration=calib.float()), ValueError, "integer token ids"),
        (dict(method="wanda", blocks="model.norm"), ValueError, "not a non-empty nn.ModuleList"),
        (dict(method="sparsegpt", percdamp=2.0), ValueError, "percdamp"),
    ]
    for kwargs, error, match in cases:
        kwargs = dict(kwargs)
        data = kwargs.pop("calibration", calib)
        with pytest.raises(error, match=match):
            pk.llm.prune(model, data, **kwargs)
        assert not pk.masks(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (kwargs, k)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prune_finalize_save_pretrained_reload_same_outputs(arch, tmp_path):
    import transformers as tf

    model = tiny_model(arch)
    calib = pk.llm.random_calibration(256, 8, 32)
    pk.llm.prune(model, calib, method="sparsegpt", sparsity=0.5)
    ids = pk.llm.random_calibration(256, 2, 24, seed=3)
    expected = _out(model, ids)
    masks = {k: v.clone() for k, v in pk.masks(model).items()}
    pk.finalize(model)
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    torch.testing.assert_close(_out(reloaded, ids), expected, rtol=0, atol=0)
    for name, mask in masks.items():
        w = reloaded.get_parameter(name)
        assert torch.all(w[~mask] == 0), name


def test_prunekit_save_and_load_keep_the_masks(tmp_path):
    model = tiny_model("gpt2")
    pk.llm.prune(model, pk.llm.random_calibration(256, 4, 16), method="wanda", pattern="2:4")
    ids = pk.llm.random_calibration(256, 2, 16, seed=2)
    expected = _out(model, ids)
    path = pk.save(model, tmp_path / "gpt2.safetensors")
    fresh = tiny_model("gpt2", seed=5)
    pk.load(fresh, path)
    torch.testing.assert_close(_out(fresh, ids), expected)
    assert pk.sparsity(fresh) == pytest.approx(0.5)


def test_a_second_call_only_tightens_masks():
    model = tiny_model("qwen2")
    calib = pk.llm.random_calibration(256, 4, 16)
    pk.llm.prune(model, calib, method="wanda", sparsity=0.3)
    first = {k: v.clone() for k, v in pk.masks(model).items()}
    report = pk.llm.prune(model, calib, method="sparsegpt", sparsity=0.6)
    for name, mask in pk.masks(model).items():
        assert not mask[~first[name]].any()  # nothing pruned comes back
        assert int((~mask).sum()) == round(0.6 * mask.numel())
    assert all(r.sparsity_before == pytest.approx(0.3, abs=0.01) for r in report.layers)


def test_progress_callback_is_called_per_block():
    calls = []
    pk.llm.prune(tiny_model("mistral"), pk.llm.random_calibration(256, 2, 16), method="wanda",
                 progress=lambda i, n, s: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2)]


def test_include_prunes_the_lm_head_after_the_blocks_with_pruned_inputs():
    from prunekit.llm.wanda import wanda_mask

    model = tiny_model("llama")  # untied LM head
    dense_head = model.lm_head.weight.detach().clone()
    calib = pk.llm.random_calibration(256, 4, 16)
    steps = []
    report = pk.llm.prune(model, calib, method="wanda", include=["lm_head"], progress=lambda i, n, s: steps.append(n))
    assert steps == [3, 3, 3] and len(report.block_seconds) == 2
    mask = pk.masks(model)["lm_head.weight"]
    seen = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(calib, use_cache=False)  # the head's input after the blocks were pruned
    handle.remove()
    norms = seen["x"].reshape(-1, seen["x"].shape[-1]).square().sum(0).sqrt()
    assert torch.equal(mask, wanda_mask(dense_head, norms, 0.5))
    assert "model.embed_tokens.weight" not in pk.masks(model)


def test_include_refuses_tied_heads_and_layers_inside_blocks():
    calib = pk.llm.random_calibration(256, 2, 8)
    tied = tiny_model("gpt2")  # GPT-2 ties lm_head to wte
    with pytest.raises(ValueError, match="tied to transformer.wte.weight"):
        pk.llm.prune(tied, calib, method="wanda", include="lm_head")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matches no Linear layer outside the blocks"):
        pk.llm.prune(model, calib, method="wanda", include=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="not a Linear or Conv1D"):
        pk.llm.prune(model, calib, method="wanda", include=["model.norm"])
    assert not pk.masks(model) and not pk.masks(tied)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_bfloat16_models_are_pruned_with_float32_statistics(method):
    model = tiny_model("llama").to(torch.bfloat16)
    pk.llm.prune(model, pk.llm.random_calibration(256, 4, 16), method=method, pattern="2:4")
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
    assert torch.isfinite(_out(model, pk.llm.random_calibration(256, 1, 8)).float()).all()


def test_masked_gpt2_conv1d_stays_a_default_target_with_its_layout():
    # Once masked, a Conv1D's class is torch's ParametrizedConv1D: it must still be found and laid out (in, out).
    from prunekit.targets import resolve_targets

    model = tiny_model("gpt2")
    pk.llm.prune(model, None, method="magnitude", sparsity=0.25)
    targets = {t.name: t for t in resolve_targets(model, None)}
    t = targets["transformer.h.0.mlp.c_fc.weight"]
    assert (t.out_dim, t.in_dim) == (1, 0)
    pk.prune(model, granularity="2:4", targets=["transformer.h.0.mlp.c_fc"])
    w = model.transformer.h[0].mlp.c_fc.weight.t()  # (out, in): the pattern runs along the inputs
    assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
