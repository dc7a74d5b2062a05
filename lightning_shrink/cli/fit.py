"""``lightning-shrink fit`` (and ``validate``, ``test``, ``predict``): Lightning's ``LightningCLI`` on
recipes, with the compression report after ``fit``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from lightning_shrink.cli.recipes import RecipeError, check_recipe_callbacks, config_paths

__all__ = ["LIGHTNING_SUBCOMMANDS", "ShrinkCLI", "run_lightning_cli"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ShrinkCLI(LightningCLI):
    """``LightningCLI`` that prints the compression report after ``fit`` and writes it into the
    logger's directory (``report.txt``, ``report.json``, and ``report.png`` when matplotlib is
    installed). Without a logger the report is printed only."""

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


def run_lightning_cli(args: Sequence[str]) -> int:
    """Run ``LightningCLI`` on ``args`` (starting with the subcommand, e.g. ``["fit", "--config",
    "recipe.yaml"]``). Model and data are given as ``class_path`` in the recipe.

    Returns 2 with a message naming the field when a recipe has an unknown callback argument or a
    value a class rejects, else 0.
    """
    try:
        for path in config_paths(args):
            check_recipe_callbacks(path)
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
    except RecipeError as exc:
        print(f"lightning-shrink {args[0]}: error: {exc}", file=sys.stderr)
        return 2
    return 0
