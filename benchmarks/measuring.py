"""How the benchmarks measure: one call's peak extra memory, in a fresh child process, on a named machine.

* :func:`peak_rss`: around one call, the peak extra resident memory (Linux). Freed heap memory is handed
  back to the OS first (``malloc_trim``), so the call cannot hide its allocations in pages that earlier
  temporaries left resident; then the peak (``VmHWM``) is reset to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0). Where that is refused the number is a lower bound (what
  exceeds the earlier peak) and ``exact`` says so.
* :func:`run_child`: ``fn(*args)`` in a new process of a ``multiprocessing`` context, its result sent back
  (or ``{"error": ...}``), so that each measurement starts from a clean heap.
* :func:`cpu_name`, :func:`source_state`: what ran, for the results file; :func:`save_results` writes
  it (``<name>.md`` and ``<name>.json``, each atomically).
"""

from __future__ import annotations

import json
import platform
import subprocess
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunekit.fileio import atomic_write

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["rss", "trim", "reset_peak", "peak_rss", "run_child", "cpu_name", "source_state", "save_results"]


def rss() -> dict[str, int]:
    """``{"VmRSS", "VmHWM"}`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def trim() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_rss() -> Iterator[dict[str, Any]]:
    """``with peak_rss() as m: call()``; then ``m["peak_extra_bytes"]`` (peak RSS during the block minus
    RSS before it), ``m["exact"]`` (False: a lower bound) and ``m["rss_before_bytes"]``."""
    trim()
    exact = reset_peak()
    before = rss()
    out: dict[str, Any] = {"exact": exact, "rss_before_bytes": before["VmRSS"]}
    yield out
    after = rss()
    if exact:
        out["peak_extra_bytes"] = after["VmHWM"] - before["VmRSS"]
    else:  # the peak may predate the call: only what exceeds it is seen
        out["peak_extra_bytes"] = max(after["VmHWM"] - before["VmHWM"], 0)


def _child(conn, fn: Callable[..., dict], args: tuple) -> None:
    try:
        conn.send(fn(*args))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_child(ctx, fn: Callable[..., dict], *args) -> dict:
    """``fn(*args)`` in a fresh process of ``ctx`` (a ``multiprocessing`` context); a failure or a child
    that dies gives ``{"error": ...}``."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "the child died without a result (killed for memory?)"}
    proc.join()
    if "error" not in result and proc.exitcode != 0:
        result = {"error": f"child exit code {proc.exitcode}"}
    return result


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def source_state() -> dict:
    """The commit and the locally modified files of src/ that were measured (read-only git calls)."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "modified": [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines() if line.strip()]}


def save_results(out: str | Path, name: str, markdown: str, result: Any = None) -> list[Path]:
    """Write ``<out>/<name>.md`` (and ``<out>/<name>.json`` when ``result`` is given), each atomically,
    creating ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write(out / f"{name}.md", markdown)]
    if result is not None:
        paths.append(atomic_write(out / f"{name}.json", json.dumps(result, indent=2) + "\n"))
    return paths
