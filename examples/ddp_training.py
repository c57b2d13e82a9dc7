"""Pruning during DistributedDataParallel training: every rank ends with the same masks.

    torchrun --nproc_per_node=2 examples/ddp_training.py                 # CPU: gloo
    torchrun --nproc_per_node=4 examples/ddp_training.py --method rigl   # GPUs: nccl, one per process

Each process trains LeNet-300-100 on its own shard of the digits, with a ``Pruner`` (gradual magnitude
pruning to 90%), or with RigL at 90% sparsity, or with L0 gates. prunekit reduces statistics across ranks
and broadcasts rank 0's decisions, so the masks (and with DDP the weights) agree bit for bit: each rank
prints a checksum of its masks, and rank 0 checks them all.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import prunekit as pk
from prunekit.data import digits, evaluate
from prunekit.models import LeNet300100
from prunekit.regularizers import L0
from prunekit.training import RigL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["pruner", "rigl", "l0"], default="pruner")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    train_set, test_set = digits()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    model = LeNet300100().to(device)
    gates = L0(model, "weight", droprate_init=0.1) if args.method == "l0" else None  # wrap before DDP
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    gate_ids = {id(p) for p in gates.parameters()} if gates is not None else set()
    opt = torch.optim.Adam(  # the gates learn faster than the weights (see pk.regularizers.L0)
        [{"params": [p for p in ddp.parameters() if id(p) not in gate_ids]},
         {"params": [p for p in ddp.parameters() if id(p) in gate_ids], "lr": 0.1}],
        lr=3e-3,
    )
    steps = args.epochs * len(loader)
    if args.method == "pruner":
        stepper = pk.Pruner(ddp, pk.schedules.AGP(initial=0.0, final=0.9, start=0, end=steps // 2, every=20))
    elif args.method == "rigl":
        stepper = RigL(ddp, 0.9, end=int(0.75 * steps), update_every=25, optimizer=opt)
    else:
        stepper = None

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
            if gates is not None:
                loss = loss + 15.0 * gates.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if stepper is not None:
                stepper.step()
    if gates is not None:
        gates.to_masks()

    masks = pk.masks(model)
    checksum = torch.tensor(
        [float(sum(int(m.flatten().nonzero().sum()) for m in masks.values()))], dtype=torch.float64, device=device
    )
    every = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(every, checksum)
    print(f"rank {rank}: sparsity {pk.sparsity(model):.2%}, mask checksum {int(checksum.item())}", flush=True)
    if rank == 0:
        same = all(torch.equal(c, every[0]) for c in every)
        model.eval()
        print(f"masks identical on all {world} ranks: {same}; test accuracy "
              f"{evaluate(model.cpu(), DataLoader(test_set, batch_size=256)):.2%}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
