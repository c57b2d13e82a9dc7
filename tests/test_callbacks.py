"""Callbacks inside a real Lightning ``Trainer.fit`` and a real Hugging Face ``Trainer.train``."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.data import synthetic_classification
from prunekit.training import RigL, hf_callback, lightning_callback


@pytest.mark.slow
def test_importing_prunekit_training_imports_no_trainer():
    code = (
        "import sys, prunekit, prunekit.training, prunekit.regularizers; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_callbacks_refuse_objects_without_step():
    with pytest.raises(ValueError, match="at least one"):
        lightning_callback()
    with pytest.raises(TypeError, match="no step"):
        hf_callback(object())
    with pytest.raises(ValueError, match="package"):
        lightning_callback(pk.Pruner(_net(), pk.schedules.OneShot(0.5)), package="keras")


def _data(n=128):
    train_set, _ = synthetic_classification(n=n, features=16, classes=4, seed=0)
    return train_set


def _net():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.slow  # importing lightning alone takes several seconds
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # inside lightning, with this torch
def test_lightning_trainer_fit_drives_a_pruner_and_rigl_once_per_optimizer_step(tmp_path):
    lightning = pytest.importorskip("lightning")
    torch.manual_seed(0)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    module = Module()
    # taylor without data reads .grad of the training steps: the callback must run before zero_grad
    pruner = pk.Pruner(module.net, pk.schedules.Iterative(final=0.75, steps=3, every=4), method="taylor",
                       targets=["2"])
    rigl = RigL(module.net, 0.8, end=12, update_every=3, targets=["0"])
    loader = torch.utils.data.DataLoader(_data(), batch_size=16, shuffle=True)
    trainer = lightning.Trainer(
        max_steps=14, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[lightning_callback(pruner, rigl)],
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 14
    assert pruner.step_count == 14 and rigl.step_count == 14  # per optimizer step, not per batch
    assert [r.target_sparsity for r in pruner.history] == pytest.approx([1 - 0.25 ** (k / 3) for k in (1, 2, 3)])
    assert pk.sparsity(module.net, per_layer=True)["2.weight"] == pytest.approx(0.75, abs=1e-3)
    assert pk.sparsity(module.net, per_layer=True)["0.weight"] == pytest.approx(0.8, abs=1e-3)
    assert [u.step for u in rigl.history] == [3, 6, 9]
    assert len(module.net[0].parametrizations.weight) == 1  # no probe left after training


def test_hugging_face_trainer_train_drives_a_pruner(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.x, self.y = dataset.tensors

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    model = Model()
    pruner = pk.Pruner(model, pk.schedules.AGP(initial=0.0, final=0.6, start=2, end=8, every=2), method="taylor")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=16, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Dicts(_data()), callbacks=[hf_callback(pruner)])
    trainer.train()
    assert trainer.state.global_step == 10 and pruner.step_count == 10
    assert [r.target_sparsity for r in pruner.history][-1] == pytest.approx(0.6)
    assert pk.sparsity(model) == pytest.approx(0.6, abs=1e-3)
    # the masks held through the optimizer steps that followed
    for name, mask in pk.masks(model).items():
        weight = model.get_submodule(name.rpartition(".")[0]).weight
        assert weight.detach()[~mask].abs().sum() == 0
