"""SparseGPT: one-shot pruning with optimal-brain-surgeon updates (Frantar & Alistarh 2023, arXiv:2301.00774).

For a layer ``Y = W X`` and calibration inputs ``X`` (``in x n`` tokens), the layer-wise problem is
``min ||W X - W' X||^2`` over sparse ``W'``, whose Hessian is ``H = 2 X X^T / n``. The algorithm, per layer:

1. ``H += 0.01 * mean(diag H) * I`` (dampening); inputs that were never non-zero ("dead") get
   ``H_jj = 1`` and their weights are set to zero;
2. ``U`` = the upper Cholesky factor of ``H^-1`` (its rows are the successive inverse Hessians of the
   remaining columns, so one factorisation serves the whole sweep);
3. columns are processed left to right in blocks of 128. At the start of a block, its mask is chosen
   adaptively: the weights with the smallest ``w^2 / U_jj^2`` in the block (or in each N:M group, chosen
   when the sweep reaches the group) are pruned. Within the block each column ``j`` is pruned, and the
   error ``(w_j - q_j) / U_jj`` is spread over the block's later columns through row ``j`` of ``U``;
   after the block, the accumulated errors update all later columns at once.

This module is a direct transcription of the reference implementation's ``fasterprune``, with exact
sparsity: each block prunes its share of ``round(s * rows * cols)`` weights, so the layer's sparsity is
exactly the requested one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .methods import LLM_METHODS, LayerMethod, LayerResult

__all__ = ["Hessian", "sparsegpt", "sparsegpt_group", "SparseGPT"]


#: column panels of the symmetric Hessian update (below this width, one full product)
_PANEL = 256


class Hessian:
    """``H = 2 X X^T / n`` over every input token seen, updated as a running mean (float32).

    Only the lower triangle is accumulated, in column panels (about 30-45% fewer flops than the full
    product for wide inputs); each entry is bit-for-bit the one the full product gives. :attr:`H` mirrors
    it into the full symmetric matrix when read (SparseGPT's Cholesky only reads the lower triangle).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._H: Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        H = self._H
        H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * math.sqrt(2.0 / self.tokens)
        cols = H.shape[0]
        if cols <= _PANEL:
            H.addmm_(x.t(), x)
            return
        for i in range(0, cols, _PANEL):
            H[i:, i : i + _PANEL].addmm_(x[:, i:].t(), x[:, i : i + _PANEL])

    @property
    def H(self) -> Tensor:
        """The full symmetric ``(in, in)`` Hessian (its strict upper triangle is filled from the lower one)."""
        H = self._H
        for i in range(0, H.shape[0] - _PANEL, _PANEL):  # the diagonal panels are full already
            H[i : i + _PANEL, i + _PANEL :] = H[i + _PANEL :, i : i + _PANEL].t()
        return H

    @H.setter
    def H(self, value: Tensor) -> None:
        self._H = value


def _inverse_cholesky(H: Tensor, percdamp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp I)^-1``, retrying with 10x the dampening if ``H`` is not
    positive definite in float32. ``H``'s diagonal is dampened in place (the caller restores it) and the
    inverse and its factor overwrite the first factor, so with ``H`` two ``(in, in)`` matrices exist at once
    (this bounds streaming's peak memory)."""
    diag = torch.arange(H.shape[0], device=H.device)
    undamped = torch.diag(H)
    damp = percdamp * torch.mean(undamped)
    for _ in range(6):
        H[diag, diag] = undamped + damp
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            # In place: H^-1, then its upper factor, overwrite L (the same values as into new tensors).
            torch.cholesky_inverse(L, out=L)
            torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if int(info) == 0:
                return L
        del L
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
    raise ValueError("SparseGPT: the Hessian is not positive definite even with strong dampening")


class _Sweep:
    """The column sweep inside one block of columns, on the block transposed (each column one contiguous row).

    The loop is bound by the cost of torch calls for narrow layers, so every view it touches (each column,
    the later columns it updates, its row of ``Hinv``) is made once per block size in buffers reused for
    every block of the layer, and a column costs four calls. The arithmetic is the reference's, operation
    for operation (:func:`sparsegpt`'s tests compare it bit for bit).
    """

    def __init__(self, blocksize: int, rows: int, dtype: torch.dtype, device) -> None:
        self.W = torch.empty(blocksize, rows, dtype=dtype, device=device)
        self.err = torch.empty_like(self.W)
        self.product = torch.empty_like(self.W)  # the rank-one products, written in place of a temporary
        self.pruned = torch.empty(blocksize, rows, dtype=torch.bool, device=device)
        self.keep = torch.empty_like(self.pruned)
        self.H = torch.empty(blocksize, blocksize, 1, dtype=dtype, device=device)  # Hinv1[i, j] as column vectors
        self.d = torch.empty(blocksize, dtype=dtype, device=device)
        self._views: dict[int, tuple] = {}

    def _views_for(self, count: int) -> tuple:
        if count not in self._views:
            W, H = self.W[:count], self.H
            self._views[count] = (
                W.unbind(0), self.err[:count].unbind(0), self.keep[:count].unbind(0), self.d[:count].unbind(0),
                [W[i + 1 :] for i in range(count - 1)],  # the later columns of column i
                [H[i, i + 1 : count] for i in range(count - 1)],  # Hinv1[i, i+1:] as a column
                [self.product[: count - i - 1] for i in range(count - 1)],
            )
        return self._views[count]

    def run(self, W1: Tensor, mask1: Tensor, Hinv1: Tensor, d1: Tensor, old1: Tensor | None, prune_n: int,
            prune_m: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sweep the ``(rows, count)`` block ``W1`` with the pruned mask ``mask1`` (N:M: the old mask, the groups
        chosen here). Returns ``(W1 updated, Err1, mask1)``; pruned entries of ``W1`` are left for the caller
        to zero (the reference's ``q`` is ``w`` where kept, 0 where pruned)."""
        count = W1.shape[1]
        Wt, pruned, keep = self.W[:count], self.pruned[:count], self.keep[:count]
        Wt.copy_(W1.t())
        pruned.copy_(mask1.t())
        torch.logical_not(pruned, out=keep)  # N:M: refreshed for each group of M columns once it is chosen
        self.H[:count, :count, 0].copy_(Hinv1)
        self.d[:count].copy_(d1)
        w_rows, err_rows, keep_rows, d_items, tails, h_tails, products = self._views_for(count)
        old1t = None if old1 is None else old1.t()
        for i in range(count):
            if prune_n != 0 and i % prune_m == 0:
                tmp = Wt[i : i + prune_m].square() / d1[i : i + prune_m].reshape(-1, 1).square()
                if old1t is not None:
                    tmp = tmp.masked_fill(old1t[i : i + prune_m], float("-inf"))
                drop = torch.topk(tmp, prune_m - prune_n, dim=0, largest=False).indices
                pruned.scatter_(0, i + drop, True)
                torch.logical_not(pruned[i : i + prune_m], out=keep[i : i + prune_m])
            # (w - q) / d with q = w where kept, 0 where pruned: w / d where pruned, +0 where kept, exactly.
            err1 = torch.div(w_rows[i], d_items[i], out=err_rows[i]).masked_fill_(keep_rows[i], 0)
            if i < count - 1:
                # The later columns get the rank-one update (products rounded once, as the reference's K=1
                # matmul; no fused multiply-add, which would round differently).
                tails[i].sub_(torch.mul(h_tails[i], err1, out=products[i]))
        return Wt.t(), self.err[:count].t().contiguous(), pruned.t()


def sparsegpt(
    weight: Tensor,
    H: Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    kept: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, float]:
    """Prune an ``(out, in)`` weight given the inputs' Hessian ``H = 2 X X^T / n``.

    Unstructured (``prune_n = 0``): exactly ``round(sparsity * numel)`` weights are pruned. N:M
    (``prune_n:prune_m``, *kept* per group, e.g. 2:4): ``prune_m - prune_n`` of every ``prune_m``
    consecutive weights of a row. ``kept`` is an existing keep-mask (those entries stay pruned).
    Returns ``(new_weight, keep_mask, loss)`` where ``loss`` is the algorithm's own account of the added
    error, ``sum (w - q)^2 / [U_jj]^2 / 2``, which equals ``||(W - W') X||^2 / n`` when there is no dampening.
    ``dtype`` is the precision of the computation (float32 as in the reference; float64 for checks).
    """
    [(W, keep, loss)] = sparsegpt_group([weight], H, sparsity, prune_n, prune_m, blocksize, percdamp, [kept], dtype)
    return W, keep, loss


def sparsegpt_group(
    weights: list[Tensor],
    H: Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    kept: list[Tensor | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[Tensor, Tensor, float]]:
    """:func:`sparsegpt` for several weights with the same inputs (q/k/v, gate/up): one factorisation and one
    column sweep over their stacked rows, each weight's unstructured mask still chosen among its own rows,
    so every result is the one :func:`sparsegpt` gives that weight alone."""
    rows_each = [w.shape[0] for w in weights]
    W = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype).clone()
    rows, columns = W.shape
    # No (in, in) copy of H: its diagonal alone is changed below (dead inputs, dampening) and restored on
    # the way out, so the caller's matrix is unchanged after the call (one matrix less at the peak).
    H = H.to(device=W.device, dtype=dtype)
    diagonal = torch.diag(H)
    if prune_m and blocksize % prune_m:
        raise ValueError(f"SparseGPT: blocksize {blocksize} must be a multiple of M={prune_m}")
    if prune_m and columns % prune_m:
        raise ValueError(f"SparseGPT: {columns} input columns are not divisible by M={prune_m}")
    kept = [None] * len(weights) if kept is None else kept
    old_pruned = None
    if any(k is not None for k in kept):
        old_pruned = torch.cat([torch.zeros(r, columns, dtype=torch.bool, device=W.device) if k is None
                                else ~k.to(W.device) for r, k in zip(rows_each, kept)])

    dead = diagonal == 0
    W[:, dead] = 0
    try:
        H[dead, dead] = 1
        Hinv = _inverse_cholesky(H, percdamp)
    finally:
        H.diagonal().copy_(diagonal)
    del H

    pruned = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    losses = torch.zeros(rows, dtype=torch.float64, device=W.device)
    bounds = [0]
    for r in rows_each:
        bounds.append(bounds[-1] + r)

    sweep = _Sweep(min(blocksize, columns), rows, W.dtype, W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        old1 = None if old_pruned is None else old_pruned[:, i1:i2]

        if prune_n == 0:
            tmp = W1.square() / d1.reshape(1, -1).square()
            if old1 is not None:
                tmp = tmp.masked_fill(old1, float("-inf"))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for r0, r1 in zip(bounds, bounds[1:]):  # each weight's own exact share (cumulative rounding)
                to_prune = sparsity * (r1 - r0)
                k = int(round(to_prune * i2)) - int(round(to_prune * i1))
                if k > 0:
                    idx = torch.topk(tmp[r0:r1].reshape(-1), k, largest=False, sorted=False).indices
                    mask1[r0:r1].view(-1)[idx] = True
            if old1 is not None:
                mask1 |= old1
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool) if old1 is None else old1.clone()

        W1, Err1, mask1 = sweep.run(W1, mask1, Hinv1, d1, old1, prune_n, prune_m)

        losses += Err1.to(torch.float64).square().sum(dim=1)
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    W[pruned] = 0  # the reference's q: exact zeros where pruned
    return [(W[r0:r1], ~pruned[r0:r1], float(losses[r0:r1].sum()) / 2) for r0, r1 in zip(bounds, bounds[1:])]


@LLM_METHODS.register(
    "sparsegpt",
    "OBS reconstruction: adaptive masks by w^2/[H^-1]_jj^2 in blocks of 128 columns (Frantar & Alistarh 2023)",
)
class SparseGPT(LayerMethod):
    """SparseGPT as a layer method. ``blocksize`` (128) and ``percdamp`` (0.01) as in the paper."""

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if not (isinstance(blocksize, int) and blocksize > 0):
            raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
        if not (0 <= float(percdamp) < 1):
            raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")
        self.blocksize = blocksize
        self.percdamp = float(percdamp)

    def statistics(self, in_features, device):
        return Hessian(in_features, device)

    def prune(self, weight, stats, sparsity, pattern, kept):
        return self.prune_group([weight], stats, sparsity, pattern, [kept])[0]

    def prune_group(self, weights, stats, sparsity, pattern, kept):
        n, m = (pattern.n, pattern.m) if pattern is not None else (0, 0)
        out = sparsegpt_group(weights, stats.H, sparsity, n, m, blocksize=self.blocksize, percdamp=self.percdamp,
                              kept=kept)
        return [LayerResult(keep, new, loss) for new, keep, loss in out]
