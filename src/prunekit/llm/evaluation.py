"""Quality of a pruned encoder: how close its sentence embeddings stay to the dense model's.

A sentence embedding is the mean of the last hidden states over the sentence's real tokens (the
pooling of sentence-transformers' all-MiniLM-L6-v2 and most BERT-style embedding models). The score is
the cosine similarity between the pruned and the dense model's embeddings of the same held-out
sentences: 1.0 means nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import eval_mode

__all__ = ["mean_pooled_embeddings", "embedding_similarity", "encode"]


def encode(tokenizer: Any, sentences: Sequence[str], max_length: int = 128) -> dict[str, Tensor]:
    """Tokenize sentences as one padded batch (``input_ids``, ``attention_mask``, ...)."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pooled_embeddings(model: nn.Module, inputs: Mapping[str, Tensor], batch_size: int = 64,
                           normalize: bool = False) -> Tensor:
    """``(sentences, hidden)``: the mean of the last hidden states over real tokens (``attention_mask``)."""
    device = next(model.parameters()).device
    n = inputs["input_ids"].shape[0]
    out = []
    with eval_mode(model):
        with torch.no_grad():
            for i in range(0, n, batch_size):
                batch = {k: v[i : i + batch_size].to(device) for k, v in inputs.items() if isinstance(v, Tensor)}
                result = model(**batch)
                hidden = getattr(result, "last_hidden_state", None)
                if hidden is None:
                    hidden = result[0] if isinstance(result, (tuple, list)) else result
                mask = batch.get("attention_mask")
                mask = torch.ones(hidden.shape[:2], device=device) if mask is None else mask.to(hidden.dtype)
                summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
                out.append(summed / mask.sum(dim=1, keepdim=True).clamp_min(1e-9))
    emb = torch.cat(out).float()
    return F.normalize(emb, dim=-1) if normalize else emb


def embedding_similarity(model: nn.Module, reference: nn.Module | Tensor, inputs: Mapping[str, Tensor],
                         batch_size: int = 64) -> float:
    """Mean cosine similarity between ``model``'s and ``reference``'s mean-pooled embeddings of ``inputs``.

    ``reference`` is the dense model, or its embeddings computed beforehand (a ``(sentences, hidden)`` tensor).
    """
    ref = reference if isinstance(reference, Tensor) else mean_pooled_embeddings(reference, inputs, batch_size)
    emb = mean_pooled_embeddings(model, inputs, batch_size)
    return float(F.cosine_similarity(emb, ref.to(emb.device).float(), dim=-1).mean())
