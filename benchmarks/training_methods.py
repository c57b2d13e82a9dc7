#!/usr/bin/env python
"""Pruning before and during training on digits: accuracy and sparsity of every training-time method.

LeNet-300-100 on scikit-learn's digits (1437 train / 360 test images, fixed split), Adam, batch 64, one
thread, seeded. Each method runs on ``--seeds`` seeds; the table gives the mean (and the spread) of the
test accuracy and of the sparsity of the prunable weights (the three Linear weight matrices, 50,200
weights), and the accuracy difference to the dense network of the same seed.

    .venv/bin/python benchmarks/training_methods.py                    # every method, 3 seeds (~10 min)
    .venv/bin/python benchmarks/training_methods.py --quick --seeds 1 --methods dense rigl --no-save   # smoke

Results go to ``benchmarks/results/training_methods.{md,json}`` (``--out`` elsewhere, ``--no-save`` not at
all). What each row does is in ``METHODS`` below and in the Markdown file's notes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, not whatever is installed

import prunekit as pk  # noqa: E402
from prunekit.data import digits, evaluate, loaders, make_optimizer, train  # noqa: E402
from prunekit.models import LeNet300100  # noqa: E402
from prunekit.regularizers import L0, LearnedMasks, SparseVD, get_penalty  # noqa: E402
from prunekit.training import SET, LotteryTicket, RigL, SETCosine, capture, rewind  # noqa: E402
from measuring import save_results  # noqa: E402


@dataclass
class Config:
    epochs: int = 30  # from-scratch training
    lr: float = 3e-3
    pre_epochs: int = 20  # dense pre-training of the methods that start from a trained network
    post_epochs: int = 20  # their sparsifying phase
    lottery_epochs: int = 10  # each round of iterative magnitude pruning
    lottery_long_epochs: int = 30  # the same with the dense network's full training per round
    finetune_epochs: int = 8


@dataclass
class Run:
    accuracy: float
    sparsity: float
    seconds: float


class Context:
    def __init__(self, seed: int, cfg: Config) -> None:
        self.seed, self.cfg = seed, cfg
        self.train_set, self.test_set = digits()
        self._dense: dict[str, torch.nn.Module] = {}

    def loaders(self):
        return loaders(self.train_set, self.test_set, batch_size=64, seed=self.seed)

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return LeNet300100()

    def evaluate(self, model) -> float:
        return evaluate(model, self.loaders()[1])

    def fit(self, model, epochs, lr=None, optimizer="adam", callback=None) -> None:
        torch.manual_seed(self.seed + 1)
        train(model, self.loaders()[0], epochs=epochs, lr=self.cfg.lr if lr is None else lr, optimizer=optimizer,
              callback=callback)

    def pretrained(self, epochs: int) -> torch.nn.Module:
        """A dense network trained for ``epochs`` (cached per seed)."""
        import copy

        key = f"dense-{epochs}"
        if key not in self._dense:
            model = self.model()
            self.fit(model, epochs)
            self._dense[key] = model
        return copy.deepcopy(self._dense[key])

    def steps_per_epoch(self) -> int:
        return len(self.loaders()[0])

    def manual_loop(self, model, epochs: int, loss_extra: Callable[[int], torch.Tensor], optimizer, after_step=None):
        torch.manual_seed(self.seed + 1)
        loader = self.loaders()[0]
        model.train()
        for epoch in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + loss_extra(epoch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()


def _param_groups(model, special, lr_special, lr=1e-3):
    ids = {id(p) for p in special}
    return torch.optim.Adam(
        [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": list(special), "lr": lr_special}],
        lr=lr,
    )


# --- the methods: each returns the trained (pruned) model -------------------------------------------


def dense(ctx: Context):
    """LeNet-300-100 trained dense, 30 epochs, Adam lr 3e-3: the reference of the "vs dense" column."""
    model = ctx.model()
    ctx.fit(model, ctx.cfg.epochs)
    return model


def magnitude_finetune(ctx: Context):
    """Han et al. 2015: train dense, then iterative global magnitude pruning to 90% while fine-tuning."""
    model = ctx.pretrained(ctx.cfg.epochs)
    every = 2 * ctx.steps_per_epoch()
    pruner = pk.Pruner(model, pk.schedules.Iterative(final=0.9, steps=3, every=every))
    ctx.fit(model, ctx.cfg.finetune_epochs, lr=5e-4, callback=lambda step: pruner.step())
    return model


def _lottery(ctx: Context, rewind_step: int, long: bool = False):
    epochs, lr = (ctx.cfg.lottery_long_epochs, ctx.cfg.lr) if long else (ctx.cfg.lottery_epochs, 1e-3)
    model = ctx.model()
    ticket = LotteryTicket(model, rate=0.5, rewind_step=rewind_step)
    ticket.run(lambda m, cb: ctx.fit(m, epochs, lr=lr, callback=cb), rounds=4)
    ctx.ticket = ticket
    return model


def _control(ctx: Context, long: bool = False):
    epochs, lr = (ctx.cfg.lottery_long_epochs, ctx.cfg.lr) if long else (ctx.cfg.lottery_epochs, 1e-3)
    _lottery(ctx, 0, long)
    control = ctx.ticket.control(seed=10_000 + ctx.seed, factory=LeNet300100)
    ctx.fit(control, epochs, lr=lr)
    return control


def lottery_init(ctx: Context):
    """Frankle & Carbin 2019: IMP, 50% of the remaining weights per round, 4 rounds (93.75%), reset to init;
    every round trains 10 epochs at lr 1e-3 (a short budget)."""
    return _lottery(ctx, 0)


def lottery_late(ctx: Context):
    """Frankle et al. 2019: the same, rewinding to the weights after one epoch (late resetting)."""
    return _lottery(ctx, ctx.steps_per_epoch())


def lottery_random_reinit(ctx: Context):
    """The control: the lottery ticket's mask on a fresh random initialisation, trained the same way."""
    return _control(ctx)


def lottery_long(ctx: Context):
    """The lottery ticket again, every round trained like the dense network (30 epochs at lr 3e-3)."""
    return _lottery(ctx, 0, long=True)


def lottery_long_control(ctx: Context):
    """Its random re-initialisation control, trained 30 epochs at lr 3e-3."""
    return _control(ctx, long=True)


def _schedule_run(ctx: Context, rewinding: bool):
    model = ctx.model()
    opt = make_optimizer(model, "adam", ctx.cfg.lr)
    steps = ctx.steps_per_epoch()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[20 * steps], gamma=0.1)
    saved = {}

    def on_step(step):
        sched.step()
        if step == 10 * steps:
            saved["point"] = capture(model, step=step, optimizer=opt, scheduler=sched)

    ctx.fit(model, 30, optimizer=opt, callback=on_step)
    pk.prune(model, 0.9)
    if rewinding:
        rewind(model, saved["point"], optimizer=opt, scheduler=sched, weights=False)
    else:
        opt.state.clear()
    ctx.fit(model, 20, optimizer=opt, callback=lambda step: sched.step() if rewinding else None)
    return model


def oneshot_finetune(ctx: Context):
    """Dense training, lr 3e-3 for 20 epochs then 3e-4 for 10; one-shot global magnitude pruning to 90%;
    20 epochs of fine-tuning at the final rate, 3e-4 (the standard fine-tuning of Renda et al. 2020)."""
    return _schedule_run(ctx, rewinding=False)


def lr_rewinding(ctx: Context):
    """The same dense run and pruning; then the learning-rate schedule is rewound to epoch 10 and replayed
    for 20 epochs (10 at 3e-3, 10 at 3e-4) with the trained weights kept (Renda et al. 2020)."""
    return _schedule_run(ctx, rewinding=True)


def _at_init(method: str):
    def run(ctx: Context):
        model = ctx.model()
        loader = ctx.loaders()[0]
        pk.prune(model, 0.9, method=method, data=loader)
        ctx.fit(model, ctx.cfg.epochs)
        return model

    run.__doc__ = f"{method} at initialisation to 90% (global), then {Config.epochs} epochs of training."
    return run


def random_erk(ctx: Context):
    """Static random ERK mask at 90% from the start, never updated (the baseline of SET/RigL)."""
    model = ctx.model()
    pk.prune(model, 0.9, method="random", scope="erk", seed=ctx.seed)
    ctx.fit(model, ctx.cfg.epochs)
    return model


def _dst(cls):
    def run(ctx: Context):
        model = ctx.model()
        opt = make_optimizer(model, "adam", ctx.cfg.lr)
        total = ctx.cfg.epochs * ctx.steps_per_epoch()
        dst = cls(model, 0.9, end=int(0.75 * total), update_every=25, distribution="erk", optimizer=opt, seed=ctx.seed)
        ctx.fit(model, ctx.cfg.epochs, optimizer=opt, callback=lambda step: dst.step())
        return model

    run.__doc__ = f"{cls.__name__}: 90%, ERK, update every 25 steps until 75% of training, alpha 0.3, cosine decay."
    return run


def set_mocanu(ctx: Context):
    """SET as in Mocanu et al.: 90%, ERK, once per epoch for the whole training, zeta 0.3 of the smallest
    positive and of the largest negative weights dropped, random regrowth."""
    model = ctx.model()
    opt = make_optimizer(model, "adam", ctx.cfg.lr)
    total = ctx.cfg.epochs * ctx.steps_per_epoch()
    dst = SET(model, 0.9, end=total, update_every=ctx.steps_per_epoch(), zeta=0.3, distribution="erk",
              optimizer=opt, seed=ctx.seed)
    ctx.fit(model, ctx.cfg.epochs, optimizer=opt, callback=lambda step: dst.step())
    return model


def _penalty(name: str, strength: float, threshold: float, proximal: bool = False, **kwargs):
    def run(ctx: Context):
        model = ctx.model()
        penalty = get_penalty(name, model, strength=strength, **kwargs)
        opt = make_optimizer(model, "adam", ctx.cfg.lr)
        extra = (lambda epoch: 0.0) if proximal else (lambda epoch: penalty())
        after = (lambda: penalty.proximal_step(ctx.cfg.lr)) if proximal else None
        ctx.manual_loop(model, ctx.cfg.epochs, extra, opt, after)
        penalty.prune(threshold)
        return model

    how = "proximal steps" if proximal else "in the loss"
    run.__doc__ = f"{name} (lambda {strength:g}, {how}) for {Config.epochs} epochs, then pruned at |w| <= {threshold:g}."
    return run


def _l0(granularity: str, lam: float, **kwargs):
    def run(ctx: Context):
        model = ctx.pretrained(ctx.cfg.pre_epochs)
        l0 = L0(model, granularity, droprate_init=0.1, **kwargs)
        opt = _param_groups(model, l0.parameters(), 0.1)
        ctx.manual_loop(model, ctx.cfg.post_epochs, lambda epoch: lam * l0.penalty(), opt)
        l0.to_masks()
        return model

    run.__doc__ = (f"L0 gates on {granularity}s (lambda {lam:g} x expected density; gates' lr 0.1) for "
                   f"{Config.post_epochs} epochs after {Config.pre_epochs} dense ones; deterministic gates -> masks.")
    return run


def sparse_vd(ctx: Context):
    """Sparse VD from scratch, 30 epochs, KL weight annealed 0 -> 0.1 over 10 epochs; log alpha > 3 pruned."""
    model = ctx.model()
    vd = SparseVD(model)
    opt = make_optimizer(model, "adam", ctx.cfg.lr)
    n = len(ctx.train_set)
    ctx.manual_loop(model, ctx.cfg.epochs, lambda epoch: 0.1 * min(1.0, epoch / 10) * vd.kl() / n, opt)
    vd.to_masks()
    return model


def hard_movement(ctx: Context):
    """Learned top-k masks (hard movement pruning) from a dense network, density 1 -> 0.1 on AGP over 70%
    of 20 epochs; scores' lr 1e-2."""
    model = ctx.pretrained(ctx.cfg.pre_epochs)
    steps = ctx.cfg.post_epochs * ctx.steps_per_epoch()
    lm = LearnedMasks(model, "topk", schedule=pk.schedules.AGP(0.0, 0.9, 0, int(0.7 * steps), 10))
    opt = _param_groups(model, lm.parameters(), 1e-2)
    ctx.manual_loop(model, ctx.cfg.post_epochs, lambda epoch: 0.0, opt, lm.step)
    lm.to_masks()
    return model


def soft_movement(ctx: Context):
    """Learned threshold masks (soft movement pruning): sigmoid(S) > 0.5, scores from 1, penalty 1.0 x
    mean sigmoid(S); 20 epochs from a dense network."""
    model = ctx.pretrained(ctx.cfg.pre_epochs)
    lm = LearnedMasks(model, "threshold", threshold=0.5, init="constant", init_value=1.0)
    opt = _param_groups(model, lm.parameters(), 1e-2)
    ctx.manual_loop(model, ctx.cfg.post_epochs, lambda epoch: 1.0 * lm.penalty(), opt)
    lm.to_masks()
    return model


METHODS: dict[str, tuple[str, Callable[[Context], torch.nn.Module]]] = {
    "dense": ("dense (30 epochs)", dense),
    "magnitude": ("magnitude, iterative + fine-tune (Han 2015)", magnitude_finetune),
    "oneshot_finetune": ("one-shot magnitude + fine-tune at final lr", oneshot_finetune),
    "lr_rewinding": ("one-shot magnitude + learning-rate rewinding (Renda 2020)", lr_rewinding),
    "lottery": ("lottery ticket, IMP, rewind to init", lottery_init),
    "lottery_late": ("lottery ticket, IMP, rewind to epoch 1", lottery_late),
    "lottery_control": ("same mask, random re-init (control)", lottery_random_reinit),
    "lottery_long": ("lottery ticket, rewind to init, 30 epochs per round", lottery_long),
    "lottery_long_control": ("same mask, random re-init, 30 epochs", lottery_long_control),
    "snip": ("SNIP at init (Lee 2019)", _at_init("snip")),
    "synflow": ("SynFlow at init, 100 rounds (Tanaka 2020)", _at_init("synflow")),
    "random_erk": ("static random mask, ERK", random_erk),
    "set": ("SET, ERK (Mocanu 2018)", set_mocanu),
    "set_cosine": ("SET growth, RigL's cosine |w| drop (SETCosine)", _dst(SETCosine)),
    "rigl": ("RigL, ERK (Evci 2020)", _dst(RigL)),
    "l1": ("L1 penalty + threshold", _penalty("l1", 5e-4, 1e-2)),
    "l1_prox": ("L1 proximal steps, exact zeros", _penalty("l1", 0.3, 0.0, proximal=True)),
    "group_lasso": ("group lasso on neurons + threshold", _penalty("group_lasso", 1e-3, 1e-2, groups="neuron", exclude=["fc3"])),
    "sparse_group_lasso": ("sparse group lasso on neurons + threshold",
                           _penalty("sparse_group_lasso", 1e-3, 1e-2, groups="neuron", exclude=["fc3"])),
    "l0": ("L0 gates on weights (Louizos 2018)", _l0("weight", 15.0)),
    "l0_neuron": ("L0 gates on neurons", _l0("neuron", 5.0, exclude=["fc3"])),
    "sparse_vd": ("sparse variational dropout (Molchanov 2017)", sparse_vd),
    "hard_movement": ("learned masks, top-k (hard movement)", hard_movement),
    "soft_movement": ("learned masks, threshold (soft movement)", soft_movement),
}


def _weight_sparsity(model) -> float:
    """Fraction of zeros among the Linear weights (what every method prunes), masked or stored."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            zeros += int((module.weight.detach() == 0).sum())
            total += module.weight.numel()
    return zeros / total


def run_method(name: str, seed: int, cfg: Config, ctx: Context | None = None) -> Run:
    ctx = ctx or Context(seed, cfg)
    start = time.perf_counter()
    model = METHODS[name][1](ctx)
    seconds = time.perf_counter() - start
    return Run(ctx.evaluate(model), _weight_sparsity(model), seconds)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(results: dict, seeds: list[int], cfg: Config) -> str:
    dense_acc = {s: results["dense"][str(s)]["accuracy"] for s in seeds} if "dense" in results else None
    lines = [
        f"LeNet-300-100 on digits, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); mean ± standard deviation.",
        "",
        "| method | sparsity | test accuracy | vs dense | time s* |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, per_seed in results.items():
        runs = [per_seed[str(s)] for s in seeds]
        acc, acc_sd = _mean_spread([r["accuracy"] * 100 for r in runs])
        sp, sp_sd = _mean_spread([r["sparsity"] * 100 for r in runs])
        sec = statistics.fmean(r["seconds"] for r in runs)
        delta = ""
        if dense_acc and name != "dense":
            d, d_sd = _mean_spread([(r["accuracy"] - dense_acc[s]) * 100 for r, s in zip(runs, seeds)])
            delta = f"{d:+.1f} ± {d_sd:.1f}" if len(seeds) > 1 else f"{d:+.1f}"
        spread = f" ± {acc_sd:.1f}" if len(seeds) > 1 else ""
        sp_spread = f" ± {sp_sd:.1f}" if len(seeds) > 1 and sp_sd >= 0.05 else ""
        lines.append(f"| {METHODS[name][0]} | {sp:.1f}%{sp_spread} | {acc:.1f}{spread} | {delta} | {sec:.0f} |")
    lines += ["", "What each row does:", ""]
    for name in results:
        lines.append(f"* **{METHODS[name][0]}**: {' '.join((METHODS[name][1].__doc__ or '').split())}")
    lines += ["", f"Settings: {cfg}; torch {torch.__version__}, one thread, {platform.machine()}.",
              "*Wall time of the whole row (its training included), on a shared machine: indicative only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a few epochs per phase: a smoke run, not results")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = (Config(epochs=2, pre_epochs=1, post_epochs=1, lottery_epochs=1, lottery_long_epochs=1, finetune_epochs=2)
           if args.quick else Config())
    seeds = list(range(args.seeds))
    methods = args.methods if "dense" in args.methods else ["dense", *args.methods]
    results: dict[str, dict[str, dict]] = {name: {} for name in methods}
    for seed in seeds:
        ctx = Context(seed, cfg)  # shares the pretrained dense networks between methods of one seed
        for name in methods:
            run = run_method(name, seed, cfg, ctx)
            results[name][str(seed)] = run.__dict__
            print(f"seed {seed}  {name:<20} sparsity {run.sparsity:6.2%}  accuracy {run.accuracy:6.2%}  "
                  f"{run.seconds:6.1f} s", flush=True)
    table = markdown(results, seeds, cfg)
    print()
    print(table)
    if not args.no_save:
        payload = {"config": cfg.__dict__, "seeds": seeds, "torch": torch.__version__, "results": results}
        save_results(args.out, "training_methods", table, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
