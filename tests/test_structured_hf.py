"""Structured pruning of Hugging Face models (tiny configs, random weights), proved by equivalence.

Each model is pruned 30% twice from the same weights: physically, and with channel masks (the original
with the removed channels' parameters zeroed). The outputs must agree, the physical one must have fewer
parameters, and ``save_pretrained`` + :func:`prunekit.structured.load_pretrained` must give the same
outputs again. The hidden width is pinned by default (every LayerNorm normalises over it); the tests of
``hidden=True`` below check what holds there instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structured import UnsupportedOperationError, load_pretrained

tf = pytest.importorskip("transformers")


def _ids() -> dict:
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def _image() -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


MODELS = {
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)), _ids),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)), _ids),
    "llama_gqa": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)), _ids),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32)), _ids),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3)), _image),
    "swin": (lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=3)), _image),
    "resnet": (lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3)), _image),
    "convnext": (lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)), _image),
    "mobilenetv2": (lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35, num_labels=3)), _image),
}
SLOW = {"mobilenetv2"}
_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32)
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, num_labels=3)
MORE = {  # layouts the attention rule does not know (DistilBERT, GPT-NeoX's fused qkv) are traced into
    "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**_TEXT, num_labels=3, pad_token_id=1)),
                _ids),
    "distilbert": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32)), _ids),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_TEXT, num_key_value_heads=2)), _ids),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_TEXT, num_key_value_heads=2)), _ids),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_TEXT)), _ids),
    "phi": (lambda: tf.PhiForCausalLM(tf.PhiConfig(**_TEXT)), _ids),
    "deit": (lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**_VISION)), _image),
    "beit": (lambda: tf.BeitForImageClassification(tf.BeitConfig(**_VISION)), _image),
}


@pytest.fixture(scope="module", autouse=True)
def _transformers_loaded():
    """Import transformers' model code once (about 10 s the first time), outside the tests' own time."""
    MODELS["bert"][0]()


def _build(name: str):
    make, inputs = MODELS[name] if name in MODELS else MORE[name]
    torch.manual_seed(0)
    model = make().eval()
    for m in model.modules():  # transformers' std-0.02 init makes deep CNNs' activations vanish
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model, inputs()


def _logits(model: nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_pruned_equals_zeroed_original_and_reloads(name, tmp_path):
    model, x = _build(name)
    zeroed = copy.deepcopy(model)
    pk.structured.prune(zeroed, x, 0.3, physical=False)  # the original, removed channels zeroed
    report = pk.structured.prune(model, x, 0.3)
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in zeroed.parameters())
    expected = _logits(zeroed, x)
    got = _logits(model, x)
    assert got.shape == expected.shape
    scale = expected.abs().max()  # some random inits give tiny logits: compare relative to their size
    assert scale > 0
    torch.testing.assert_close(got / scale, expected / scale, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_pretrained(tmp_path)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(reloaded, x) / scale, got / scale, rtol=1e-6, atol=1e-6)


def test_bert_heads_and_mlp_are_groups_with_the_right_members():
    model, x = _build("bert")
    graph = pk.structured.DependencyGraph(model, x)
    attn = graph.group_of("bert.encoder.layer.0.attention.self.query")
    assert attn.size == 4  # one channel per head
    names = {(m.name, m.dim) for m in attn.members}
    prefix = "bert.encoder.layer.0.attention."
    assert {(prefix + "self.query.weight", 0), (prefix + "self.key.weight", 0), (prefix + "self.value.weight", 0),
            (prefix + "output.dense.weight", 1)} <= names
    assert graph.group_of("bert.encoder.layer.0.intermediate.dense").size == 64
    pk.structured.remove(model, x, "bert.encoder.layer.0.attention.self.query", [0, 1, 2, 3, 4, 5, 6, 7])
    self_attn = model.bert.encoder.layer[0].attention.self
    assert (self_attn.num_attention_heads, self_attn.all_head_size) == (3, 24)
    assert self_attn.query.weight.shape == (24, 32) and self_attn.key.out_features == 24


def test_llama_gqa_removes_whole_key_value_groups_and_config_follows():
    model, x = _build("llama_gqa")
    graph = pk.structured.DependencyGraph(model, x)
    group = graph.group_of("model.layers.0.self_attn.k_proj")
    assert group.size == 2  # 2 key/value heads, each with its 2 query heads
    q = next(m for m in group.members if m.name.endswith("q_proj.weight"))
    assert torch.equal(q.channel, torch.arange(2).repeat_interleave(16))  # 2 query heads x head_dim 8
    before = _logits(model, x)
    pk.structured.prune(model, x, 0.5)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 8, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.config.intermediate_size == 32
    assert _logits(model, x).shape == before.shape


def test_gpt2_fused_qkv_conv1d_and_tied_head():
    model, x = _build("gpt2")
    graph = pk.structured.DependencyGraph(model, x)
    group = graph.group_of("transformer.h.0.attn.c_attn")
    c_attn = next(m for m in group.members if m.name == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.dim == 1 and c_attn.index.numel() == 96  # q, k and v columns of every head
    assert torch.equal(c_attn.channel[:32], c_attn.channel[32:64])
    pk.structured.prune(model, x, 0.3)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, vocabulary and width kept
    attn = model.transformer.h[0].attn
    assert attn.c_attn.nf == 3 * attn.split_size == 3 * attn.num_heads * attn.head_dim


def test_data_dependent_control_flow_follows_the_path_taken():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if x.abs().sum() > 0:  # a branch on a tensor value: torch.fx refuses it
                h = torch.relu(self.b(h))
            return self.c(h)

    model = Branchy()
    x = torch.randn(3, 4)
    with pytest.raises(UnsupportedOperationError, match="torch.fx cannot trace"):
        pk.structured.DependencyGraph(model, x, tracer="fx")
    graph = pk.structured.DependencyGraph(model, x)
    assert [g.size for g in graph.groups()] == [8, 8]
    before = model(x)
    zero = [0, 3]
    with torch.no_grad():
        model.b.weight[zero] = 0
        model.b.bias[zero] = 0
    expected = model(x)
    pk.structured.remove(model, x, "b", zero)
    assert model.b.out_features == 6 and model.c.in_features == 6
    torch.testing.assert_close(model(x), expected)
    assert before.shape == expected.shape


def test_eager_trace_names_an_unknown_operation():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            if h.shape[0] > 1:
                h = torch.fft.fft(h).real
            return self.c(h)

    with pytest.raises(UnsupportedOperationError, match="fft"):
        pk.structured.DependencyGraph(Spectral(), torch.randn(3, 4))
    graph = pk.structured.DependencyGraph(Spectral(), torch.randn(3, 4), unknown="boundary")
    assert graph.groups() == []


def _restrict_layer_norms(model: nn.Module, kept: torch.Tensor) -> None:
    """Make every LayerNorm of ``model`` normalise over the ``kept`` positions of its width only (zeros
    elsewhere): what a LayerNorm of the pruned width computes."""

    def hook(module, args, output):
        x = args[0]
        out = torch.zeros_like(output)
        out[..., kept] = nn.functional.layer_norm(x[..., kept], (kept.numel(),), module.weight[kept],
                                                  module.bias[kept], module.eps)
        return out

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(hook)


@pytest.mark.parametrize("name, embedding", [("bert", "bert.embeddings.word_embeddings"), ("gpt2", "transformer.wte")])
def test_hidden_width_pruned_where_asked(name, embedding, tmp_path):
    """hidden=True: embeddings, every LayerNorm, position tables and the tied head shrink with the hidden
    width. The LayerNorms then normalise over fewer channels, so the pruned model equals the zeroed
    original whose LayerNorms normalise over the kept channels only (the masked computation where it is
    defined), and it reloads exactly."""
    model, x = _build(name)
    graph = pk.structured.DependencyGraph(model, x, hidden=True)
    width = graph.group_of(embedding)
    assert width.size == 32
    zeroed = copy.deepcopy(model)
    pk.structured.prune(zeroed, x, 0.3, hidden=True, physical=False)
    report = pk.structured.prune(model, x, 0.3, hidden=True)
    removed = torch.tensor(next(g.removed for g in report.groups if g.name == embedding))
    member = next(m for m in width.members if m.name == embedding + ".weight" and m.dim == 1)
    kept = member.index[~torch.isin(member.channel, removed)]
    assert kept.numel() == 32 - 10
    _restrict_layer_norms(zeroed, kept)
    torch.testing.assert_close(_logits(model, x), _logits(zeroed, x), rtol=1e-5, atol=1e-5)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.normalized_shape == (22,) and m.weight.shape == (22,) for m in norms)
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape == (100, 22)
        assert model.transformer.wpe.weight.shape == (32, 22)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(load_pretrained(tmp_path), x), _logits(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "opt", "vit", "swin", "convnext"])
def test_hidden_width_of_rms_norm_and_vision_models_runs_and_reloads(name, tmp_path):
    model, x = _build(name)
    plain = copy.deepcopy(model)
    narrow = pk.structured.prune(plain, x, 0.3).params_after
    report = pk.structured.prune(model, x, 0.3, hidden=True)
    assert report.params_after < narrow  # the hidden width went too
    assert _logits(model, x).shape == _logits(plain, x).shape
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(load_pretrained(tmp_path), x), _logits(model, x), rtol=0, atol=0)


def test_readme_hugging_face_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Prune a Hugging Face model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    lines = code.strip().splitlines()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile("\n".join(lines[:4]), "README.md", "exec"), scope)  # build, prune, save
    saved = scope["model"]
    x = {"input_ids": torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))}
    exec(compile(lines[4], "README.md", "exec"), scope)  # reload
    model = scope["model"]
    assert model is not saved and model.config.intermediate_size == 358  # 512 - 30%
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 3
    torch.testing.assert_close(_logits(model, x), _logits(saved.eval(), x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "llama_gqa"])
def test_pk_save_and_load_into_a_fresh_model(name, tmp_path):
    model, x = _build(name)
    pk.structured.prune(model, x, 0.3)
    pk.save(model, tmp_path / "pruned.safetensors")
    fresh, _ = _build(name)
    pk.load(fresh, tmp_path / "pruned.safetensors")
    torch.testing.assert_close(_logits(fresh, x), _logits(model, x), rtol=0, atol=0)


def test_eager_trace_sizes_keep_their_source_so_views_follow_a_removal():
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.conv, self.c = nn.Linear(4, 8), nn.Conv2d(8, 6, 1), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if x.abs().sum() > 0:  # forces the eager trace
                b, c = h.shape
                h = h.view(b, c, 1, 1)  # sizes read from the tensor: they follow a removal
            h = self.conv(h).flatten(1)
            return self.c(h)

    model = Reshaping()
    x = torch.randn(3, 4)
    graph = pk.structured.DependencyGraph(model, x)
    assert sorted(g.size for g in graph.groups()) == [6, 8]
    with torch.no_grad():
        model.a.weight[[1, 5]] = 0
        model.a.bias[[1, 5]] = 0
    expected = model(x)
    pk.structured.remove(model, x, "a", [1, 5])
    assert model.conv.in_channels == 6
    torch.testing.assert_close(model(x), expected)

    class Fixed(Reshaping):
        def forward(self, x):
            h = torch.relu(self.a(x))
            if x.abs().sum() > 0:
                h = h.view(3, 8, 1, 1)  # sizes written as numbers: the channels are pinned
            return self.c(self.conv(h).flatten(1))

    graph = pk.structured.DependencyGraph(Fixed(), x)
    assert [g.size for g in graph.groups()] == [6]
    assert any("view" in b.reason for b in graph.boundaries())


@pytest.mark.parametrize("name", list(MORE))
def test_more_architectures_pruned_with_heads_equal_their_zeroed_original(name):
    model, x = _build(name)
    heads = pk.structured.DependencyGraph(model, x).groups()[0]
    assert heads.size in (2, 4) and "in" in {r for m in heads.members for r in m.roles}  # attention heads
    zeroed = copy.deepcopy(model)
    pk.structured.prune(zeroed, x, 0.3, physical=False)
    report = pk.structured.prune(model, x, 0.3)
    assert report.params_after < report.params_before
    expected = _logits(zeroed, x)
    scale = expected.abs().max()
    torch.testing.assert_close(_logits(model, x) / scale, expected / scale, rtol=1e-5, atol=1e-5)
