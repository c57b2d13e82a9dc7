"""Ctrl-C while the ``prunekit`` command is still importing torch: one line, exit status 130."""

import signal
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# What the installed console script does (``from prunekit_cli import main; sys.exit(main())``), with the
# import of torch slowed down so that the signal surely arrives during it.
SCRIPT = f"""
import builtins, sys, time
sys.path.insert(0, {SRC!r})
real_import = builtins.__import__

def slow_import(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        print("importing torch", flush=True)
        time.sleep(60)
    return real_import(name, *args, **kwargs)

builtins.__import__ = slow_import
from prunekit_cli import main
sys.exit(main())
"""


def test_ctrl_c_during_import_torch_exits_130_with_one_line():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "importing torch"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["interrupted"]
