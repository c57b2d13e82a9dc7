"""prunekit.fileio: atomic files and folders survive a signal and a full disk; a locked folder refuses."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prunekit import fileio

SRC = str(Path(__file__).resolve().parents[1] / "src")
FILEIO = str(Path(SRC) / "prunekit" / "fileio.py")
OLD = b"previous complete output\n" * 100


def _run(code: str, *, fsize: int | None = None, **kwargs) -> subprocess.Popen:
    """Start ``code`` in a fresh Python (``fileio`` defined), optionally with RLIMIT_FSIZE."""
    # fileio is a leaf module: load it alone, without importing torch through the package
    preamble = (
        "import importlib.util, resource, signal, sys, time\nfrom pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('fileio', {FILEIO!r})\n"
        "fileio = importlib.util.module_from_spec(spec); spec.loader.exec_module(fileio)\n"
    )
    if fsize is not None:
        # a full disk: writes past fsize bytes fail with EFBIG (SIGXFSZ ignored, else it kills the process)
        preamble += (
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        )
    return subprocess.Popen(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "results.json"
    target.write_bytes(OLD)
    fileio.atomic_write(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    with fileio.atomic_open(target, "w") as handle:
        handle.write("é")
    assert target.read_text(encoding="utf-8") == "é"
    assert _leftovers(tmp_path) == []


def test_exception_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_bytes(OLD)
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_open(target) as handle:
            handle.write(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_sigint_during_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_bytes(OLD)
    proc = _run(f"""
        with fileio.atomic_open({str(target)!r}) as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            print("writing", flush=True)
            while True:                      # a long write, interrupted by Ctrl-C
                handle.write(b"y" * 4096)
                time.sleep(0.001)
    """)
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert target.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_full_disk_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(OLD)
    proc = _run(f"fileio.atomic_write({str(target)!r}, b'z' * 1_000_000)", fsize=100_000)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and b"File too large" in err, err.decode()
    assert target.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def _old_folder(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "results.json").write_bytes(OLD)
    (out / "model.safetensors").write_bytes(OLD * 2)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_atomic_folder_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "run"
    _old_folder(out)
    with fileio.atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        fileio.atomic_write(tmp / "results.json", b"new")
        assert (out / "results.json").read_bytes() == OLD  # nothing visible before the end
    assert _contents(out) == {"results.json": b"new"}  # the old run's model does not linger
    assert _leftovers(tmp_path) == []


def test_atomic_folder_on_a_new_path(tmp_path):
    out = tmp_path / "a" / "run"
    with fileio.atomic_folder(out) as tmp:
        (tmp / "x.txt").write_text("x")
    assert _contents(out) == {"x.txt": b"x"}


def test_sigint_while_building_a_folder_keeps_the_old_one(tmp_path):
    out = tmp_path / "run"
    before = _old_folder(out)
    proc = _run(f"""
        with fileio.atomic_folder({str(out)!r}) as tmp:
            (tmp / "results.json").write_bytes(b"new")
            with open(tmp / "model.safetensors", "wb") as handle:
                print("writing", flush=True)
                while True:
                    handle.write(b"y" * 4096)
                    time.sleep(0.001)
    """)
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert _contents(out) == before
    assert _leftovers(tmp_path) == []


def test_full_disk_while_building_a_folder_keeps_the_old_one(tmp_path):
    out = tmp_path / "run"
    before = _old_folder(out)
    proc = _run(f"""
        with fileio.atomic_folder({str(out)!r}) as tmp:
            fileio.atomic_write(tmp / "results.json", b"new")
            fileio.atomic_write(tmp / "model.safetensors", b"z" * 1_000_000)
    """, fsize=100_000)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and b"File too large" in err, err.decode()
    assert _contents(out) == before
    assert _leftovers(tmp_path) == []


def test_a_file_in_place_of_the_folder_is_not_replaced(tmp_path):
    out = tmp_path / "run"
    out.write_bytes(OLD)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with fileio.atomic_folder(out) as tmp:
            (tmp / "a").write_text("a")
    assert out.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_second_run_into_a_locked_folder_refuses(tmp_path):
    out = tmp_path / "run"
    proc = _run(f"""
        with fileio.folder_lock({str(out)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """, stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(fileio.FolderInUse, match=rf"{out.name} is in use by another prunekit run \(process {proc.pid}"):
            with fileio.folder_lock(out):
                pass
    finally:
        proc.communicate(b"\n", timeout=30)
    with fileio.folder_lock(out) as lock:  # released: free again
        assert lock.read_text() == str(os.getpid())
    assert _leftovers(tmp_path) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".run.lock").write_text(str(dead.pid))
    with fileio.folder_lock(out) as lock:
        assert lock.read_text() == str(os.getpid())


def test_a_lock_being_created_counts_as_held(tmp_path):
    (tmp_path / ".run.lock").write_text("")  # another run between creating the file and writing its pid
    with pytest.raises(fileio.FolderInUse):
        with fileio.folder_lock(tmp_path / "run"):
            pass
    old = time.time() - 60
    os.utime(tmp_path / ".run.lock", (old, old))
    with fileio.folder_lock(tmp_path / "run"):
        pass


def test_ensure_writable(tmp_path):
    assert fileio.ensure_writable(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match="cannot write to the output folder .*f: exists and is not a folder"):
        fileio.ensure_writable(tmp_path / "f")
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(OSError, match="cannot write to the output folder .*ro: Permission denied"):
                fileio.ensure_writable(locked)
        finally:
            locked.chmod(0o700)
