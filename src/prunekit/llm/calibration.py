"""Calibration data for one-shot LLM pruning: token sequences of a fixed length, drawn with a seed.

``calibration_data(tokenizer, ...)`` tokenizes a text source once, as one stream, and draws
``num_samples`` windows of ``seq_len`` tokens at seeded random offsets (as SparseGPT and Wanda draw
their C4 samples). Sources: the user's text files (``files=``), any iterable of strings or of records
with a text field (``texts=``: a list, a generator, a Hugging Face ``datasets.Dataset``), or, by default,
the built-in text: the docstrings of the Python standard library's modules, which ship with every
Python installation. The built-in text has a fixed ``"calibration"`` / ``"heldout"`` split by module, so
perplexity is measured on text the calibration never saw.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["builtin_text", "builtin_sentences", "calibration_data", "tokenize_text", "random_calibration"]

_SPLITS = ("calibration", "heldout")


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """``(module file name, its docstrings joined)`` for every top-level module of the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if text:
            out.append((path.name, text))
    if not out:
        raise RuntimeError(f"found no standard-library sources under {root} for the built-in text")
    return tuple(out)


def builtin_text(split: str = "calibration") -> str:
    """The built-in text: docstrings of the standard library's top-level modules (about 0.9 MB).

    Every fifth module (in name order) is ``"heldout"``; the rest is ``"calibration"``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    modules = _stdlib_docstrings()
    chosen = [text for i, (_, text) in enumerate(modules) if (i % 5 == 4) == (split == "heldout")]
    return "\n\n".join(chosen)


def builtin_sentences(split: str = "heldout", n: int | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences from the built-in text (for sentence-embedding checks), in a fixed order."""
    text = builtin_text(split)
    seen, out = set(), []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if not flat or any(ch in flat for ch in "=>|{}[]_`"):
            continue  # code, tables, doctest lines
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            words = sentence.split()
            if min_words <= len(words) <= max_words and sentence[0].isupper() and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out if n is None else out[:n]


def read_sources(files: Sequence[str | os.PathLike] | str | os.PathLike | None, texts: Iterable[Any] | None,
                 text_field: str) -> str:
    """One text: the ``files`` (UTF-8, joined by blank lines), or ``texts`` (strings, or records whose
    ``text_field`` is taken), or, with neither, the built-in calibration text."""
    if files is not None and texts is not None:
        raise ValueError("give either files= or texts=, not both")
    if files is not None:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        parts = []
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(f"calibration file not found: {path}")
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n\n".join(parts)
    if texts is not None:
        if isinstance(texts, str):
            return texts
        parts = []
        for item in texts:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) or hasattr(item, "__getitem__"):
                try:
                    parts.append(str(item[text_field]))
                except (KeyError, TypeError, IndexError):
                    raise ValueError(f"a calibration record has no text field {text_field!r} (text_field=)") from None
            else:
                raise TypeError(f"texts must hold strings or records with a {text_field!r} field, got {type(item).__name__}")
        return "\n\n".join(parts)
    return builtin_text("calibration")


def tokenize_text(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one 1-D stream of token ids (no special tokens)."""
    if not text.strip():
        raise ValueError("the calibration text is empty")
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_data(
    tokenizer: Any,
    files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    texts: Iterable[Any] | None = None,
    *,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    text_field: str = "text",
) -> Tensor:
    """``(num_samples, seq_len)`` token ids drawn at seeded random offsets of the tokenized source.

    ``tokenizer`` is any callable returning ``{"input_ids": [...]}`` (a Hugging Face tokenizer). The source is
    ``files`` (paths of text files), ``texts`` (strings or records with ``text_field``), or the built-in
    standard-library docstrings. The same arguments always give the same tensor.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
    stream = tokenize_text(tokenizer, read_sources(files, texts, text_field))
    return sample_windows(stream, num_samples, seq_len, seed)


def sample_windows(stream: Tensor, num_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``num_samples`` windows of ``seq_len`` consecutive tokens of a 1-D stream, at seeded random offsets."""
    if stream.numel() < seq_len:
        raise ValueError(
            f"the calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}; "
            "give more text or a shorter seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def random_calibration(vocab_size: int, num_samples: int = 8, seq_len: int = 64, seed: int = 0) -> Tensor:
    """Uniform random token ids ``(num_samples, seq_len)``: calibration for models without a tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
