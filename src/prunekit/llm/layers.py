"""Removing whole blocks (layers) of a transformer, by importance.

* ``"angular"`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): the
  angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` between the hidden states entering block ``l`` and
  those entering block ``l + n``, at the last token of each sequence (the paper's rule: the last token
  has attended to the whole sequence), averaged over the sequences; ``tokens="all"`` averages over every
  real token instead. A small distance means blocks ``l .. l+n-1`` barely change the residual stream;
  the paper removes the ``n`` consecutive blocks with the smallest distance.
* ``"perplexity"``: the increase of the calibration perplexity when the block is skipped (its output
  replaced by its input); causal language models only.

:func:`remove_layers` deletes blocks from the model and keeps the config consistent
(``num_hidden_layers``, ``layer_types``, ``prunekit_attention``, ``prunekit_mlp``) and the remaining attention modules'
``layer_idx`` contiguous, so ``save_pretrained`` + ``from_pretrained`` reload the smaller model.
:func:`skip_layers` is the masked equivalent: a context manager that bypasses blocks without removing them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import eval_mode, replace_module
from .blocks import find_blocks
from .perplexity import negative_log_likelihood
from .sequential import as_batches, capture_block_inputs, run_block

__all__ = ["LAYER_IMPORTANCE", "layer_importance", "angular_distances", "skip_layers", "remove_layers", "prune_layers"]

LAYER_IMPORTANCE = ("angular", "perplexity")
ANGULAR_TOKENS = ("last", "all")


def _check_method(method: str) -> None:
    if method not in LAYER_IMPORTANCE:
        from ..registry import unknown_name_message

        raise ValueError(unknown_name_message("layer importance", method, LAYER_IMPORTANCE))


def _angular(a: Tensor, b: Tensor, mask: Tensor | None, tokens: str = "last") -> tuple[float, int]:
    """Sum of ``arccos(cos(a_t, b_t)) / pi`` over the last real token of each sequence (``tokens="last"``)
    or over every real token (``"all"``), and the number of terms."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    dist = torch.arccos(cos) / math.pi  # (batch, seq)
    fits = mask is not None and tuple(mask.shape) == tuple(dist.shape)
    if tokens == "last":
        if fits:  # the last real token, whatever side the padding is on
            positions = torch.arange(1, dist.shape[-1] + 1, device=dist.device)
            last = (mask.to(dist.device).long() * positions).argmax(-1)
        else:
            last = torch.full(dist.shape[:-1], dist.shape[-1] - 1, dtype=torch.long, device=dist.device)
        dist = dist.gather(-1, last.unsqueeze(-1))
    elif fits:
        dist = dist[mask.to(dist.device)]
    return float(dist.sum(dtype=torch.float64)), dist.numel()


def _check_tokens(tokens: str) -> None:
    if tokens not in ANGULAR_TOKENS:
        raise ValueError(f"tokens must be one of {ANGULAR_TOKENS}, got {tokens!r}")


def angular_distances(model: nn.Module, calibration: Any, n: int = 1, *, batch_size: int = 8,
                      blocks: str | None = None, tokens: str = "last") -> Tensor:
    """``d[l]`` = mean angular distance between the inputs of block ``l`` and of block ``l + n`` (the output of
    the last block for ``l + n = L``), for ``l = 0 .. L - n``, at the last token of each sequence (Gromov et
    al.) or, with ``tokens="all"``, over every real token. Keeps ``n + 1`` sets of hidden states."""
    _check_tokens(tokens)
    name, block_list = find_blocks(model, blocks)
    L = len(block_list)
    if not (1 <= n <= L - 1):
        raise ValueError(f"n must be in [1, {L - 1}] for a model with {L} blocks, got {n}")
    batches = as_batches(calibration, batch_size)
    with eval_mode(model):
        with torch.no_grad():
            inputs = capture_block_inputs(model, block_list, batches)
            history = [list(inputs.hidden)]  # history[j] = inputs of block (i - len + 1 + j)
            sums = torch.zeros(L - n + 1, dtype=torch.float64)
            counts = torch.zeros(L - n + 1, dtype=torch.float64)
            for i, block in enumerate(block_list):
                outs = [run_block(block, inputs, i, b).detach() for b in range(len(batches))]
                inputs.hidden = outs
                history.append(outs)
                if len(history) > n + 1:
                    history.pop(0)
                start = i + 1 - n  # history[0] holds the inputs of block `start`, history[-1] those of block i + 1
                if start >= 0:
                    for b in range(len(batches)):
                        s, c = _angular(history[0][b], history[-1][b], inputs.token_masks[b], tokens)
                        sums[start] += s
                        counts[start] += c
    return (sums / counts).float()


@contextlib.contextmanager
def skip_layers(model: nn.Module, indices: Sequence[int], blocks: str | None = None) -> Iterator[None]:
    """Bypass the given blocks (each returns its input unchanged) while the context is open."""
    _, block_list = find_blocks(model, blocks)
    handles = []

    def bypass(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    for i in indices:
        handles.append(block_list[int(i)].register_forward_hook(bypass, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _calibration_ids(calibration: Any) -> Tensor:
    ids = calibration["input_ids"] if isinstance(calibration, dict) else calibration
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("layer importance 'perplexity' needs calibration token ids as a 2-D tensor")
    return ids


def layer_importance(model: nn.Module, calibration: Any, method: str = "angular", *, batch_size: int = 8,
                     blocks: str | None = None, tokens: str = "last") -> Tensor:
    """One score per block (higher = more important): its angular distance (input to output; ``tokens`` as
    in :func:`angular_distances`), or the calibration perplexity's increase when it is skipped."""
    _check_method(method)
    _check_tokens(tokens)
    if method == "angular":
        return angular_distances(model, calibration, 1, batch_size=batch_size, blocks=blocks, tokens=tokens)
    ids = _calibration_ids(calibration)
    _, block_list = find_blocks(model, blocks)

    def ppl() -> float:
        total, count = negative_log_likelihood(model, ids, seq_len=ids.shape[1], batch_size=batch_size)
        return math.exp(total / count)

    base = ppl()
    scores = []
    for i in range(len(block_list)):
        with skip_layers(model, [i], blocks):
            scores.append(ppl() - base)
    return torch.tensor(scores)


def remove_layers(model: nn.Module, indices: Sequence[int], blocks: str | None = None) -> list[int]:
    """Delete the given blocks; returns the indices (in the old numbering) of the blocks kept."""
    name, block_list = find_blocks(model, blocks)
    L = len(block_list)
    drop = sorted({int(i) for i in indices})
    bad = [i for i in drop if not 0 <= i < L]
    if bad:
        raise ValueError(f"block {bad[0]} out of range (the model has {L} blocks)")
    if len(drop) >= L:
        raise ValueError(f"cannot remove all {L} blocks")
    config = getattr(model, "config", None)
    if drop and config is not None and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "this GPT-2 config scales attention by 1/(layer_idx+1): removing blocks would change the scaling of "
            "the blocks after them"
        )
    kept = [i for i in range(L) if i not in drop]
    new_list = nn.ModuleList([block_list[i] for i in kept])
    replace_module(model, name, new_list)
    for new_index, block in enumerate(new_list):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_index
    if config is not None and drop:
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(kept)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == L:
            config.layer_types = [layer_types[i] for i in kept]
        for record, keys in (("prunekit_attention", ("num_heads", "num_kv_heads")), ("prunekit_mlp", ("widths",))):
            info = getattr(config, record, None)
            if isinstance(info, dict):
                for key in keys:
                    if isinstance(info.get(key), list) and len(info[key]) == L:
                        info[key] = [info[key][i] for i in kept]
    return kept


def prune_layers(model: nn.Module, calibration: Any, num_layers: int, method: str = "angular", *,
                 contiguous: bool = True, batch_size: int = 8, blocks: str | None = None,
                 tokens: str = "last") -> list[int]:
    """Remove ``num_layers`` blocks; returns the removed indices.

    ``"angular"`` with ``contiguous=True`` removes the ``num_layers`` consecutive blocks whose input and
    output are closest at the last token (Gromov et al. 2024; ``tokens="all"`` averages over every token);
    otherwise the blocks with the lowest single-block scores go.
    """
    _check_method(method)
    _check_tokens(tokens)
    _, block_list = find_blocks(model, blocks)
    if not (0 < num_layers < len(block_list)):
        raise ValueError(f"num_layers must be in [1, {len(block_list) - 1}], got {num_layers}")
    if method == "angular" and contiguous:
        d = angular_distances(model, calibration, num_layers, batch_size=batch_size, blocks=blocks, tokens=tokens)
        start = int(torch.argmin(d))
        drop = list(range(start, start + num_layers))
    else:
        scores = layer_importance(model, calibration, method, batch_size=batch_size, blocks=blocks, tokens=tokens)
        drop = sorted(torch.topk(scores, num_layers, largest=False).indices.tolist())
    remove_layers(model, drop, blocks)
    return drop
