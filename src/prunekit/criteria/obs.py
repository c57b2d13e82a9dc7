"""Layer-wise Optimal Brain Surgeon for any network: OBS saliencies and updates from calibration inputs.

For a layer ``Y = W X`` (a Linear, or a convolution seen through its unfolded im2col inputs), removing
weights is judged by the increase of the layer's output error ``||W X - W' X||^2``, whose Hessian with
respect to each row of ``W`` is ``H = 2 X X^T / n`` (Optimal Brain Compression's layer-wise form,
Frantar & Alistarh 2022; SparseGPT is its fast approximation for LLMs). Per row, with ``K`` the kept
inputs:

* saliency of weight ``q``: ``w_q^2 / [H_K^-1]_qq`` (Hassibi & Stork 1993), the error added by removing
  it alone when the other weights are re-optimised;
* update for a removed set ``P``: the kept weights move to the least-squares optimum
  ``w_K += H_KK^-1 H_KP w_P``. For one weight this is OBS's ``dw = -w_q / [H^-1]_qq * H^-1_{:,q}``.

``prune`` chooses the masks from the saliencies with any scope (``local`` keeps OBC's uniform layer-wise
setting), then moves the kept weights. With ``rounds > 1`` the sparsity is reached in rounds, re-collecting
the inputs and re-scoring with each row's reduced inverse Hessian before each: OBC's greedy removal, in
``rounds`` steps instead of one weight at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modules import eval_mode
from ..statistics import TargetStatistics, move_to, split_batch
from ..targets import Target
from .base import CRITERIA, Criterion

__all__ = ["OBS", "layer_inputs", "obs_saliency", "obs_update"]

_CHUNK = 1 << 24  # elements of the batched (rows x d x d) systems solved at once


def _conv_padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        if any(k % 2 == 0 for k in module.kernel_size):
            raise ValueError("obs: padding='same' with an even kernel is not supported")
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return tuple(module.padding)


def _check_layer(target: Target) -> None:
    module = target.module
    ok = target.param_name == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    if not ok:
        raise ValueError(f"obs handles the weights of Linear, Conv1d and Conv2d layers; {target.name} is not one")
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            raise ValueError(f"obs: {target.name} is a grouped convolution (groups={module.groups}), not supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"obs: {target.name} pads with {module.padding_mode!r}; only zero padding is supported")


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The rows ``x_j`` the layer multiplies its weight rows with: ``(samples, in_features)`` for a
    Linear, ``(samples * positions, C * prod(kernel))`` unfolded patches for a convolution (the column
    order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # (N, C, 1, L): a 1 x k convolution
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *_conv_padding(module)), (1, *module.stride)
    elif isinstance(module, nn.Conv2d):
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, _conv_padding(module), module.stride
    else:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_hessians(model: nn.Module, targets: Sequence[Target], data: Iterable, max_batches: int | None = None
                   ) -> dict[str, Tensor]:
    """``{target name: 2 X X^T / n}`` (float64) of every target's inputs over the batches of ``data``,
    collected in one pass of the model as it is (eval mode, no gradients); under DDP over every rank's
    batches."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {t.name: 0 for t in targets}

    def hook(target: Target):
        def record(module, args, output):
            rows = layer_inputs(module, args[0].detach()).to(torch.float64)
            sums[target.name] = sums.get(target.name, 0) + rows.t() @ rows
            counts[target.name] += rows.shape[0]
        return record

    handles = [t.module.register_forward_hook(hook(t)) for t in targets]
    device = targets[0].parameter.device if targets else torch.device("cpu")
    try:
        seen = 0
        with eval_mode(model), torch.no_grad():
            for batch in islice(data, max_batches):
                args, kwargs, _ = split_batch(move_to(batch, device))
                model(*args, **kwargs)
                seen += 1
        if seen == 0:
            raise ValueError("obs: the calibration data yielded no batch")
    finally:
        for h in handles:
            h.remove()
    if distributed.is_distributed():  # every rank's inputs count: the same H, masks and updates everywhere
        names = [t.name for t in targets]
        for t in targets:  # a layer this rank never ran still takes part, with zeros of its shape
            width = t.numel() // t.shape[0]
            sums.setdefault(t.name, torch.zeros(width, width, dtype=torch.float64, device=device))
        n = torch.tensor([float(counts[name]) for name in names], dtype=torch.float64, device=device)
        distributed.all_reduce_sum_([n, *(sums[name] for name in names)])
        counts.update({name: round(c) for name, c in zip(names, n.tolist())})
    missing = [t.name for t in targets if counts[t.name] == 0]
    if missing:
        raise ValueError(f"obs: the calibration forward pass never ran {', '.join(missing)}")
    return {name: 2.0 * s / counts[name] for name, s in sums.items()}


def damped(H: Tensor, damp: float) -> Tensor:
    """``H + damp * mean(diag H) * I``; inputs that are always zero get ``H_jj = 1`` (their weights
    are then free to go at no cost)."""
    H = H.clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return H


def _restricted(H: Tensor, kept: Tensor) -> Tensor:
    """Per row: ``H`` with the rows and columns of pruned inputs replaced by the identity, so its
    inverse is ``H_KK^-1`` on the kept inputs (and the identity elsewhere). ``kept``: (rows, d) bool."""
    both = kept.unsqueeze(2) & kept.unsqueeze(1)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.where(both, H.unsqueeze(0), eye.unsqueeze(0))


def _factor(M: Tensor) -> Tensor | None:
    """Batched Cholesky factors of ``M`` (symmetric), or None when one is not positive definite."""
    L, info = torch.linalg.cholesky_ex(M)
    return L if not bool(info.any()) else None


def _row_chunks(rows: int, d: int) -> Iterable[slice]:
    step = max(1, _CHUNK // max(d * d, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def obs_saliency(weight: Tensor, H: Tensor, kept: Tensor | None = None) -> Tensor:
    """``w_q^2 / [H_K^-1]_qq`` for every entry of an ``(out, d)`` weight (``H`` already damped); with
    ``kept`` each row uses the inverse over its own kept inputs."""
    W = weight.to(H.dtype)
    if kept is None:
        return W.square() / torch.linalg.inv(H).diagonal().unsqueeze(0)
    out = torch.empty_like(W)
    for rows in _row_chunks(W.shape[0], W.shape[1]):
        M = _restricted(H, kept[rows])
        L = _factor(M)  # Cholesky: twice as fast as a general inverse; LU only for a singular H (damp=0)
        inv = torch.cholesky_inverse(L) if L is not None else torch.linalg.inv(M)
        inv_diag = inv.diagonal(dim1=1, dim2=2)
        out[rows] = W[rows].square() / inv_diag
    return out.masked_fill(~kept, 0.0)


def obs_update(weight: Tensor, H: Tensor, kept: Tensor) -> Tensor:
    """The weight after removing every entry outside ``kept`` with the optimal compensation of each row:
    ``w_K + H_KK^-1 H_KP w_P`` on the kept entries, 0 on the removed ones."""
    W = weight.to(H.dtype)
    new = torch.zeros_like(W)
    for rows in _row_chunks(W.shape[0], W.shape[1]):
        k = kept[rows]
        removed = W[rows].masked_fill(k, 0.0)  # w_P, zeros elsewhere
        rhs = (removed @ H).masked_fill(~k, 0.0)  # (H_KP w_P) on K, 0 on P
        M = _restricted(H, k)
        L = _factor(M)
        delta = (torch.cholesky_solve(rhs.unsqueeze(-1), L) if L is not None
                 else torch.linalg.solve(M, rhs.unsqueeze(-1))).squeeze(-1)
        new[rows] = (W[rows] + delta).masked_fill(~k, 0.0)
    return new


@CRITERIA.register("obs", "w^2/[H^-1]_qq, H = 2XX^T/n of the layer's inputs, kept weights updated (layer-wise OBS/OBC, Frantar & Alistarh 2022)")
class OBS(Criterion):
    """Layer-wise Optimal Brain Surgeon on every Linear and Conv1d/Conv2d (see the module docstring).

    Args:
        damp: dampening, ``H + damp * mean(diag H) * I`` (0.01 as SparseGPT; 0 = exact OBS).
        rounds: prune in this many rounds, re-collecting inputs and re-scoring before each (1 = one shot;
            4 by default: at 90% sparsity one round removes whole sets of correlated inputs at once,
            because each looks redundant given the others, and LeNet-300-100 on digits falls to 37%).
        max_batches: calibration batches read (None = all of ``data``).
        max_inputs: largest input width ``d`` handled (the per-row solves cost ``d^3``; use ``pk.llm``'s
            SparseGPT for wider layers).

    Needs ``data=`` (batches as for every data-driven method; labels are not used). The kept weights
    change, so a later fine-tuning starts from the compensated weights.
    """

    def __init__(self, damp: float = 0.01, rounds: int = 4, max_batches: int | None = None,
                 max_inputs: int = 4096) -> None:
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 <= damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {damp!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        self.damp, self.rounds, self.max_batches, self.max_inputs = float(damp), rounds, max_batches, max_inputs
        self._H: dict[str, Tensor] = {}
        self._model: nn.Module | None = None
        self._scores: dict[str, Tensor] = {}

    @property
    def needs_data(self) -> bool:
        return True

    def prepare(self, model, targets, stats, data=None) -> None:
        if data is None:
            raise ValueError("method 'obs' needs calibration data: pass data= (an iterable of batches)")
        for t in targets:
            _check_layer(t)
            width = t.numel() // t.shape[0]
            if width > self.max_inputs:
                raise ValueError(f"obs: {t.name} has {width} inputs per row, above max_inputs={self.max_inputs}")
        hessians = input_hessians(model, targets, data, self.max_batches)
        self._model = model
        self._H = {name: damped(H, self.damp) for name, H in hessians.items()}
        self._scores = {}

    def _hessian(self, target: Target) -> Tensor:
        if target.name not in self._H:
            raise RuntimeError("OBS.score called before prepare()")
        return self._H[target.name]

    def score(self, target: Target, stats: TargetStatistics | None, *, seed: int = 0, index: int = 0) -> Tensor:
        if target.name not in self._scores:  # scopes read a layer's scores more than once: compute them once
            weight = target.value.detach().reshape(target.shape[0], -1)
            mask = target.mask(self._model) if self._model is not None else None
            kept = None if mask is None else mask.reshape(weight.shape)
            saliency = obs_saliency(weight, self._hessian(target), kept)
            self._scores[target.name] = saliency.reshape(target.shape).to(target.parameter.dtype)
        return self._scores[target.name]

    def update_weights(self, model, targets, masks) -> None:
        for t in targets:
            H = self._hessian(t)
            weight = t.value.detach().reshape(t.shape[0], -1)
            kept = masks[t.name].reshape(weight.shape).to(weight.device)
            new = obs_update(weight, H, kept).reshape(t.shape)
            raw = t.parameter
            raw.copy_(torch.where(masks[t.name].to(raw.device), new.to(raw.dtype), raw))
        self._H, self._scores = {}, {}
