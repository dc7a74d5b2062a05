"""Checking a recipe before LightningCLI reads it: an unknown callback argument is one line that
names the file, the entry, the argument and the closest accepted name."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Sequence

__all__ = ["RecipeError", "check_recipe_callbacks", "config_paths"]


class RecipeError(ValueError):
    """A recipe names an argument or value its class does not accept."""


def config_paths(args: Sequence[str]) -> list[str]:
    """The files given with ``--config`` / ``-c`` / ``--config=...`` on a command line."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _import_class(class_path: str) -> type | None:
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
    Entries whose class cannot be imported, or that accept ``**kwargs``, are left to LightningCLI,
    as are unreadable files.

    Raises:
        RecipeError: an ``init_args`` key is not an argument of the callback's class.
    """
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
