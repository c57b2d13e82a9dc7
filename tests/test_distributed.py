"""Everything under DistributedDataParallel: two CPU processes (gloo), each with its own shard of the
data, must end with bit-identical masks and weights. Statistics are reduced across ranks (checked
against one process that sees both shards), decisions are taken on rank 0 and broadcast."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import prunekit as pk
from prunekit import distributed
from prunekit.data import digits
from prunekit.models import LeNet300100
from prunekit.pruning import PruningSpec
from prunekit.regularizers import LearnedMasks
from prunekit.training import SET, RigL

WORLD = 2
BATCH = 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int, world: int, steps: int, offset: int = 0):
    """Rank ``rank``'s shard: disjoint batches of the digits training set."""
    x, y = digits()[0].tensors
    out = []
    for step in range(steps):
        start = ((offset + step) * world + rank) * BATCH % (len(y) - BATCH)
        out.append((x[start : start + BATCH], y[start : start + BATCH]))
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LeNet300100()
        pk.prune(model, 0.2, targets=["fc3"])  # masks exist before wrapping: DDP broadcasts their buffers
        ddp = DDP(model)
        assert distributed.is_distributed() and distributed.unwrap(ddp) is model

        # 1. SNIP at initialisation, one batch per rank: the statistics of both ranks are summed
        shard = _batches(rank, world, 1)
        spec = PruningSpec(ddp, "snip", targets=["fc1"])
        reduced = spec.statistics(shard, None)
        with distributed.local():
            both = [_batches(r, world, 1)[0] for r in range(world)]
            local = PruningSpec(model, "snip", targets=["fc1"]).statistics(both, None, max_batches=world)
        assert reduced["fc1.weight"].count == world
        torch.testing.assert_close(reduced["fc1.weight"].grad_abs_sum, local["fc1.weight"].grad_abs_sum)
        pk.prune(ddp, 0.5, method="snip", data=shard, targets=["fc1"])

        # 2. training: a Pruner with gradients of the training steps on fc2, RigL on fc1, SET on fc3;
        # the random growth uses a different seed on each rank, so only the broadcast keeps them equal
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        pruner = pk.Pruner(ddp, pk.schedules.Iterative(final=0.8, steps=2, every=4), method="taylor", targets=["fc2"])
        rigl = RigL(ddp, 0.5, end=12, update_every=3, optimizer=opt, targets=["fc1"])
        grower = SET(ddp, 0.5, end=12, update_every=4, optimizer=opt, targets=["fc3"], seed=rank)
        for x, y in _batches(rank, world, 12, offset=1):
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            pruner.step()
            rigl.step()
            grower.step()
        assert len(rigl.history) == 3 and len(grower.history) == 2 and len(pruner.history) == 2

        # 3. learned masks: the scores are parameters, so DDP keeps them equal too
        learned = LeNet300100()
        lm = LearnedMasks(learned, "topk", density=0.3, targets=["fc2"])
        learned_ddp = DDP(learned)
        lopt = torch.optim.SGD(learned_ddp.parameters(), lr=0.1)
        for x, y in _batches(rank, world, 3, offset=20):
            lopt.zero_grad()
            F.cross_entropy(learned_ddp(x), y).backward()
            lopt.step()
        lm.to_masks()

        result = {f"mask/{n}": m.to(torch.uint8) for n, m in pk.masks(model).items()}
        result.update({f"weight/{n}": p.detach().clone() for n, p in model.named_parameters()})
        result.update({f"learned/{n}": m.to(torch.uint8) for n, m in pk.masks(learned).items()})
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masks_and_weights_agree_exactly_across_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0].keys() == results[1].keys()
    assert {"mask/fc1.weight", "mask/fc2.weight", "mask/fc3.weight", "learned/fc2.weight"} <= set(results[0])
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    sparsity = {k: 1 - float(v.float().mean()) for k, v in results[0].items() if k.startswith("mask/")}
    # fc3 keeps the 20% it had before SET started (SET keeps existing masks, at their sparsity)
    assert sparsity == pytest.approx({"mask/fc1.weight": 0.5, "mask/fc2.weight": 0.8, "mask/fc3.weight": 0.2}, abs=1e-3)


def test_helpers_without_a_process_group_are_no_ops():
    model = LeNet300100()
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    masks = {"a": torch.tensor([True, False])}
    assert distributed.broadcast_masks(masks)["a"].equal(masks["a"])
    t = torch.ones(3)
    distributed.all_reduce_sum_([t])
    assert t.equal(torch.ones(3))
    pk.prune(model, 0.5)
    assert distributed.sync_masks(model).keys() == pk.masks(model).keys()
    with distributed.local():
        assert not distributed.is_distributed()


def test_pruning_keeps_the_gradient_accumulator_that_ddp_hooks():
    model = LeNet300100()
    param = model.fc1.weight
    accumulator = param.view_as(param).grad_fn.next_functions[0][0]
    pk.prune(model, 0.5)
    from prunekit.regularizers import L0

    L0(model, "weight", targets=["fc2"])
    assert model.fc1.parametrizations.weight.original is param
    assert param.view_as(param).grad_fn.next_functions[0][0] is accumulator
