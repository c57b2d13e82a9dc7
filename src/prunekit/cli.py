"""The ``prunekit`` command.

    prunekit demo [--out DIR] [--quick] [--seed N]   compare methods on LeNet-300-100 / digits
    prunekit methods                                  every method, granularity, scope and schedule
    prunekit prune RECIPE.yaml [--out DIR]            run a recipe (see prunekit.recipes for the schema)
    prunekit summary RECIPE.yaml                      layers, parameters and FLOPs of a recipe's model
    prunekit report [RESULTS.json ...] [--recipe R]   an HTML report: accuracy, layers, sensitivity, speed, size

User errors (a bad recipe, a missing or unreadable file, a wrong value, an output folder that cannot be
written or is in use by another run) print ``error: <message>`` on one line to stderr and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import demo, metrics, recipe_run, recipes, report
from ._version import __version__
from .criteria import CRITERIA
from .fileio import FolderInUse
from .granularity import GRANULARITIES
from .render import Column, percent, print_table, seconds, times
from .schedules import SCHEDULES
from .scope import SCOPES

__all__ = ["main", "build_parser"]

#: errors printed as one line, exit status 2: bad input (RecipeError is a ValueError), a missing extra, a file or
#: folder that cannot be read or written (OSError: permissions, a full disk), an output folder in use
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, FolderInUse)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


# --- subcommands --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    console = _console()
    results = demo.demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress, console=console,
                   threads=args.threads)
    console.print(f"took {results['wall_time_s']:.1f} s; wrote " + "\n      ".join(results["files"].values()),
                  soft_wrap=True)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .llm.methods import LLM_METHODS  # the lazy subpackages load only for this listing
    from .structured.criteria import GROUP_CRITERIA as STRUCTURED_METHODS

    console = _console()
    groups = [
        ("Methods: how weights are scored (method=)", CRITERIA.items(), []),
        ("Granularities: what is removed (granularity=)", GRANULARITIES.items(), []),
        ("Scopes: where the budget goes (scope=)", SCOPES.items(),
         [("{pattern: sparsity}", "explicit sparsity per layer name or glob (a mapping instead of a name)")]),
        ("Schedules: when pruning happens (schedule=, Pruner)", SCHEDULES.items(), []),
        ("LLM one-shot methods (prunekit.llm.prune, prunekit llm --method)", LLM_METHODS.items(), []),
        ("Structured methods: channel groups removed physically (prunekit.structured.prune(method=))",
         STRUCTURED_METHODS.items(), []),
    ]
    columns = [Column("name", "name"), Column("description", "description")]
    for title, items, extra in groups:
        rows = [{"name": name, "description": text} for name, text in [*items, *extra]]
        console.print(f"[bold]{title}[/bold]")
        print_table(rows, columns, console=console)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    console = _console()
    results = recipe_run.run_recipe(args.recipe, out_dir=args.out, console=_console(stderr=True))
    before, after = results["before"], results["after"]
    rows = [
        {"": "accuracy", "before": percent(before["accuracy"]), "after": percent(after["accuracy"])},
        {"": "sparsity", "before": "-", "after": percent(after["sparsity"])},
        {"": "compression", "before": times(before["compression_ratio"]), "after": times(after["compression_ratio"])},
        {"": "theoretical speedup", "before": times(before["theoretical_speedup"]),
         "after": times(after["theoretical_speedup"])},
        {"": "latency (batch 1)", "before": seconds(before["latency_s"]), "after": seconds(after["latency_s"])},
    ]
    columns = [Column(""), Column("before", align="right"), Column("after", align="right")]
    print_table(rows, columns, title=results["name"], console=console)
    console.print("wrote " + "\n      ".join(results["files"].values()), soft_wrap=True)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    model, _, _, example = recipes.build_model_and_data(recipes.load_recipe(args.recipe))
    metrics.summary(model, example)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    console = _console()
    files = report.build_report(args.out, args.results, recipe=args.recipe, weights=args.weights,
                         sensitivity=args.sensitivity, sweep=args.sweep, sparsities=args.sparsities,
                         target=args.target, speed=not args.no_speed, threads=args.threads, title=args.title,
                         progress=not args.no_progress, console=_console(stderr=True))
    console.print("wrote " + "\n      ".join(str(p) for p in files.values()), soft_wrap=True)
    return 0


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit",
        description="Pruning for PyTorch: compare methods, run YAML recipes, inspect models.",
        epilog="Run 'prunekit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo_cmd = sub.add_parser(
        "demo",
        help="compare pruning methods on LeNet-300-100 / digits (under a minute)",
        description="Train LeNet-300-100 on digits, prune it at 50-98%% sparsity with magnitude (global and "
        "local), random and Taylor, with and without fine-tuning; print a table and write results.json, "
        "plots and report.html.",
    )
    demo_cmd.add_argument("--out", default="prunekit-demo", metavar="DIR", help="output folder (default: %(default)s)")
    demo_cmd.add_argument("--quick", action="store_true", help="a reduced grid that runs in a few seconds")
    demo_cmd.add_argument("--seed", type=int, default=0, metavar="N", help="seed of training and pruning (default: 0)")
    demo_cmd.add_argument("--threads", type=int, default=1, metavar="N",
                      help="torch CPU threads (default: 1, fastest for this small model)")
    demo_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo_cmd.set_defaults(func=cmd_demo)

    methods_cmd = sub.add_parser(
        "methods",
        help="list every method, granularity, scope and schedule",
        description="List every registered pruning method, granularity, scope and schedule, one line each.",
    )
    methods_cmd.set_defaults(func=cmd_methods)

    prune_cmd = sub.add_parser(
        "prune",
        help="run a YAML recipe",
        description="Validate and run a YAML recipe (model, data, prune, schedule, finetune, output); writes "
        "model.safetensors, results.json and report.html. The schema is documented in prunekit.recipes "
        "and in examples/lenet_digits.yaml.",
    )
    prune_cmd.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file")
    prune_cmd.add_argument("--out", metavar="DIR", help="output folder (default: the recipe's output.dir)")
    prune_cmd.set_defaults(func=cmd_prune)

    summary_cmd = sub.add_parser(
        "summary",
        help="layers, parameters and FLOPs of a recipe's model",
        description="Build a recipe's model (with its weights, if given) and print its layers, parameters, "
        "sparsity and FLOPs for one example input of the recipe's data.",
    )
    summary_cmd.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file")
    summary_cmd.set_defaults(func=cmd_summary)

    report_cmd = sub.add_parser(
        "report",
        help="an HTML report with plots from results files and/or a recipe's model",
        description="Write report.html (plots embedded) and PNGs: accuracy against sparsity, sparsity per "
        "layer, sensitivity curves, and the speed and size table. Inputs: results JSONs (prunekit demo, a "
        "recipe's results.json, a saved sensitivity analysis, benchmarks/sparse_inference.py) and/or a "
        "recipe's model (--recipe, with --weights), measured here: speed and size (sparse file, sparse kernels), "
        "and on request a sensitivity analysis and an accuracy sweep on the recipe's test data.",
    )
    report_cmd.add_argument("results", nargs="*", metavar="RESULTS.json", help="results files to include")
    report_cmd.add_argument("--recipe", metavar="RECIPE.yaml", help="build the recipe's model and data")
    report_cmd.add_argument("--weights", metavar="FILE", help="weights for the recipe's model (written by prunekit.save)")
    report_cmd.add_argument("--sensitivity", action="store_true", help="run a sensitivity analysis (test accuracy)")
    report_cmd.add_argument("--sweep", action="store_true", help="accuracy against sparsity (global/local magnitude)")
    report_cmd.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95], metavar="S",
                        help="the sparsity grid of --sensitivity and --sweep (default: %(default)s)")
    report_cmd.add_argument("--target", type=float, default=0.9, metavar="S",
                        help="global sparsity of the sensitivity allocation shown per layer (default: %(default)s)")
    report_cmd.add_argument("--no-speed", action="store_true", help="do not measure speed and size")
    report_cmd.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads (default: 1)")
    report_cmd.add_argument("--title", help="the report's title")
    report_cmd.add_argument("--out", default="prunekit-report", metavar="DIR", help="output folder (default: %(default)s)")
    report_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    report_cmd.set_defaults(func=cmd_report)

    from .llm.cli import add_parser as add_llm_parser  # `prunekit llm MODEL_DIR ...` (transformers loads lazily)

    add_llm_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``prunekit`` command; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error (argparse printed it)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
