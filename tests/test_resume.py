"""Checkpoints of pruning runs resume and load: a real Hugging Face Trainer, a tiny Llama, CPU."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit.training import hf_callback

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class KillAt(transformers.TrainerCallback):
    """Kills the process (SIGKILL: no clean-up) right after the checkpoint of ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def hf_run(out, model, kill=None, resume=None):
    pruner = pk.Pruner(model, pk.schedules.AGP(initial=0.0, final=0.5, start=0, end=6, every=2))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
        save_strategy="steps", save_steps=4, report_to=[], logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    callbacks = [hf_callback(pruner)] + ([KillAt(kill)] if kill else [])  # prunekit's on_save runs first
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return pruner


def killed_run(out, step):
    """``hf_run`` in another process, killed with SIGKILL after the checkpoint of ``step``."""
    here = str(Path(__file__).resolve().parent)
    code = (f"import sys, torch; sys.path.insert(0, {here!r}); torch.set_num_threads(1); import test_resume as t; "
            f"t.hf_run({str(out)!r}, t.tiny_llama(), kill={step})")
    src = str(Path(here).parent / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def effective(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_hugging_face_trainer_killed_and_resumed_continues_the_schedule(tmp_path):
    whole = tiny_llama()
    whole_pruner = hf_run(tmp_path / "whole", whole)
    assert [r.target_sparsity for r in whole_pruner.history] == pytest.approx([0.5 * (1 - (1 - k / 3) ** 3) for k in range(4)][1:])

    done = killed_run(tmp_path / "run", 4)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert checkpoint.is_dir() and not (tmp_path / "run" / "checkpoint-8").exists()
    # a checkpoint is a plain model: from_pretrained gives the trained, pruned weights
    final = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-8")
    assert all(torch.equal(final.state_dict()[k], v) for k, v in effective(whole).items())
    plain = transformers.LlamaForCausalLM.from_pretrained(checkpoint)
    same_step = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-4")
    for key, value in same_step.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert 0 < pk.sparsity(plain) < 0.5

    resumed_model = tiny_llama(seed=123)  # other initial weights: everything must come from the checkpoint
    resumed = hf_run(tmp_path / "run", resumed_model, resume=str(checkpoint))
    assert resumed.step_count == 8
    assert [r.target_sparsity for r in resumed.history] == pytest.approx([r.target_sparsity for r in whole_pruner.history][-2:])  # no prune step ran twice
    assert pk.sparsity(resumed_model) == pk.sparsity(whole) == 0.5
    for name, mask in pk.masks(whole).items():
        assert torch.equal(pk.masks(resumed_model)[name], mask), name
    final = effective(resumed_model)
    for key, value in effective(whole).items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


def test_llm_prune_then_save_pretrained_then_from_pretrained(tmp_path):
    model = tiny_llama()
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    pk.llm.prune(model, calibration, method="wanda", sparsity=0.5)
    assert pk.masks(model)
    model.save_pretrained(tmp_path / "pruned")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    ids = torch.randint(0, 64, (2, 16))
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    assert pk.sparsity(plain, count="zeros", per_layer=True)["model.layers.0.mlp.down_proj.weight"] == 0.5
    restored = pk.restore_masks(plain)
    assert set(restored) == set(pk.masks(model))
