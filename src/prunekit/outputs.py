"""One run's output folder: checked before the work, locked while the run lasts, replaced as a whole.

    with RunOutput(out) as output:        # writable? not someone else's folder? lock taken (or FolderInUse)
        results = ...                     # the work
        with output.replacing() as tmp:   # the run's files are written into a temporary sibling ...
            write_json(tmp / "results.json", results)
    # ... which replaced ``out`` as a whole: ``out`` holds one run's complete files, never a mix

A run that fails or is interrupted (Ctrl-C, a full disk) while writing leaves the previous folder as it
was. The mechanisms (atomic folder swap, lock file) are :mod:`prunekit.fileio`'s; this module adds the
policy every prunekit command shares: the checks made before the work starts, and never replacing a
folder that holds files other than a previous prunekit output (it would delete them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .fileio import atomic_folder, ensure_writable, folder_lock

__all__ = ["RunOutput", "check_output_folder", "OUTPUT_FILES"]

#: the files by which an existing folder is recognised as an earlier prunekit output (safe to replace)
OUTPUT_FILES = ("results.json", "report.html", "prune_report.json")


def check_output_folder(out: str | os.PathLike, option: str = "--out", keep: Iterable[str | os.PathLike] = ()) -> Path:
    """Check, before any work, that ``out`` can be written and replaced as a whole: it is not a file or
    a link, holds neither the current folder nor any of the files ``keep`` (the recipe being run), and,
    when it exists with files in it, it is an earlier prunekit output (holding one of :data:`OUTPUT_FILES`).
    Creates its parent folder; raises ``ValueError`` (naming ``option``) or a one-line ``OSError``."""
    out = Path(out).expanduser()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"{option}: {out} exists and is not a folder")
    resolved = out.resolve()
    for inside in (Path.cwd(), *(Path(p) for p in keep)):
        if inside.resolve().is_relative_to(resolved):
            raise ValueError(f"{option}: {out} holds {inside}; the output folder is replaced as a whole, so choose "
                             "a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in OUTPUT_FILES):
        raise ValueError(f"{option}: {out} holds files that are not a prunekit output; the output folder is replaced "
                         "as a whole (which would delete them), so choose a new or empty folder")
    ensure_writable(resolved.parent)  # the new folder is built next to it, then renamed
    return out


class RunOutput:
    """The output folder of one run: :func:`check_output_folder` and its lock on entry (a second run
    into the same folder raises :class:`prunekit.fileio.FolderInUse`), :meth:`replacing` to write."""

    def __init__(self, out: str | os.PathLike, option: str = "--out", keep: Iterable[str | os.PathLike] = ()) -> None:
        self.path = check_output_folder(out, option, keep)
        self._lock: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> RunOutput:
        self._lock = folder_lock(self.path)
        self._lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(*exc)

    @contextlib.contextmanager
    def replacing(self) -> Iterator[Path]:
        """Yield an empty temporary folder; when the block ends normally it replaces the output folder."""
        with atomic_folder(self.path) as tmp:
            yield tmp

    def final(self, files: dict[str, Path], tmp: Path) -> dict[str, Path]:
        """``files`` written in ``tmp``, as the paths they have once the folder is in place."""
        return {key: self.path / Path(path).relative_to(tmp) for key, path in files.items()}
