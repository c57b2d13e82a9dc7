"""Layer-wise OBS (method="obs"): saliencies and updates against brute-force least squares."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.criteria.obs import OBS, layer_inputs, obs_saliency

torch.set_num_threads(1)


def _linear_case(seed=0, out=3, d=5, n=40):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, out, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, d, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return layer, x


def _lstsq_row(w, x, keep):
    """min ||x w - x_K v||: the kept weights of one row re-fitted to the row's original outputs."""
    target = x @ w
    v = np.linalg.lstsq(x[:, keep].numpy(), target.numpy(), rcond=None)[0]
    error = np.square(target.numpy() - x[:, keep].numpy() @ v).sum()
    return torch.from_numpy(v), float(error)


def test_one_weight_matches_brute_force_obs():
    layer, x = _linear_case()
    w0 = layer.weight.detach().clone()
    out, d = w0.shape
    # brute force: remove each weight in turn, re-fit its row exactly, keep the cheapest removal
    best = min(((r, q) for r in range(out) for q in range(d)),
               key=lambda rq: _lstsq_row(w0[rq[0]], x, [j for j in range(d) if j != rq[1]])[1])
    errors = torch.tensor([[_lstsq_row(w0[r], x, [j for j in range(d) if j != q])[1] for q in range(d)]
                           for r in range(out)], dtype=torch.float64)
    H = 2 * x.t() @ x / x.shape[0]
    # saliency = w_q^2 / [H^-1]_qq = the added error 2/n ||X dw||^2
    assert torch.allclose(obs_saliency(w0, H), 2 * errors / x.shape[0], rtol=1e-8)

    pk.prune(layer, 1 / (out * d), method=OBS(damp=0.0), scope="local", data=[(x, torch.zeros(len(x)))])
    w1 = layer.weight.detach()
    r, q = best
    assert (w1 == 0).sum() == 1 and w1[r, q] == 0
    refit, _ = _lstsq_row(w0[r], x, [j for j in range(d) if j != q])
    assert torch.allclose(w1[r, [j for j in range(d) if j != q]], refit, atol=1e-10)
    Hinv = torch.linalg.inv(H)
    closed = w0[r] - w0[r, q] / Hinv[q, q] * Hinv[:, q]  # OBS: dw = -w_q / [H^-1]_qq * H^-1_{:,q}
    assert torch.allclose(w1[r], closed, atol=1e-10)
    others = [i for i in range(out) if i != r]
    assert torch.equal(w1[others], w0[others])


def test_many_weights_rows_are_least_squares_refits():
    layer, x = _linear_case(seed=1, out=4, d=8, n=60)
    w0 = layer.weight.detach().clone()
    pk.prune(layer, 0.5, method=OBS(damp=0.0), scope="local", data=[(x[:30], None), (x[30:], None)])
    w1 = layer.weight.detach()
    for r in range(w0.shape[0]):
        keep = (w1[r] != 0).nonzero().flatten().tolist()
        refit, _ = _lstsq_row(w0[r], x, keep)
        assert torch.allclose(w1[r, keep], refit, atol=1e-9)


def test_conv_update_is_optimal_for_the_convolution_itself():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    x = torch.randn(16, 3, 7, 7, dtype=torch.float64)
    reference = conv(x).detach()
    pk.prune(conv, 0.5, method=OBS(damp=0.0), data=[(x, None)])
    w = conv.weight.detach().clone().requires_grad_(True)
    loss = (F.conv2d(x, w, conv.bias, stride=2, padding=1) - reference).square().sum()
    (grad,) = torch.autograd.grad(loss, w)
    kept = conv.weight.detach() != 0
    # the kept weights sit at the least-squares optimum of the layer's output error: zero gradient there
    assert grad[kept].abs().max() < 1e-8 * loss.item() + 1e-9
    assert kept.float().mean() == 0.5


def test_unfold_columns_follow_the_weight_layout():
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    rows = layer_inputs(conv, x)  # (4 * 6, 2 * 3)
    out = rows @ conv.weight.reshape(3, -1).t() + conv.bias
    assert torch.allclose(out.reshape(4, 6, 3).transpose(1, 2), conv(x))


def test_obs_needs_data_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(4, 3))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="obs.*data"):
        pk.prune(model, 0.5, method="obs")
    assert torch.equal(model[0].weight, before) and not pk.masks(model)


def test_obs_through_the_pruner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    data = [(torch.randn(32, 6), torch.randint(0, 2, (32,)))]
    pruner = pk.Pruner(model, pk.schedules.OneShot(0.5, at=0), method="obs", data=data, scope="local")
    pruner.step()
    assert abs(pk.sparsity(model) - 0.5) < 0.05


@pytest.mark.slow
def test_obs_beats_magnitude_one_shot_on_digits(lenet_digits, digits_loaders):
    import copy

    from prunekit.data import evaluate

    train_loader, test_loader = digits_loaders
    magnitude, obs = copy.deepcopy(lenet_digits.model), copy.deepcopy(lenet_digits.model)
    pk.prune(magnitude, 0.9, method="magnitude", scope="local")
    pk.prune(obs, 0.9, method="obs", scope="local", data=train_loader)
    assert evaluate(obs, test_loader) > evaluate(magnitude, test_loader) + 0.05


@pytest.mark.slow
def test_obs_from_a_recipe(tmp_path):
    from prunekit.recipe_run import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {builtin: tinymlp}\ndata: {name: digits}\nprune: {method: obs, sparsity: 0.5, scope: local}\n"
                      "train: {epochs: 1}\noutput: {report: false, save: false}\n")
    results = run_recipe(recipe, out_dir=tmp_path / "out")
    assert abs(results["after"]["sparsity"] - 0.5) < 0.01


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        g = torch.Generator().manual_seed(rank)  # each rank its own shard
        shard = [(torch.randn(20, 6, generator=g), torch.zeros(20, dtype=torch.long))]
        pk.prune(DDP(model), 0.5, method=OBS(rounds=2), scope="local", data=shard)
        torch.save({n: p.detach().clone() for n, p in model.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_obs_under_ddp_uses_every_ranks_inputs(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    both = []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        both.append((torch.randn(20, 6, generator=g), torch.zeros(20, dtype=torch.long)))
    pk.prune(model, 0.5, method=OBS(rounds=2), scope="local", data=both)  # one process, both shards
    for key, value in model.state_dict().items():
        assert torch.equal(results[0][key], results[1][key]), key
        torch.testing.assert_close(results[0][key], value, rtol=1e-5, atol=1e-6)


def test_unsupported_layers_are_named_before_anything_changes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="0.weight.*grouped"):
        pk.prune(model, 0.5, method="obs", data=[(torch.randn(2, 4, 3, 3), torch.zeros(2, dtype=torch.long))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not pk.masks(model)
