"""Perplexity of a causal language model over a token stream, with a sliding window.

Windows of ``seq_len`` tokens start every ``stride`` tokens. A token is predicted at most once, by the
first window that holds it after at least one other token; the tokens a window shares with the previous
one only serve as context (the Hugging Face recipe). ``stride = seq_len`` (the default) gives
non-overlapping windows, whose first tokens are context only; a smaller stride gives every prediction
more context and costs more forward passes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..modules import eval_mode

__all__ = ["perplexity", "negative_log_likelihood"]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(ids, **kwargs)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else None
    if not isinstance(logits, Tensor):
        raise TypeError(f"cannot find logits in the output of {type(model).__name__} ({type(out).__name__})")
    return logits


def _token_nll(logits: Tensor, targets: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``-log softmax(logits)[target]`` per position, ``(batch, positions)`` in float32.

    The log-normaliser is computed for a few positions at a time (about ``chunk`` logits), so no second
    copy of the ``(batch, positions, vocabulary)`` logits is made: with a 50k vocabulary a full
    ``log_softmax`` of 8 windows of 512 tokens alone took 0.8 GB.
    """
    batch, n, vocab = logits.shape
    step = max(1, chunk // max(1, batch * vocab))
    out = torch.empty(batch, n, dtype=torch.float32, device=logits.device)
    for i in range(0, n, step):
        part = logits[:, i : i + step].float()
        out[:, i : i + step] = torch.logsumexp(part, dim=-1) - part.gather(-1, targets[:, i : i + step, None]).squeeze(-1)
    return out


def _windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_predicted)`` for every window over a stream of ``length`` tokens."""
    windows, predicted_until = [], 1  # token 0 has no context and is never predicted
    begin = 0
    while predicted_until < length:
        end = min(begin + seq_len, length)
        if end > predicted_until:
            windows.append((begin, end, max(predicted_until, begin + 1)))
            predicted_until = end
        if end == length:
            break
        begin += stride
    return windows


def negative_log_likelihood(
    model: nn.Module, token_ids: Tensor, seq_len: int = 2048, stride: int | None = None, batch_size: int = 1
) -> tuple[float, int]:
    """``(total negative log-likelihood in nats, number of predicted tokens)`` over ``token_ids``.

    ``token_ids`` is one stream (1-D, or ``(1, L)``) or several independent streams ``(n, L)``.
    """
    if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.dim() not in (1, 2):
        raise ValueError("token_ids must be a 1-D or 2-D tensor of integer token ids")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else int(stride)
    if not (1 <= stride <= seq_len):
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    streams = token_ids.reshape(1, -1) if token_ids.dim() == 1 else token_ids
    if streams.shape[1] < 2:
        raise ValueError("token_ids must hold at least 2 tokens per stream")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        with torch.no_grad():
            for stream in streams:
                windows = _windows(stream.numel(), seq_len, stride)
                # Windows of equal length are batched together.
                i = 0
                while i < len(windows):
                    length = windows[i][1] - windows[i][0]
                    group = [windows[i]]
                    while (len(group) < batch_size and i + len(group) < len(windows)
                           and windows[i + len(group)][1] - windows[i + len(group)][0] == length):
                        group.append(windows[i + len(group)])
                    ids = torch.stack([stream[b:e] for b, e, _ in group]).to(device)
                    nll = _token_nll(_logits(model, ids)[:, :-1], ids[:, 1:])  # position p predicts p + 1
                    for row, (b, e, first) in enumerate(group):
                        total += float(nll[row, first - b - 1 :].sum(dtype=torch.float64))
                        count += e - first
                    i += len(group)
    return total, count


def perplexity(
    model: nn.Module, token_ids: Tensor, seq_len: int = 2048, stride: int | None = None, batch_size: int = 1
) -> float:
    """``exp(mean negative log-likelihood)`` of every predicted token (see the module docstring).

    ``model(ids)`` must return logits ``(batch, len, vocab)`` (a tensor, a tuple whose first item they
    are, or an object with ``.logits``, as Hugging Face causal LMs return).
    """
    total, count = negative_log_likelihood(model, token_ids, seq_len, stride, batch_size)
    return math.exp(total / count)
