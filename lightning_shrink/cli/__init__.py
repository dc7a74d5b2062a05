"""The ``lightning-shrink`` command.

Subcommands, one module each:

``lightning-shrink fit --config recipe.yaml`` (also ``validate``, ``test``, ``predict``): :mod:`.fit`
    Lightning's ``LightningCLI``: the model, the data and the Trainer, with the compression
    callbacks under ``trainer.callbacks`` as ``class_path``/``init_args``. An unknown argument of
    a callback is an error that names the field (:mod:`.recipes`). After ``fit``, the compression
    report is printed and written into the logger's directory (``report.txt``, ``report.json``, and
    ``report.png`` when matplotlib is installed).
``lightning-shrink demo [--quick] [--output-dir DIR]``: :mod:`.demo`
    Fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes snippets dense, then compressed (pruning,
    quantization-aware training, distillation), converts, exports and reports.
``lightning-shrink serve DIRECTORY [--port N] [--workers K] [--max-batch-size B]``: :mod:`.serve`
    Serves an export over HTTP on LitServe (``POST /predict``, ``GET /health``), on PyTorch or, when
    the directory has ``model.onnx``, on ONNX Runtime.
``lightning-shrink plugins``: :mod:`.plugins`
    Lists the registered plugins (built-in, entry-point with their distribution, blocked), the
    hooks each implements, and the technique callbacks, like ``pytest --trace-config``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_shrink.cli.fit import LIGHTNING_SUBCOMMANDS, ShrinkCLI, run_lightning_cli
from lightning_shrink.cli.plugins import describe_plugins
from lightning_shrink.cli.recipes import RecipeError, check_recipe_callbacks

__all__ = ["RecipeError", "ShrinkCLI", "check_recipe_callbacks", "describe_plugins", "main"]

USAGE = """usage: lightning-shrink {fit,validate,test,predict,demo,serve,plugins} ...

Compress models while they are fine-tuned.

subcommands:
  fit --config recipe.yaml   train with LightningCLI; compression callbacks under trainer.callbacks
  validate / test / predict  the other LightningCLI subcommands
  demo [--quick]             the end-to-end demo on all-MiniLM-L6-v2 and Rotten Tomatoes snippets
  serve DIRECTORY            serve an export over HTTP (POST /predict, GET /health) on LitServe
  plugins                    list the registered plugins and their hooks

Run `lightning-shrink <subcommand> --help` for a subcommand's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-shrink`` console script; returns the exit status."""
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
        from lightning_shrink.cli.demo import run_demo_command

        return run_demo_command(rest)
    if command == "serve":
        from lightning_shrink.cli.serve import run_serve_command

        return run_serve_command(rest)
    if command == "plugins":
        from lightning_shrink.cli.plugins import run_plugins_command

        return run_plugins_command(rest)
    print(USAGE, end="", file=sys.stderr)
    print(f"lightning-shrink: error: unknown subcommand {command!r}", file=sys.stderr)
    return 2
