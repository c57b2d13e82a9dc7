"""The import structure of prunekit: no import loop, no loop dodged inside a function, no private name taken
from another module, and ``import prunekit`` loads none of the optional extras.

The graph is read from the source with ``ast`` (nothing is imported): an edge per module-level import of a
prunekit module (``TYPE_CHECKING`` blocks left out), plus the package ``__init__`` files such an import runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
EXTRAS = ("transformers", "accelerate", "matplotlib", "sklearn", "onnx", "onnxruntime", "onnxscript", "lightning",
          "pytorch_lightning")


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is a package)}`` of every prunekit module."""
    out = {}
    for path in sorted((SRC / "prunekit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text()) for name, (path, _) in MODULES.items()}


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The prunekit modules an import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = name.split(".") if MODULES[name][1] else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in dict.fromkeys(found) if t in MODULES and t != name]


def _with_packages(name: str, target: str) -> list[str]:
    """``target`` and the package ``__init__`` files importing it runs (not the root's, nor ``name``'s own)."""
    parts = target.split(".")
    packages = [".".join(parts[:i]) for i in range(2, len(parts))]
    return [target] + [p for p in packages if p != name and not name.startswith(p + ".")]


def _imports(name: str) -> tuple[set[str], list[tuple[str, int]]]:
    """(modules imported at module level, ``(module, line)`` of those imported inside functions)."""
    top: set[str] = set()
    inner: list[tuple[str, int]] = []

    def walk(nodes, in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, node):
                    if in_function:
                        inner.append((target, node.lineno))
                    else:
                        top.update(_with_packages(name, target))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(ast.iter_child_nodes(node), True)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            else:
                walk(ast.iter_child_nodes(node), in_function)

    walk(TREES[name].body, False)
    return top, inner


IMPORTS = {name: _imports(name) for name in MODULES}
GRAPH = {name: top for name, (top, _) in IMPORTS.items()}


def _path(start: str, goal: str) -> list[str] | None:
    """A chain of module-level imports from ``start`` to ``goal``, or None."""
    previous: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            chain = [node]
            while previous[chain[-1]] is not None:
                chain.append(previous[chain[-1]])
            return chain[::-1]
        for nxt in GRAPH[node]:
            if nxt not in previous:
                previous[nxt] = node
                todo.append(nxt)
    return None


def test_the_graph_is_read():
    # the reader itself: known edges are there (a leaf, a relative import, a package __init__)
    assert GRAPH["prunekit.modules"] == set()
    assert "prunekit.modules" in GRAPH["prunekit.pruning"]
    assert {"prunekit.structured.rules", "prunekit.llm.heads", "prunekit.llm"} <= GRAPH["prunekit.structured.hf"]


def test_no_import_loop():
    loops = [_path(target, name) + [target] for name in GRAPH for target in GRAPH[name] if _path(target, name)]
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops[:5])


def test_no_function_level_import_only_dodges_a_loop():
    # an import inside a function is for an optional extra or a light ``import prunekit``; one that would
    # close a loop at module level hides the loop instead of removing it
    dodges = [f"{MODULES[name][0].relative_to(SRC)}:{line} imports {target}"
              for name, (_, inner) in IMPORTS.items() for target, line in inner
              if any(_path(t, name) for t in _with_packages(name, target) if t != name)]
    assert not dodges, "function-level imports that dodge a loop: " + "; ".join(dodges)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for name, (path, _) in MODULES.items():
        for node in ast.walk(TREES[name]):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("prunekit")):
                found += [f"{path.relative_to(SRC)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "private names imported across modules: " + "; ".join(found)


@pytest.mark.slow
def test_import_prunekit_loads_no_optional_extra():
    code = f"import sys, prunekit; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({EXTRAS!r})))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"
