"""YAML recipes: their schema and every check, made before anything runs (:mod:`prunekit.recipe_run` runs them).

One file says what to prune, how, and what to write; ``prunekit prune recipe.yaml`` runs it.

Schema (every section and key, with its default; keys use the Python API's names)::

    name: lenet-digits                # optional title for the report
    seed: 0                           # seeds the model's initialisation, the data order and `random`
    threads: null                     # torch CPU threads while it runs (null: leave torch's default);
                                      # 1 is fastest for small models, above all on a busy machine

    model:                            # required: exactly one of builtin / factory
      builtin: lenet300100            # a prunekit.models name (lenet300100, lenet5, vgg_small, resnet8, ...)
      factory: "my_model:build"       # or "package.module:function", or "file.py:function" next to the recipe
      kwargs: {num_classes: 10}       # passed to the builtin or the factory
      weights: weights.safetensors    # optional; loaded with prunekit.load (safetensors, never pickle)

    data:                             # required
      name: digits                    # digits | synthetic_classification | synthetic_images
      batch_size: 64
      kwargs: {}                      # passed to prunekit.data.<name>, e.g. {image: true} for digits

    prune:                            # required
      method: magnitude               # any name `prunekit methods` lists
      sparsity: 0.9                   # in [0, 1); leave out for N:M patterns and per-layer scopes
      granularity: element            # element, vector, column, kernel, channel or "2:4" (quote N:M!)
      scope: global                   # global, local, lamp, erk, threshold (no sparsity), or {layer pattern: sparsity}
      targets: null                   # null = every Linear and conv weight, or a list of names/globs
      exclude: []                     # module or parameter names or globs left alone
      max_layer_sparsity: null        # cap per layer, in (0, 1]
      group_norm: l1                  # l1 | l2, how element scores add up to group scores
      calibration_batches: 8          # training batches scored by data-driven methods (taylor, obd, ...)

    schedule:                         # optional, default one-shot before fine-tuning; units are epochs
      name: iterative                 # oneshot {at} | iterative {steps, every, start} | agp {initial, start, end, every}
      steps: 3
      every: 1

    train:                            # optional: train first (from scratch, or further from the weights)
      epochs: 5                       # also: lr (default 1e-3 adam, 0.05 sgd), optimizer (adam | sgd), weight_decay
    finetune:                         # optional: fine-tune after pruning; masks keep pruned weights at zero
      epochs: 2
      lr: 0.001
      optimizer: adam

    output:
      dir: out/                       # default: "<recipe name>-out" next to the recipe
      save: true                      # write the pruned model to model.safetensors (masks included)
      report: true                    # write report.html and layer_sparsity.png (needs matplotlib)

Relative paths (weights, ``file.py`` factories, output.dir) are resolved against the recipe's folder.
Everything is validated before anything runs or is written: a problem raises :class:`RecipeError`
naming the key path (``prune.sparsity``) or the file. A schedule prunes at epoch boundaries of the
fine-tuning (inside the epoch's first optimizer step), so ``finetune.epochs`` must cover its last prune
step. Running writes ``model.safetensors``, ``results.json`` and ``report.html`` into the output folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from . import data
from .criteria import CRITERIA
from .granularity import NM, get_granularity
from .models import MODELS, get_model
from .modules import call_model, eval_mode
from .plots import require_matplotlib
from .pruning import PruningSpec, check_layer_cap
from .registry import did_you_mean, unknown_name_message
from .schema import build_section, type_name, unknown_key
from .schedules import get_schedule
from .scope import SCOPES, check_sparsity
from .serialization import load

__all__ = [
    "RecipeError",
    "Recipe",
    "load_recipe",
    "parse_recipe",
    "build_model",
    "build_data",
    "build_model_and_data",
    "load_weights",
    "prepare",
    "Prepared",
    "final_sparsity",
    "build_schedule",
    "DATASETS",
]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key path (``prune.sparsity``) or the file."""


def _advice(key: str, value: Any) -> str:
    """What to do about a value of the wrong type, where YAML itself misleads."""
    if key == "granularity" and isinstance(value, int):
        return ' (YAML reads 2:4 as a number: quote N:M patterns, granularity: "2:4")'
    return ""


#: built-in data sets a recipe can name (functions of prunekit.data)
DATASETS = ("digits", "synthetic_classification", "synthetic_images")
OPTIMIZERS = ("adam", "sgd")
#: the largest seed every generator takes (torch's and numpy's are 64-bit)
MAX_SEED = 2**63 - 1
#: the keys each schedule takes (all in epochs, except ``initial``, a sparsity)
SCHEDULE_KEYS = {"oneshot": ("at",), "iterative": ("steps", "every", "start"), "agp": ("initial", "start", "end", "every")}


# --- the schema, as dataclasses --------------------------------------------------------------------


@dataclass
class ModelSpec:
    builtin: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None


@dataclass
class DataSpec:
    name: str = ""
    batch_size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneSpec:
    method: str = "magnitude"
    sparsity: float | None = None
    granularity: str = "element"
    scope: Union[str, dict[str, float]] = "global"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    max_layer_sparsity: float | None = None
    group_norm: str = "l1"
    calibration_batches: int = 8


@dataclass
class ScheduleSpec:
    name: str = "oneshot"
    at: int | None = None
    steps: int | None = None
    every: int | None = None
    start: int | None = None
    initial: float | None = None
    end: int | None = None


@dataclass
class TrainSpec:
    epochs: int = 1
    lr: float | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0


@dataclass
class OutputSpec:
    dir: str | None = None
    save: bool = True
    report: bool = True


@dataclass
class Recipe:
    """A validated recipe. ``base_dir`` is the folder relative paths are resolved against."""

    model: ModelSpec
    data: DataSpec
    prune: PruneSpec
    schedule: ScheduleSpec | None = None
    train: TrainSpec | None = None
    finetune: TrainSpec | None = None
    output: OutputSpec = field(default_factory=OutputSpec)
    name: str | None = None
    seed: int = 0
    threads: int | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None

    def resolve(self, path: str | Path) -> Path:
        """``path`` relative to the recipe's folder (absolute paths unchanged)."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def title(self) -> str:
        return self.name or (self.source.stem if self.source else "recipe")

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir if self.output.dir else f"{self.title}-out")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (defaults filled in), for ``results.json`` and the report."""
        out: dict[str, Any] = {"name": self.title, "seed": self.seed, "threads": self.threads}
        for key in ("model", "data", "prune", "schedule", "train", "finetune", "output"):
            value = getattr(self, key)
            out[key] = None if value is None else dataclasses.asdict(value)
        return out


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "prune": PruneSpec,
    "schedule": ScheduleSpec,
    "train": TrainSpec,
    "finetune": TrainSpec,
    "output": OutputSpec,
}
_TOP_LEVEL = ("name", "seed", "threads", *_SECTIONS)
_REQUIRED = ("model", "data", "prune")


# --- parsing and value checks ---------------------------------------------------------------------


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe (keys, types, values, files). Nothing is built or written."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path.name} is not valid YAML: {' '.join(str(error).split())}") from None
    if raw is None:
        raise RecipeError(f"{path.name} is empty")
    return parse_recipe(raw, base_dir=path.resolve().parent, source=path)


def parse_recipe(raw: Any, base_dir: str | Path | None = None, source: Path | None = None) -> Recipe:
    """Validate a recipe given as a mapping (what ``yaml.safe_load`` returns)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of sections ({', '.join(_TOP_LEVEL)}), got {type_name(raw)}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise unknown_key("", key, _TOP_LEVEL, RecipeError)
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise RecipeError(f"{key}: this section is required")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise RecipeError(f"name: expected a string, got {type_name(name)} {name!r}")
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name or "\\" in name):
        raise RecipeError(f"name: {name!r} names the default output folder ('<name>-out' next to the recipe), so it "
                          "must be a plain name: not empty, no '/' or '\\', not '.' or '..'")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RecipeError(f"seed: expected an integer from 0 to 2**63 - 1, got {seed!r}")
    threads = raw.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise RecipeError(f"threads: expected an integer >= 1 or null, got {threads!r}")
    if threads is not None and threads > (os.cpu_count() or 1):
        raise RecipeError(f"threads: {threads} is more than this machine's {os.cpu_count() or 1} CPU(s)")
    sections = {
        key: (build_section(raw[key], key, cls, RecipeError, _advice) if key in raw else None)
        for key, cls in _SECTIONS.items()
    }
    if sections["output"] is None:
        sections["output"] = OutputSpec()
    recipe = Recipe(
        **sections,
        name=name,
        seed=seed,
        threads=threads,
        base_dir=Path(base_dir) if base_dir is not None else Path.cwd(),
        source=source,
    )
    _check_values(recipe, raw)
    return recipe


def _fail(path: str, message: str) -> RecipeError:
    return RecipeError(f"{path}: {message}")


def _check_positive_int(value: int | None, path: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise _fail(path, f"must be at least {minimum}, got {value}")


def _check_values(recipe: Recipe, raw: dict) -> None:
    """Value checks that need more than a type: ranges, registry names, files, cross-key rules."""
    model = recipe.model
    if (model.builtin is None) == (model.factory is None):
        raise _fail("model", "give exactly one of builtin (a prunekit.models name) or factory ('module:function')")
    if model.factory is not None:
        module, _, function = model.factory.partition(":")
        if not module or not function:
            raise _fail("model.factory", f"expected 'module:function' or 'file.py:function', got {model.factory!r}")
        if module.endswith(".py") and not recipe.resolve(module).is_file():
            raise _fail("model.factory", f"file not found: {recipe.resolve(module)}")
    if model.weights is not None and not recipe.resolve(model.weights).is_file():
        raise _fail("model.weights", f"file not found: {recipe.resolve(model.weights)}")

    if recipe.data.name not in DATASETS:
        raise _fail("data.name", unknown_name_message("data set", recipe.data.name, DATASETS))
    _check_positive_int(recipe.data.batch_size, "data.batch_size")
    _check_kwargs(_data_function(recipe.data.name), recipe.data.kwargs, "data.kwargs", f"prunekit.data.{recipe.data.name}")

    prune = recipe.prune
    if prune.method.strip().lower() not in CRITERIA:
        raise _fail("prune.method", _registry_message(CRITERIA, prune.method))
    try:
        granularity = get_granularity(prune.granularity)
    except ValueError as error:
        raise _fail("prune.granularity", str(error)) from None
    if isinstance(prune.scope, str):
        if prune.scope.strip().lower() not in SCOPES:
            raise _fail("prune.scope", _registry_message(SCOPES, prune.scope))
    else:
        for pattern, value in prune.scope.items():
            _check_sparsity(value, f"prune.scope.{pattern}", check_sparsity)
    if prune.sparsity is not None:
        _check_sparsity(prune.sparsity, "prune.sparsity", check_sparsity)
        if isinstance(granularity, NM) and abs(prune.sparsity - granularity.sparsity) > 1e-9:
            raise _fail("prune.sparsity", f"the {granularity.name} pattern fixes sparsity at {granularity.sparsity:g}; leave it out")
    elif not isinstance(granularity, NM) and isinstance(prune.scope, str) and prune.scope.strip().lower() != "threshold":
        raise _fail("prune.sparsity", "is required (a number in [0, 1))")
    if prune.max_layer_sparsity is not None:
        try:
            check_layer_cap(prune.max_layer_sparsity)
        except ValueError as error:
            raise _fail("prune.max_layer_sparsity", str(error)) from None
    if prune.group_norm not in ("l1", "l2"):
        raise _fail("prune.group_norm", f"must be 'l1' or 'l2', got {prune.group_norm!r}")
    _check_positive_int(prune.calibration_batches, "prune.calibration_batches")

    for key in ("train", "finetune"):
        spec = getattr(recipe, key)
        if spec is None:
            continue
        _check_positive_int(spec.epochs, f"{key}.epochs", 0)
        if spec.lr is not None and not spec.lr > 0:
            raise _fail(f"{key}.lr", f"must be positive, got {spec.lr}")
        if spec.optimizer.lower() not in OPTIMIZERS:
            raise _fail(f"{key}.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {spec.optimizer!r}")
        if spec.weight_decay < 0:
            raise _fail(f"{key}.weight_decay", f"must be >= 0, got {spec.weight_decay}")

    if recipe.schedule is not None:
        _check_schedule(recipe, raw.get("schedule") or {})


def _check_sparsity(value: float, path: str, check: Callable) -> None:
    try:
        check(value, path)
    except (TypeError, ValueError) as error:
        raise RecipeError(str(error)) from None


def _registry_message(registry, name: str) -> str:
    return unknown_name_message(registry.kind, name, registry.names())


def _check_schedule(recipe: Recipe, raw: dict) -> None:
    """Schedule name and keys, and that fine-tuning lasts long enough to reach the final sparsity."""
    spec = recipe.schedule
    name = spec.name.strip().lower()
    if name not in SCHEDULE_KEYS:
        raise _fail("schedule.name", unknown_name_message("schedule", spec.name, SCHEDULE_KEYS))
    allowed = SCHEDULE_KEYS[name]
    for key in raw:
        if key != "name" and key not in allowed:
            raise _fail(f"schedule.{key}", f"the {name} schedule does not take it (its keys: {', '.join(allowed)})")
    for key in ("at", "start"):
        _check_positive_int(getattr(spec, key), f"schedule.{key}", 0)
    for key in ("steps", "every", "end"):
        _check_positive_int(getattr(spec, key), f"schedule.{key}", 1)
    if name == "iterative" and spec.steps is None:
        raise _fail("schedule.steps", "the iterative schedule needs steps (how many prune events)")
    if name == "agp" and spec.end is None:
        raise _fail("schedule.end", "the agp schedule needs end (the epoch at which it reaches the final sparsity)")
    final = final_sparsity(recipe)
    if final is None:
        raise _fail("schedule", "a schedule needs prune.sparsity (its final sparsity)")
    try:
        schedule = build_schedule(recipe, final, steps_per_epoch=1)
    except (TypeError, ValueError) as error:
        raise _fail("schedule", str(error)) from None
    last = schedule.last_step
    if last > 0:
        epochs = recipe.finetune.epochs if recipe.finetune else 0
        if epochs <= last:
            raise _fail(
                "finetune.epochs",
                f"the {name} schedule prunes up to epoch {last}, so fine-tuning needs at least {last + 1} "
                f"epochs (got {epochs})",
            )


def final_sparsity(recipe: Recipe) -> float | None:
    """The sparsity the recipe ends at: ``prune.sparsity``, or the N:M pattern's."""
    granularity = get_granularity(recipe.prune.granularity)
    return granularity.sparsity if isinstance(granularity, NM) else recipe.prune.sparsity


def build_schedule(recipe: Recipe, final: float, steps_per_epoch: int):
    """The recipe's schedule (given in epochs) in optimizer steps."""
    spec, k = recipe.schedule, steps_per_epoch
    name = spec.name.strip().lower()
    if name == "oneshot":
        return get_schedule("oneshot", sparsity=final, at=(spec.at or 0) * k)
    if name == "iterative":
        return get_schedule("iterative", final=final, steps=spec.steps, every=(spec.every or 1) * k, start=(spec.start or 0) * k)
    return get_schedule(
        "agp", initial=spec.initial or 0.0, final=final, start=(spec.start or 0) * k, end=spec.end * k, every=(spec.every or 1) * k
    )


def _check_kwargs(function: Callable, kwargs: dict, path: str, what: str) -> None:
    """Every key of ``kwargs`` must be a parameter of ``function`` (unless it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in names:
            raise _fail(f"{path}.{key}", f"{what} takes no argument {key!r}{did_you_mean(key, names)} "
                                         f"(it takes: {', '.join(names)})")


def _data_function(name: str) -> Callable:
    return getattr(data, name)


# --- building ---------------------------------------------------------------------------------------


def _import_factory(recipe: Recipe) -> Callable[..., nn.Module]:
    """The factory function named by ``model.factory``, imported from a module or a file."""
    module_name, _, function = recipe.model.factory.partition(":")
    # "file.py:f", or "module:f" with module.py next to the recipe: load that file (fresh, never a cached
    # module of the same name from elsewhere); otherwise import an installed module.
    local = recipe.resolve(module_name if module_name.endswith(".py") else module_name.replace(".", "/") + ".py")
    try:
        if local.is_file():
            spec = importlib.util.spec_from_file_location(f"_prunekit_recipe_{local.stem}", local)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise _fail("model.factory", f"cannot import {module_name!r}: {error}") from None
    except Exception as error:  # the user's module failed while importing
        raise _fail("model.factory", f"importing {module_name!r} failed: {type(error).__name__}: {error}") from None
    factory = getattr(module, function, None)
    if factory is None:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise _fail("model.factory", f"{module_name!r} has no {function!r}{did_you_mean(function, names)}")
    if not callable(factory):
        raise _fail("model.factory", f"{module_name}:{function} is not callable")
    return factory


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model, seeded, with its weights loaded when given (validated; raises RecipeError)."""
    torch.manual_seed(recipe.seed)
    if recipe.model.builtin is not None:
        path = "model.builtin"
        build: Callable[..., nn.Module] = lambda **kw: get_model(recipe.model.builtin, **kw)  # noqa: E731
        constructor = MODELS.get(recipe.model.builtin) if recipe.model.builtin in MODELS else None
        if constructor is not None:
            _check_kwargs(constructor, recipe.model.kwargs, "model.kwargs", recipe.model.builtin)
    else:
        path = "model.factory"
        build = _import_factory(recipe)
        _check_kwargs(build, recipe.model.kwargs, "model.kwargs", recipe.model.factory)
    try:
        model = build(**recipe.model.kwargs)
    except (TypeError, ValueError, RuntimeError) as error:  # RuntimeError: torch on a negative size, ...
        where = "model.kwargs" if not isinstance(error, ValueError) and recipe.model.kwargs else path
        raise _fail(where, f"building the model failed: {' '.join(str(error).split())}") from None
    if not isinstance(model, nn.Module):
        raise _fail(path, f"expected a torch.nn.Module, got {type(model).__name__}")
    if recipe.model.weights is not None:
        load_weights(model, recipe.resolve(recipe.model.weights), "model.weights")
    return model


def load_weights(model: nn.Module, file: str | Path, where: str) -> nn.Module:
    """``prunekit.load(model, file)``, any failure (a missing, truncated or foreign file) a RecipeError
    on one line that names ``where`` (the key or option) and the file."""
    try:
        return load(model, file)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise _fail(where, f"{file}: {' '.join(str(error).split())}") from None
    except Exception as error:  # safetensors raises its own error for a file that is not one (or is cut short)
        raise _fail(where, f"{file} is not a readable safetensors file ({type(error).__name__}: "
                           f"{' '.join(str(error).split())})") from None


def build_data(recipe: Recipe):
    """``(train_set, test_set)`` of the recipe's built-in data."""
    try:
        return _data_function(recipe.data.name)(**recipe.data.kwargs)
    except (TypeError, ValueError) as error:
        raise _fail("data.kwargs", str(error)) from None


def build_model_and_data(recipe: Recipe) -> tuple[nn.Module, Any, Any, torch.Tensor]:
    """``(model, train_set, test_set, example)``, checked to fit together: the model runs on
    ``example``, the first test input as a batch of one."""
    model = build_model(recipe)
    train_set, test_set = build_data(recipe)
    example = test_set.tensors[0][:1]
    try:
        with eval_mode(model), torch.no_grad():
            output = call_model(model, example)
    except Exception as error:
        raise RecipeError(
            f"model and data do not fit: {recipe.data.name} gives inputs of shape {tuple(example.shape)}, "
            f"and the model fails on them ({type(error).__name__}: {error})"
        ) from None
    _check_classes(recipe, output, train_set, test_set)
    return model, train_set, test_set, example


def _check_classes(recipe: Recipe, output: Any, train_set: Any, test_set: Any) -> None:
    """A classifier needs one output per class of the data: fewer, and training fails (or learns
    nonsense) part-way through."""
    labels = [s.tensors[1] for s in (train_set, test_set)]
    if not all(t.dtype in (torch.int64, torch.int32) for t in labels) or not isinstance(output, torch.Tensor):
        return  # not class labels: nothing to compare
    classes = int(max(int(t.max()) for t in labels)) + 1
    width = output.shape[-1] if output.dim() == 2 else None
    if width is None or width < classes:
        what = f"{width} outputs per example" if width is not None else f"outputs of shape {tuple(output.shape)}"
        raise RecipeError(f"model and data do not fit: {recipe.data.name} has {classes} classes (labels 0 to "
                          f"{classes - 1}) and the model gives {what}; set model.kwargs.num_classes to {classes}")


@dataclass
class Prepared:
    """Everything built and checked before a recipe runs."""

    recipe: Recipe
    model: nn.Module
    train_set: Any
    test_set: Any
    example: torch.Tensor
    out_dir: Path


def prepare(recipe: Recipe | str | Path, out_dir: str | Path | None = None) -> Prepared:
    """Validate a recipe completely: build its model (weights loaded) and data, check that they fit, and
    dry-run the pruning configuration on the model. ``out_dir`` overrides ``output.dir``. Nothing is
    written; raises RecipeError."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.output.report:
        require_matplotlib()  # fail before the work, not after
    model, train_set, test_set, example = build_model_and_data(recipe)
    p = recipe.prune
    try:
        spec = PruningSpec(model, p.method, p.granularity, p.scope, p.targets, p.exclude, p.group_norm,
                           p.max_layer_sparsity, recipe.seed)
        spec.check_sparsity(final_sparsity(recipe))
    except (TypeError, ValueError) as error:
        raise _fail("prune", str(error)) from None
    out = Path(out_dir).expanduser() if out_dir is not None else recipe.output_dir
    if out.exists() and not out.is_dir():
        raise _fail("output.dir" if out_dir is None else "--out", f"{out} exists and is not a folder")
    return Prepared(recipe, model, train_set, test_set, example, out)
