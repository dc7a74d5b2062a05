"""``lightning-shrink plugins``: what the plugin manager of a new Trainer would hold, like
``pytest --trace-config``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["describe_plugins", "plugins_parser", "run_plugins_command"]

#: Placeholder arguments that build a technique's plugin, only to list the hooks it implements.
_EXAMPLE_ARGS: dict[str, dict[str, Any]] = {
    "GradualMagnitudePruning": {"target_sparsity": 0.5},
    "DifferentialPrivacy": {"noise_multiplier": 1.0},
}


def plugins_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-shrink plugins",
        description="List the registered plugins and the hooks each implements.",
    )
    parser.add_argument("-p", "--block", action="append", default=[], metavar="NAME", help="block a plugin")
    parser.add_argument("--no-autoload", action="store_true", help="do not load entry-point plugins")
    return parser


def describe_plugins(block: Sequence[str] = (), autoload: bool | None = None) -> str:
    """The text of ``lightning-shrink plugins``.

    Args:
        block: Names of plugins to block (as ``-p NAME``).
        autoload: ``False``: no entry-point plugins; ``None``: as the environment says.

    Raises:
        PluginError: an essential plugin is blocked, or a plugin fails to load.
    """
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
            techniques.append(f"      hooks: {_technique_hooks(obj)}")
    lines.append("technique callbacks (their plugins are registered in each Trainer's manager):")
    lines.extend(techniques or ["  (none installed)"])
    return "\n".join(lines)


def _technique_hooks(cls: type) -> str:
    """The hooks a technique's plugin implements, listed from a plugin built with placeholder
    arguments, or why it could not be built."""
    import torch

    kwargs = dict(_EXAMPLE_ARGS.get(cls.__name__, {}))
    if cls.__name__ == "KnowledgeDistillation":
        kwargs["teacher"] = torch.nn.Linear(1, 1)
    try:
        plugin = cls(**kwargs).plugin
    except Exception as exc:  # a technique whose placeholder arguments no longer fit: say so
        return f"(not listed: {cls.__name__}({_arguments(kwargs)}) raised {type(exc).__name__}: {exc})"
    hooks = sorted(
        name for name in dir(plugin) if name.startswith("shrink_") and callable(getattr(plugin, name, None))
    )
    return ", ".join(hooks) if hooks else "(none)"


def _arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}=..." if k == "teacher" else f"{k}={v!r}" for k, v in kwargs.items())


def run_plugins_command(args: Sequence[str]) -> int:
    """``lightning-shrink plugins [-p NAME] [--no-autoload]``; 2 when a plugin cannot be loaded or
    an essential one is blocked."""
    ns = plugins_parser().parse_args(args)
    from lightning_shrink.manager import PluginError

    try:
        print(describe_plugins(ns.block, autoload=False if ns.no_autoload else None))
    except PluginError as exc:
        print(f"lightning-shrink plugins: error: {exc}", file=sys.stderr)
        return 2
    return 0
