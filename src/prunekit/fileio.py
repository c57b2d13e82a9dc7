"""Safe output files: atomic file writes, atomic replacement of a whole folder, and an output-folder lock.

    with atomic_open(path, "w") as handle:     # a temporary sibling, renamed over ``path`` on success
        json.dump(results, handle)
    atomic_write(path, b"...")                 # the same for bytes or text already in memory

    with folder_lock(out), atomic_folder(out) as tmp:   # build the run's files in ``tmp``; on success
        atomic_write(tmp / "results.json", text)        # ``out`` is replaced by ``tmp`` as a whole

A reader therefore sees either the previous complete file (folder) or the new complete one, never a
0-byte or truncated one: whatever interrupts the write (an exception, ``KeyboardInterrupt``, a full disk)
removes the temporary file or folder and leaves the previous output as it was. Files are flushed and
``fsync``-ed before the rename so that a crash of the machine does not leave an empty file either.
This module is a leaf: it imports nothing from prunekit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write", "atomic_folder", "folder_lock", "FolderInUse", "ensure_writable"]


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on normal exit it replaces ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8 unless ``encoding`` says otherwise). If the block raises
    anything (``KeyboardInterrupt`` included) or the write fails (a full disk), the temporary file is
    removed, the error propagates, and ``path`` keeps its previous content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text encoded with ``encoding``) to ``path`` atomically; returns ``path``."""
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with atomic_open(path, "wb") as handle:
        handle.write(payload)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and, on normal exit, put it in place of ``path`` as a whole.

    Yields the temporary folder (empty). On success the previous ``path`` (if any) is moved aside, the new
    folder renamed into place, and the old one deleted; if the block raises or the rename fails, the
    temporary folder is deleted and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``, replacing a previous folder; the old one is restored if that fails."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectoryError(f"{path} exists and is not a folder; not replacing it")
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old)  # rename(2) onto the empty placeholder folder
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_folder(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class FolderInUse(RuntimeError):
    """Another run holds the lock of an output folder."""


def _lock_path(folder: Path) -> Path:
    # a sibling, not a file inside: the folder itself may be replaced as a whole while locked
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of output folder ``folder`` for the block; raise :class:`FolderInUse` if another
    run holds it.

    The lock is the file ``.<name>.lock`` next to the folder, created exclusively and holding the
    owner's process id; it is removed when the block ends. A lock left behind by a process that no
    longer exists (killed) is taken over.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(folder)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None and _age(lock) < 5.0:  # just created, its pid not written yet
                owner = -1
            if owner is not None and (owner == -1 or _alive(owner)):
                raise FolderInUse(
                    f"the output folder {folder} is in use by another prunekit run (process {owner if owner > 0 else 'starting'}, "
                    f"lock file {lock}); wait for it to finish or choose another output folder"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # stale: its process is gone
    else:
        raise FolderInUse(f"could not take the lock {lock} of the output folder {folder}")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None  # unreadable or being written this instant: treated as stale only if still so


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError as error:
        return error.errno != errno.ESRCH
    return True


def ensure_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed and check that files can be written in it, so that a
    run fails before its work rather than after. Raises ``OSError`` with a one-line message naming it."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(error.errno, f"cannot write to the output folder {folder}: {reason}") from None
    return folder
