"""A Lightning run checkpointed mid-pruning resumes into a fresh model exactly as if never stopped (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.training import lightning_callback

lightning = pytest.importorskip("lightning")


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 16, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, :4].argmax(dim=1)))


class Module(lightning.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)  # momentum: state per parameter


def fit(tmp_path, module, epochs, ckpt=None):
    pruner = pk.Pruner(module.net, pk.schedules.AGP(initial=0.0, final=0.5, start=0, end=9, every=3))
    trainer = lightning.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[lightning_callback(pruner)],
    )
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)  # 6 steps per epoch
    trainer.fit(module, loader, ckpt_path=ckpt)
    return trainer, pruner


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
@pytest.mark.parametrize("pruned_before_fit", [False, True])
def test_lightning_resume_mid_pruning_matches_an_uninterrupted_run(tmp_path, pruned_before_fit):
    def module(seed=0):
        m = Module(seed)
        if pruned_before_fit:  # masks before the optimizer is built: another parameter order
            pk.prune(m.net, 0.2, targets=["0.weight"])
        return m

    whole = module()
    fit(tmp_path, whole, epochs=3)
    first = module()
    trainer, pruner = fit(tmp_path, first, epochs=1)  # stopped after 6 steps, mid-schedule
    assert 0 < pk.sparsity(first.net) < 0.5
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["state_dict"]
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}  # the dense keys

    resumed = Module(seed=7)  # a fresh, unpruned model with other weights, as a new process would have
    trainer, pruner = fit(tmp_path, resumed, epochs=3, ckpt=tmp_path / "mid.ckpt")
    assert trainer.global_step == 18 and pruner.step_count == 18
    assert pk.sparsity(resumed.net) == pk.sparsity(whole.net) == 0.5
    for name, mask in pk.masks(whole.net).items():
        assert torch.equal(pk.masks(resumed.net)[name], mask), name
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
