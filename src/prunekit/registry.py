"""Registries: every method, granularity, scope and schedule is found by a short lowercase name.

The recipe, the CLI and the Python API all resolve names here, so they say the same thing in the same
words, and an unknown name gets the same helpful error everywhere.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of entries, each with a one-line description."""

    def __init__(self, kind: str, normalize: Callable[[str], str] | None = None) -> None:
        """``normalize`` maps a name to the form compared on lookup (default: stripped, lowercase)."""
        self.kind = kind
        self._normalize = normalize or (lambda name: name.strip().lower())
        self._entries: dict[str, tuple[T, str]] = {}
        self._aliases: dict[str, str] = {}  # deprecated name -> current name (not listed)

    def register(self, name: str, summary: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name", "one line")``; a registered class whose ``name`` attribute
        is empty gets ``name`` (the name is written once)."""

        def add(entry: T) -> T:
            self.add(name, entry, summary)
            return entry

        return add

    def add(self, name: str, entry: T, summary: str) -> None:
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(entry, type) and isinstance(getattr(entry, "name", None), str):
            if not entry.__dict__.get("name"):
                entry.name = name
            elif entry.name != name:
                raise ValueError(f"{self.kind} {entry.__name__} is named {entry.name!r} but registered as {name!r}")
        self._entries[name] = (entry, summary)

    def alias(self, old: str, new: str) -> None:
        """Keep the deprecated name ``old`` working as ``new``, with a ``DeprecationWarning``; it is not listed."""
        if new not in self._entries:
            raise ValueError(f"cannot alias {old!r} to {new!r}: no {self.kind} {new!r} is registered")
        if old in self._entries or old in self._aliases:
            raise ValueError(f"{self.kind} {old!r} is already registered")
        self._aliases[old] = new

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises ``ValueError`` with the closest names."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be given by name (a string), got {type(name).__name__}")
        key = self._key(name)
        if key in self._aliases:
            new = self._aliases[key]
            warnings.warn(
                f"{self.kind} {key!r} is deprecated; it is now called {new!r} ({self._entries[new][1]})",
                DeprecationWarning,
                stacklevel=3,
            )
            key = new
        if key not in self._entries:
            raise ValueError(unknown_name_message(self.kind, name, self._entries))
        return self._entries[key][0]

    def _key(self, name: str) -> str:
        """The registered name (or alias) that ``name`` normalises to, else ``name`` normalised."""
        wanted = self._normalize(name)
        for known in (*self._entries, *self._aliases):
            if self._normalize(known) == wanted:
                return known
        return wanted

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self._key(name) in self._entries or self._key(name) in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, str]]:
        """(name, one-line description) pairs, in registration order."""
        for name, (_, summary) in self._entries.items():
            yield name, summary


def did_you_mean(name: object, known) -> str:
    """``"; did you mean 'magnitude'?"`` for the closest known name, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name).lower(), list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_name_message(kind: str, name: str, known) -> str:
    """``unknown method 'magnitud'; did you mean 'magnitude'? (known: ...)``"""
    known = list(known)
    return f"unknown {kind} {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})"
