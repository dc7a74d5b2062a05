"""The plugin manager: built-in plugins, entry-point plugins, blocking, tracing and clear errors.

Built like pytest's: built-in techniques are ordinary plugins, listed in :data:`BUILTIN_PLUGINS`;
third-party plugins are found through the ``lightning_shrink`` entry-point group; any plugin but
an essential one can be blocked by name.

Environment variables
---------------------
``LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD=1``
    Do not load plugins from entry points (loading a plugin runs its code).
``LIGHTNING_SHRINK_BLOCK_PLUGINS=name1,name2``
    Block these plugins by name, as ``block_plugins=`` does.
``LIGHTNING_SHRINK_TRACE=1``
    Print every hook call, its arguments' names and its result to standard error.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import types
from collections.abc import Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pluggy import PluginValidationError

from lightning_shrink import hookspecs
from lightning_shrink.hookspecs import PROJECT_NAME

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "ESSENTIAL_PLUGINS",
    "PluginError",
    "ShrinkPluginManager",
    "get_plugin_manager",
]

#: Entry-point group under which third-party plugins are published.
ENTRY_POINT_GROUP = "lightning_shrink"

#: Built-in plugin modules registered in every manager, by name. Module-level hook
#: implementations that need no configuration (export encoders, report rows) live here; the
#: configured parts of a technique are registered by its callback.
BUILTIN_PLUGINS: dict[str, str] = {
    "core": "lightning_shrink._core",
    "int8": "lightning_shrink.quantization.hooks",
    "pruning-export": "lightning_shrink.pruning.export",
}

#: Built-in plugins that cannot be blocked.
ESSENTIAL_PLUGINS: tuple[str, ...] = ("core",)

ENV_DISABLE_AUTOLOAD = "LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "LIGHTNING_SHRINK_BLOCK_PLUGINS"
ENV_TRACE = "LIGHTNING_SHRINK_TRACE"

_TRUTHY = {"1", "true", "yes", "on"}


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered.

    The message names the plugin and, for entry-point plugins, its distribution.

    Attributes:
        plugin_name: The plugin's registration name.
        distribution: ``"name version"`` of the distribution that provides it, if known.
    """

    def __init__(self, message: str, plugin_name: str | None = None, distribution: str | None = None) -> None:
        super().__init__(message)
        self.plugin_name = plugin_name
        self.distribution = distribution


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _distribution_label(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"


class ShrinkPluginManager(pluggy.PluginManager):
    """The lightning-shrink plugin manager.

    Adds to :class:`pluggy.PluginManager`: the hook specifications of
    :mod:`lightning_shrink.hookspecs`, registration of the built-in plugins, loading of the
    ``lightning_shrink`` entry-point group, blocking by name, tracing, and errors that name the
    broken plugin.

    Args:
        block_plugins: Names of plugins not to register (entry-point or built-in). Essential
            built-ins cannot be blocked. ``LIGHTNING_SHRINK_BLOCK_PLUGINS`` adds to this list.
        autoload: Load entry-point plugins. ``None`` (default) loads them unless
            ``LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD`` is set.
        trace: Print every hook call to standard error. ``None`` (default) reads
            ``LIGHTNING_SHRINK_TRACE``.
    """

    def __init__(
        self,
        block_plugins: Iterable[str] = (),
        autoload: bool | None = None,
        trace: bool | None = None,
    ) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        # Historic: every plugin registered from now on receives the call, like pytest_addhooks.
        self.hook.shrink_addhooks.call_historic(kwargs=dict(pluginmanager=self))
        self._distributions: dict[str, str] = {}
        self.autoload = (not _env_flag(ENV_DISABLE_AUTOLOAD)) if autoload is None else autoload
        for name in [*block_plugins, *_env_list(ENV_BLOCK)]:
            self.block(name)
        self._undo_tracing = None
        if _env_flag(ENV_TRACE) if trace is None else trace:
            self.enable_tracing()

    # ------------------------------------------------------------------ registration

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        """Also accept unmarked ``shrink_*`` callables, so a misspelled or unmarked hook is never
        silently ignored (it is then caught by :meth:`check_pending`)."""
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("shrink_"):
            method = getattr(plugin, name, None)
            if callable(method) and not isinstance(method, type):
                opts = {}
        return opts

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register ``plugin`` under ``name``.

        Returns the name, or ``None`` if the name is blocked. Raises :class:`PluginError` naming
        the plugin when it implements a hook with an argument that the hook does not have, or a
        hook in a way pluggy rejects.
        """
        try:
            registered = super().register(plugin, name)
        except PluginValidationError as exc:
            label = name or self.describe(plugin)
            # pluggy's message names an unnamed plugin by its id(): name it as the error does.
            problem = str(exc).replace(f"Plugin {self.get_canonical_name(plugin)!r}", "the plugin")
            raise self._plugin_error(label, problem) from exc
        if registered is not None:
            # Historic, like pytest_plugin_registered: plugins learn their own name from it.
            self.hook.shrink_plugin_registered.call_historic(
                kwargs=dict(plugin=plugin, plugin_name=registered, pluginmanager=self)
            )
        return registered

    @staticmethod
    def describe(plugin: Any) -> str:
        """A readable name for a plugin object: a module's name, or an instance's qualified class
        name (pluggy names unnamed instances by their ``id()``, which no one can read)."""
        if isinstance(plugin, types.ModuleType):
            return plugin.__name__
        cls = plugin if isinstance(plugin, type) else type(plugin)
        return f"{cls.__module__}.{cls.__qualname__}"

    def label(self, plugin_name: str) -> str:
        """``plugin_name``, or for a plugin registered without a name the :meth:`describe` of it."""
        plugin = self.get_plugin(plugin_name)
        if plugin is not None and plugin_name == str(id(plugin)):
            return f"{self.describe(plugin)} (registered without a name)"
        return plugin_name

    def block(self, name: str) -> None:
        """Block the plugin called ``name``; unregisters it if it is registered."""
        if name in ESSENTIAL_PLUGINS:
            raise PluginError(
                f"plugin {name!r} is essential to lightning-shrink and cannot be blocked "
                f"(essential plugins: {', '.join(ESSENTIAL_PLUGINS)})",
                plugin_name=name,
            )
        self.set_blocked(name)

    def register_builtins(self) -> None:
        """Import and register the modules of :data:`BUILTIN_PLUGINS` that are not blocked."""
        for name, module_name in BUILTIN_PLUGINS.items():
            if self.is_blocked(name) or self.has_plugin(name):
                continue
            module = importlib.import_module(module_name)
            self.register(module, name)

    def load_entrypoint_plugins(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Load and register every plugin of the entry-point ``group``.

        Does nothing when autoload is off. A plugin whose import fails raises
        :class:`PluginError` naming the plugin and its distribution: a plugin is never silently
        skipped. Returns the names registered.
        """
        if not self.autoload:
            return []
        loaded = []
        for ep in sorted(entry_points(group=group), key=lambda ep: ep.name):
            if self.is_blocked(ep.name) or self.has_plugin(ep.name):
                continue
            dist = _distribution_label(ep)
            if dist:
                self._distributions[ep.name] = dist
            try:
                plugin = ep.load()
            except Exception as exc:
                raise self._plugin_error(
                    ep.name, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(plugin, type):
                # An entry point may name a class for a stateful plugin: one instance per manager.
                try:
                    plugin = plugin()
                except Exception as exc:
                    raise self._plugin_error(
                        ep.name, f"could not instantiate {ep.value!r}: {type(exc).__name__}: {exc}"
                    ) from exc
            self.register(plugin, ep.name)
            loaded.append(ep.name)
        return loaded

    def check_pending(self) -> None:
        """Raise :class:`PluginError` for an implementation of a hook that does not exist, naming
        the plugin, its distribution and the closest existing hook names."""
        for name in self.hook.__dict__:
            if name.startswith("_"):
                continue
            hook = getattr(self.hook, name)
            if hook.has_spec():
                continue
            for impl in hook.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(name, self.hook_names(), n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise self._plugin_error(
                    self.label(impl.plugin_name),
                    f"implements unknown hook {name!r} (no hook specification of that name{hint})",
                )

    def hook_names(self) -> list[str]:
        """Names of all hooks that have a specification."""
        return sorted(
            name
            for name, caller in self.hook.__dict__.items()
            if not name.startswith("_") and caller.has_spec()
        )

    def distribution_of(self, plugin_name: str) -> str | None:
        """``"name version"`` of the distribution an entry-point plugin came from."""
        return self._distributions.get(plugin_name)

    def _plugin_error(self, plugin_name: str, problem: str) -> PluginError:
        dist = self._distributions.get(plugin_name)
        origin = f" (from distribution {dist})" if dist else ""
        return PluginError(
            f"lightning-shrink plugin {plugin_name!r}{origin}: {problem}",
            plugin_name=plugin_name,
            distribution=dist,
        )

    # ------------------------------------------------------------------ tracing

    def enable_tracing(self) -> Any:
        """Print every hook call and its result to standard error; returns an undo function."""

        def write(message: str) -> None:
            sys.stderr.write(f"[lightning-shrink] {message}")

        self.trace.root.setwriter(write)
        undo = super().enable_tracing()
        self._undo_tracing = undo
        return undo


def get_plugin_manager(
    plugins: Sequence[Any] = (),
    block_plugins: Iterable[str] = (),
    autoload: bool | None = None,
    trace: bool | None = None,
) -> ShrinkPluginManager:
    """Create a fully loaded plugin manager.

    Registers the built-in plugins, the entry-point plugins (unless autoload is off), then
    ``plugins``; finally checks that every implemented hook exists.

    Args:
        plugins: Extra plugin objects (modules, classes' instances) to register.
        block_plugins: Plugin names not to register.
        autoload: See :class:`ShrinkPluginManager`.
        trace: See :class:`ShrinkPluginManager`.
    """
    pm = ShrinkPluginManager(block_plugins=block_plugins, autoload=autoload, trace=trace)
    pm.register_builtins()
    pm.load_entrypoint_plugins()
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm
