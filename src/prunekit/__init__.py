"""prunekit: pruning for PyTorch.

    import prunekit as pk
    report = pk.prune(model, sparsity=0.8, method="magnitude", scope="global")
    pk.finalize(model)

Pruning is four choices: what goes (granularity), how it is scored (method), where the budget goes
(scope), and when (schedule); the action is a mask (shapes stay) or surgery (``prunekit.structured``).
"""

from . import criteria, granularity, masking, metrics, schedules, scope  # noqa: F401
from .masking import finalize, from_torch_prune, masks, restore_masks, sparsity, to_torch_prune
from .metrics import summary
from .pruner import Pruner
from .pruning import PruneReport, prune
from .serialization import load, save
from . import export, sensitivity_analysis  # noqa: F401,E402  (light: torch only; onnx/matplotlib lazily)
from ._version import __version__
from .sensitivity_analysis import SensitivityResult, sensitivity

# Submodules loaded on first access (``pk.llm``, ``pk.report``), so ``import prunekit`` stays light.
_LAZY_SUBMODULES = ("llm", "structured", "training", "regularizers", "distributed", "report", "allocation", "data")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


__all__ = [
    "prune",
    "Pruner",
    "PruneReport",
    "masks",
    "sparsity",
    "finalize",
    "restore_masks",
    "save",
    "load",
    "summary",
    "from_torch_prune",
    "to_torch_prune",
    "schedules",
    "metrics",
    "masking",
    "llm",
    "structured",
    "training",
    "regularizers",
    "distributed",
    "allocation",
    "sensitivity",
    "SensitivityResult",
    "export",
    "report",
]
