"""The ``lightning-shrink`` command.

Subcommands:

``lightning-shrink fit --config recipe.yaml`` (also ``validate``, ``test``, ``predict``)
    Lightning's ``LightningCLI``: the model, the data and the Trainer, with the compression
    callbacks under ``trainer.callbacks`` as ``class_path``/``init_args``. An unknown argument of
    a callback is an error that names the field. After ``fit``, the compression report is printed
    and written into the logger's directory (``report.txt``, ``report.json``, ``report.png``).
``lightning-shrink demo [--quick] [--output-dir DIR]``
    Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes snippets dense, then compressed (pruning,
    quantization-aware training, distillation), converts, exports and reports.
``lightning-shrink plugins``
    Lists the registered plugins (built-in, entry-point with their distribution, blocked), the
    hooks each implements, and the technique callbacks, like ``pytest --trace-config``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

__all__ = ["RecipeError", "ShrinkCLI", "check_recipe_callbacks", "main"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ShrinkCLI(LightningCLI):
    """``LightningCLI`` that prints the compression report after ``fit`` and writes it into the
    logger's directory (``report.txt``, ``report.json``, ``report.png``)."""

    def instantiate_classes(self) -> None:
        # A callback or model rejecting a value (validated in __init__) is a recipe error: show
        # its message, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise RecipeError(f"{type(exc).__name__}: {exc}") from exc

    def after_fit(self) -> None:
        from lightning_shrink.report import report, save_report

        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        if trainer.loggers and trainer.log_dir is not None:
            rep = save_report(trainer)
            where = f" (written to {trainer.log_dir})"
        else:
            rep = report(trainer)
            where = ""
        print(f"\nCompression report{where}:\n{rep.to_table()}")


class RecipeError(ValueError):
    """A recipe names an argument or value its class does not accept."""


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _import_class(class_path: str) -> type | None:
    import importlib

    candidates = (
        [class_path.rsplit(".", 1)]
        if "." in class_path
        else [("lightning_shrink", class_path), ("lightning.pytorch.callbacks", class_path)]
    )
    for module_name, attr in candidates:
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type):
            return obj
    return None


def check_recipe_callbacks(path: str) -> None:
    """Check that every ``trainer.callbacks`` entry of the recipe at ``path`` only names arguments
    its class accepts.

    LightningCLI rejects such a recipe too, but inside a long message about union types; this
    names the file, the entry, the argument, the closest accepted name and all accepted names.

    Raises:
        RecipeError: an ``init_args`` key is not an argument of the callback's class.
    """
    import difflib
    import inspect

    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # LightningCLI reports unreadable files itself
    trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for i, entry in enumerate(callbacks or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
            continue
        cls = _import_class(entry["class_path"])
        init_args = entry.get("init_args") or {}
        if cls is None or not isinstance(init_args, dict):
            continue
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        accepted = [
            n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL
        ]
        for key in init_args:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RecipeError(
                    f"{path}: trainer.callbacks[{i}].init_args.{key}: {cls.__name__} has no argument "
                    f"{key!r}{hint} (its arguments: {', '.join(accepted)})"
                )


def run_lightning_cli(args: Sequence[str]) -> int:
    """Run ``LightningCLI`` on ``args`` (starting with the subcommand, e.g. ``["fit", "--config",
    "recipe.yaml"]``). Model and data are given as ``class_path`` in the recipe.

    Returns 2 with a message naming the field when a recipe has an unknown callback argument or a
    value a class rejects.
    """
    try:
        for path in _config_paths(args):
            check_recipe_callbacks(path)
        _run_lightning_cli(args)
    except RecipeError as exc:
        print(f"lightning-shrink {args[0]}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_lightning_cli(args: Sequence[str]) -> None:
    import warnings

    # `main` passes the command line on explicitly; LightningCLI would warn that sys.argv is set too.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    ShrinkCLI(
        args=list(args),
        parser_kwargs={
            "prog": "lightning-shrink",
            "description": "lightning-shrink: fit with compression callbacks",
        },
        save_config_kwargs={"overwrite": True},
        subclass_mode_model=True,
        subclass_mode_data=True,
    )


# ---------------------------------------------------------------------- demo


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-shrink demo",
        description=(
            "Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes review snippets (split by movie) dense, then "
            "compressed with GradualMagnitudePruning + QuantizationAwareTraining + KnowledgeDistillation "
            "from the dense teacher; convert, export, and report accuracy, sparsity, size and latency."
        ),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a short run (about 5 minutes on 2 CPU cores)")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random BERT on a few dozen snippets (seconds; checks the pipeline, not the accuracy)",
    )
    parser.add_argument(
        "--output-dir", default="shrink-demo", help="results directory (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output-dir at the end"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a local CSV file or a Hugging Face dataset id instead of the Rotten Tomatoes snippets",
    )
    parser.add_argument("--text-column", default="text", help="text column of --data (default: %(default)s)")
    parser.add_argument(
        "--label-column", default="label", help="label column of --data (default: %(default)s)"
    )
    parser.add_argument("--group-column", default=None, help="CSV column kept on one side of the split")
    parser.add_argument(
        "--techniques",
        default=None,
        help="comma-separated subset of pruning,quantization,distillation (default: all three)",
    )
    for name, kind in (
        ("train-size", int),
        ("test-size", int),
        ("teacher-steps", int),
        ("student-steps", int),
        ("batch-size", int),
        ("max-length", int),
        ("sparsity", float),
        ("embedding-bits", int),
        ("seed", int),
    ):
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"override the preset's {name}")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    return parser


def run_demo_command(args: Sequence[str]) -> int:
    parser = demo_parser()
    ns = parser.parse_args(args)
    from lightning_shrink.demo import DataError, DemoError, run_demo

    preset = "smoke" if ns.smoke else "quick" if ns.quick else "default"
    overrides: dict[str, Any] = {}
    for name in (
        "train_size",
        "test_size",
        "teacher_steps",
        "student_steps",
        "batch_size",
        "max_length",
        "seed",
    ):
        value = getattr(ns, name)
        if value is not None:
            if value < (0 if name == "seed" else 1):
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            overrides[name] = value
    if ns.sparsity is not None:
        if not 0.0 < ns.sparsity < 1.0:
            parser.error(f"--sparsity must be in (0, 1), got {ns.sparsity}")
        overrides["sparsity"] = ns.sparsity
    if ns.embedding_bits is not None:
        if ns.embedding_bits not in (8, 4):
            parser.error(f"--embedding-bits must be 8 or 4, got {ns.embedding_bits}")
        overrides["embedding_bits"] = ns.embedding_bits
    if ns.techniques is not None:
        overrides["techniques"] = tuple(t.strip() for t in ns.techniques.split(",") if t.strip())
    try:
        results = run_demo(
            output_dir=ns.output_dir,
            preset=preset,
            data=ns.data,
            text_column=ns.text_column,
            label_column=ns.label_column,
            group_column=ns.group_column,
            overwrite=ns.overwrite,
            verbose=not ns.quiet,
            progress=not (ns.no_progress or ns.quiet),
            **overrides,
        )
    except (DataError, DemoError) as exc:
        parser.exit(2, f"lightning-shrink demo: error: {exc}\n")
    if ns.quiet:
        from lightning_shrink.demo.run import summary_markdown

        print(summary_markdown(results))
    return 0


# ---------------------------------------------------------------------- plugins


def plugins_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-shrink plugins",
        description="List the registered plugins and the hooks each implements.",
    )
    parser.add_argument("-p", "--block", action="append", default=[], metavar="NAME", help="block a plugin")
    parser.add_argument("--no-autoload", action="store_true", help="do not load entry-point plugins")
    return parser


def describe_plugins(block: Sequence[str] = (), autoload: bool | None = None) -> str:
    """The text of ``lightning-shrink plugins``."""
    import lightning_shrink
    from lightning_shrink.lightning.technique import TechniqueCallback
    from lightning_shrink.manager import BUILTIN_PLUGINS, ESSENTIAL_PLUGINS, get_plugin_manager

    pm = get_plugin_manager(block_plugins=block, autoload=autoload)
    lines = [f"lightning-shrink {lightning_shrink.__version__}"]
    lines.append(f"entry-point autoload: {'on' if pm.autoload else 'off'}")
    registered = []
    blocked = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            blocked.append(name)
        else:
            registered.append((name, plugin))
    lines.append("registered plugins:")
    for name, plugin in registered:
        if name in BUILTIN_PLUGINS:
            origin = "built-in" + (", essential" if name in ESSENTIAL_PLUGINS else "")
            where = BUILTIN_PLUGINS[name]
        elif pm.distribution_of(name):
            origin = f"entry point, distribution {pm.distribution_of(name)}"
            where = getattr(plugin, "__name__", type(plugin).__qualname__)
        else:
            origin = "registered"
            where = getattr(plugin, "__name__", type(plugin).__qualname__)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        lines.append(f"  {name} ({origin}): {where}")
        lines.append(f"      hooks: {', '.join(hooks) if hooks else '(none)'}")
    lines.append("blocked plugins: " + (", ".join(sorted(blocked)) if blocked else "(none)"))
    techniques = []
    for export in sorted(getattr(lightning_shrink, "__all__", [])):
        obj = getattr(lightning_shrink, export, None)
        if isinstance(obj, type) and issubclass(obj, TechniqueCallback) and obj is not TechniqueCallback:
            techniques.append(f"  {export} -> plugin {obj.plugin_name!r}")
            hooks = _technique_hooks(obj)
            if hooks:
                techniques.append(f"      hooks: {', '.join(hooks)}")
    lines.append("technique callbacks (their plugins are registered in each Trainer's manager):")
    lines.extend(techniques or ["  (none installed)"])
    return "\n".join(lines)


#: Minimal arguments to build a technique's plugin, only to list the hooks it implements.
_EXAMPLE_ARGS: dict[str, dict[str, Any]] = {
    "GradualMagnitudePruning": {"target_sparsity": 0.5},
    "DifferentialPrivacy": {"noise_multiplier": 1.0},
}


def _technique_hooks(cls: type) -> list[str]:
    """The hooks a technique's plugin implements, or ``[]`` when it cannot be built bare."""
    import torch

    kwargs = dict(_EXAMPLE_ARGS.get(cls.__name__, {}))
    if cls.__name__ == "KnowledgeDistillation":
        kwargs["teacher"] = torch.nn.Linear(1, 1)
    try:
        plugin = cls(**kwargs).plugin
    except Exception:
        return []
    return sorted(
        name for name in dir(plugin) if name.startswith("shrink_") and callable(getattr(plugin, name, None))
    )


def run_plugins_command(args: Sequence[str]) -> int:
    ns = plugins_parser().parse_args(args)
    from lightning_shrink.manager import PluginError

    try:
        print(describe_plugins(ns.block, autoload=False if ns.no_autoload else None))
    except PluginError as exc:
        print(f"lightning-shrink plugins: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------- main

USAGE = """usage: lightning-shrink {fit,validate,test,predict,demo,plugins} ...

Compress models while they are fine-tuned.

subcommands:
  fit --config recipe.yaml   train with LightningCLI; compression callbacks under trainer.callbacks
  validate / test / predict  the other LightningCLI subcommands
  demo [--quick]             the end-to-end demo on all-MiniLM-L6-v2 and Rotten Tomatoes snippets
  plugins                    list the registered plugins and their hooks

Run `lightning-shrink <subcommand> --help` for a subcommand's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-shrink`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        import lightning_shrink

        print(f"lightning-shrink {lightning_shrink.__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        return run_lightning_cli([command, *rest])
    if command == "demo":
        return run_demo_command(rest)
    if command == "plugins":
        return run_plugins_command(rest)
    print(USAGE, end="", file=sys.stderr)
    print(f"lightning-shrink: error: unknown subcommand {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
