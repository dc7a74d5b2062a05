"""The base classes of the technique callbacks and their plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_shrink.hookspecs import hookimpl

if TYPE_CHECKING:
    from lightning_shrink.manager import ShrinkPluginManager

__all__ = ["TechniqueCallback", "TechniquePlugin"]


class TechniquePlugin:
    """Base of the technique plugins: a validated configuration, and the name the plugin is
    registered under (learned from ``shrink_plugin_registered``).

    The name is the namespace of everything the plugin writes: metrics (:meth:`key`), progress-bar
    keys, its checkpoint state and its report rows. Until it is registered, the name is the
    technique's default name.

    Args:
        config: The technique's configuration (its callback).
    """

    #: The name used before registration (the technique's default plugin name).
    default_name: ClassVar[str] = "technique"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.name: str = self.default_name
        self.pluginmanager: ShrinkPluginManager | None = None

    @hookimpl
    def shrink_plugin_registered(
        self, plugin: Any, plugin_name: str, pluginmanager: ShrinkPluginManager
    ) -> None:
        if plugin is self:
            # pluggy names a plugin registered without a name by its id(): keep the default then.
            self.name = self.default_name if plugin_name == str(id(self)) else plugin_name
            self.pluginmanager = pluginmanager

    def key(self, metric: str) -> str:
        """``"<registered name>/<metric>"``: the name of a metric, progress-bar value or loss term."""
        return f"{self.name}/{metric}"

    def peers(self) -> list[TechniquePlugin]:
        """The other registered plugins of the same class (other instances of this technique)."""
        if self.pluginmanager is None:
            return []
        return [p for p in self.pluginmanager.get_plugins() if type(p) is type(self) and p is not self]

    def technique_registered(self, default_name: str) -> bool:
        """Whether a plugin of the technique ``default_name`` (``"privacy"``, ``"distillation"``, ...)
        is registered beside this one."""
        if self.pluginmanager is None:
            return False
        plugins = self.pluginmanager.get_plugins()
        return any(getattr(type(p), "default_name", None) == default_name for p in plugins)


class TechniqueCallback(Callback):
    """Base class of the technique callbacks: a validated configuration plus a plugin.

    Subclasses validate their arguments in ``__init__`` (so bad input fails at construction) and
    return their plugin from :meth:`make_plugin`. They implement no Lightning hook beyond ``setup``:
    the bridge (:class:`~lightning_shrink.ShrinkCallback`) calls the plugin's hooks, so the order of
    the Trainer's callback list does not matter.

    Args:
        name: The name to register the plugin under; ``None``: :attr:`plugin_name`, suffixed
            ``-2``, ``-3``... for further instances of the same technique in one Trainer (in the order
            of the callback list). Metrics, progress-bar keys, checkpoint state and report rows are
            namespaced by it, so a resumed run must use the same names.
    """

    #: Default name of the plugin in the manager.
    plugin_name: ClassVar[str] = "technique"

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"{type(self).__name__}: `name` must be a str or None, got {name!r}")
            if not name or "/" in name or name != name.strip():
                raise ValueError(
                    f"{type(self).__name__}: `name` must be a non-empty name without '/' or surrounding "
                    f"spaces, got {name!r}"
                )
        self.name = name
        self._plugin: Any = None

    @property
    def plugin(self) -> Any:
        """The plugin object this callback registers (created once, on first access)."""
        if self._plugin is None:
            self._plugin = self.make_plugin()
        return self._plugin

    def make_plugin(self) -> Any:
        """Return the plugin object that implements this technique's hooks."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_plugin()")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The bridge registers every technique callback's plugin in its `setup`. Without a bridge in
        # the callback list, add one and set it up now: its `setup` is idempotent within a stage, so
        # it does not matter whether Lightning also calls it for this round (it iterates the live
        # callback list in 2.6) or not.
        from lightning_shrink.lightning.bridge import ShrinkCallback

        bridge = ShrinkCallback.find(trainer)
        if bridge is None:
            bridge = ShrinkCallback()
            trainer.callbacks.append(bridge)
        bridge.setup(trainer, pl_module, stage)
