"""The bridge between Lightning and the hook system.

One :class:`ShrinkCallback` per Trainer owns the plugin manager and turns Lightning's events into
hook calls. Users rarely list it: the first technique callback (:class:`TechniqueCallback`) adds
one to the Trainer when none is there. Listing it explicitly gives access to its options
(extra plugins, blocking, autoload, tracing, or a ready manager for tests).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_shrink.manager import PluginError, ShrinkPluginManager, get_plugin_manager

__all__ = ["CHECKPOINT_KEY", "ShrinkCallback", "TechniqueCallback"]

#: Key of the plugins' state in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_shrink"

# Name of the attribute marking the methods the bridge patched on a LightningModule instance.
_PATCH_MARK = "__lightning_shrink_patch__"


class TechniqueCallback(Callback):
    """Base class of the technique callbacks: a validated configuration plus a plugin.

    Subclasses validate their arguments in ``__init__`` (so bad input fails at construction) and
    return their plugin from :meth:`make_plugin`. They implement no Lightning hook beyond
    ``setup``: the bridge calls the plugin's hooks, so the order of the Trainer's callback list does
    not matter.
    """

    #: Name of the plugin in the manager (suffixed ``-2``, ``-3``... for further instances).
    plugin_name: str = "technique"

    def __init__(self) -> None:
        super().__init__()
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
        # The bridge registers every technique callback's plugin in its own `setup`. If the user
        # did not list a bridge, add one at the end of the callback list: Lightning iterates the
        # live list, so its `setup` runs in this same round, after every technique's.
        if ShrinkCallback.find(trainer) is None:
            trainer.callbacks.append(ShrinkCallback())


class ShrinkCallback(Callback):
    """Owns a Trainer's plugin manager and calls the hooks of :mod:`lightning_shrink.hookspecs`.

    Args:
        plugins: Extra plugin objects to register (modules or instances with hook
            implementations), in addition to the built-ins, entry-point plugins and the
            technique callbacks' plugins.
        block_plugins: Plugin names not to register. Blocking the plugin of a technique callback
            that is in the Trainer is an error (it would silently do nothing).
        autoload: Load entry-point plugins; ``None`` reads
            ``LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD``.
        trace: Print every hook call to standard error; ``None`` reads ``LIGHTNING_SHRINK_TRACE``.
        pluginmanager: Use this manager instead of creating one (the pytest fixtures use it to
            record hook calls). ``block_plugins``, ``autoload`` and ``trace`` must then be left
            at their defaults.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(target_sparsity=0.8)])
        # equivalent, with options:
        trainer = Trainer(callbacks=[ShrinkCallback(plugins=[my_plugin]), GradualMagnitudePruning(0.8)])
    """

    def __init__(
        self,
        plugins: Sequence[Any] = (),
        block_plugins: Iterable[str] = (),
        autoload: bool | None = None,
        trace: bool | None = None,
        pluginmanager: ShrinkPluginManager | None = None,
    ) -> None:
        super().__init__()
        self._plugins = list(plugins)
        self._block_plugins = list(block_plugins)
        if pluginmanager is not None and (self._block_plugins or autoload is not None or trace is not None):
            raise ValueError(
                "ShrinkCallback: `block_plugins`, `autoload` and `trace` configure a new manager; "
                "they cannot be combined with `pluginmanager=`"
            )
        self._autoload = autoload
        self._trace = trace
        self._pm: ShrinkPluginManager | None = pluginmanager
        self._step_hook_handles: list[Any] = []
        self._trainer_ref: weakref.ReferenceType[pl.Trainer] | None = None

    # ------------------------------------------------------------------ discovery

    @staticmethod
    def find(trainer: pl.Trainer) -> ShrinkCallback | None:
        """The trainer's bridge, or ``None``."""
        bridges = [cb for cb in trainer.callbacks if isinstance(cb, ShrinkCallback)]
        if len(bridges) > 1:
            raise ValueError(
                f"the Trainer has {len(bridges)} ShrinkCallback instances; list at most one "
                "(technique callbacks share one plugin manager)"
            )
        return bridges[0] if bridges else None

    @property
    def pluginmanager(self) -> ShrinkPluginManager:
        """The plugin manager (created in ``setup`` if not given)."""
        if self._pm is None:
            raise RuntimeError("the plugin manager is created in `setup`; the Trainer has not run yet")
        return self._pm

    @property
    def hook(self) -> Any:
        """Shortcut for ``self.pluginmanager.hook``."""
        return self.pluginmanager.hook

    @property
    @override
    def state_key(self) -> str:
        return "ShrinkCallback"

    # ------------------------------------------------------------------ manager set-up

    def _build_manager(self, trainer: pl.Trainer) -> ShrinkPluginManager:
        techniques = [cb for cb in trainer.callbacks if isinstance(cb, TechniqueCallback)]
        if self._pm is None:
            self._pm = get_plugin_manager(
                plugins=self._plugins,
                block_plugins=self._block_plugins,
                autoload=self._autoload,
                trace=self._trace,
            )
        else:
            pm = self._pm
            pm.register_builtins()
            pm.load_entrypoint_plugins()
            for plugin in self._plugins:
                if not pm.is_registered(plugin):
                    pm.register(plugin)
        pm = self._pm
        counts: dict[str, int] = {}
        for cb in techniques:
            if pm.is_registered(cb.plugin):
                continue
            base = cb.plugin_name
            counts[base] = counts.get(base, 0) + 1
            name = base if counts[base] == 1 else f"{base}-{counts[base]}"
            while pm.has_plugin(name):
                counts[base] += 1
                name = f"{base}-{counts[base]}"
            if pm.is_blocked(name):
                raise PluginError(
                    f"plugin {name!r} of {type(cb).__name__} is blocked, but the callback is in the "
                    f"Trainer: remove {type(cb).__name__} from `callbacks` or unblock {name!r}",
                    plugin_name=name,
                )
            pm.register(cb.plugin, name)
        pm.check_pending()
        _log_registered(pm)
        return pm

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.find(trainer)  # raises if several bridges are listed
        stage = _stage_name(stage)
        self._trainer_ref = weakref.ref(trainer)
        pm = self._build_manager(trainer)
        if stage == "fit" and not pl_module.automatic_optimization:
            users = pm.hook.shrink_training_loss.get_hookimpls() + pm.hook.shrink_loss_weight.get_hookimpls()
            if users:
                names = sorted({impl.plugin_name for impl in users})
                raise PluginError(
                    f"plugins {names} add loss terms, which needs automatic optimization; "
                    f"{type(pl_module).__name__} sets `automatic_optimization = False`"
                )
        pm.hook.shrink_setup(trainer=trainer, pl_module=pl_module, stage=stage)
        self._patch(pl_module, "on_load_checkpoint", self._wrap_on_load_checkpoint)
        if stage == "fit":
            self._patch(pl_module, "training_step", self._wrap_training_step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook.shrink_fit_start(trainer=trainer, pl_module=pl_module)
        self._remove_step_hooks()
        for optimizer in trainer.optimizers:
            target = optimizer
            # Optimizer wrappers (Opacus' DPOptimizer) step the optimizer they wrap.
            while hasattr(target, "original_optimizer"):
                target = target.original_optimizer
            handle = target.register_step_post_hook(self._make_step_post_hook(optimizer))
            self._step_hook_handles.append(handle)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.hook.shrink_train_batch_start(
            trainer=trainer, pl_module=pl_module, batch=batch, batch_idx=batch_idx
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.hook.shrink_before_optimizer_step(trainer=trainer, pl_module=pl_module, optimizer=optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = _merge(self.hook.shrink_metrics(trainer=trainer, pl_module=pl_module), "shrink_metrics")
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False)
        bar = _merge(
            self.hook.shrink_progress_bar_metrics(trainer=trainer, pl_module=pl_module),
            "shrink_progress_bar_metrics",
        )
        if bar:
            pl_module.log_dict(bar, on_step=True, on_epoch=False, logger=False, prog_bar=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_step_hooks()
        self.hook.shrink_fit_end(trainer=trainer, pl_module=pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        self._unpatch(pl_module, "training_step")
        self._unpatch(pl_module, "on_load_checkpoint")
        if self._pm is not None:
            self.hook.shrink_teardown(trainer=trainer, pl_module=pl_module, stage=_stage_name(stage))

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips `teardown` callbacks when a run fails: release everything here so the
        # model is left plain and plugins can clean up.
        stage = trainer.state.fn
        if stage is not None:
            self.teardown(trainer, pl_module, stage)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state: dict[str, Any] = {}
        self.hook.shrink_save_state(trainer=trainer, pl_module=pl_module, state=state)
        checkpoint[CHECKPOINT_KEY] = state

    # ------------------------------------------------------------------ patches

    def _patch(self, pl_module: pl.LightningModule, name: str, make_wrapper: Any) -> None:
        current = getattr(pl_module, name)
        if getattr(current, _PATCH_MARK, None) is self:
            return
        self._unpatch(pl_module, name)  # a patch left by another bridge (another Trainer)
        wrapper = make_wrapper(getattr(pl_module, name))
        setattr(wrapper, _PATCH_MARK, self)
        # An instance attribute shadows the class's method; removing it restores the model.
        pl_module.__dict__[name] = wrapper

    @staticmethod
    def _unpatch(pl_module: pl.LightningModule, name: str) -> None:
        if getattr(pl_module.__dict__.get(name), _PATCH_MARK, None) is not None:
            del pl_module.__dict__[name]

    def _wrap_on_load_checkpoint(self, original: Any) -> Any:
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            # Lightning calls this right before the checkpoint's weights are loaded.
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            pl_module = original.__self__
            self.hook.shrink_load_state(
                trainer=trainer, pl_module=pl_module, state=checkpoint.get(CHECKPOINT_KEY, {})
            )
            original(checkpoint)

        return on_load_checkpoint

    def _wrap_training_step(self, original: Any) -> Any:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if output is None:
                return None
            batch = args[0] if args else kwargs.get("batch")
            batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
            if isinstance(output, Mapping):
                output = dict(output)
                output["loss"] = self._add_loss_terms(output["loss"], batch, batch_idx)
                return output
            return self._add_loss_terms(output, batch, batch_idx)

        return training_step

    def _add_loss_terms(self, loss: torch.Tensor, batch: Any, batch_idx: int) -> torch.Tensor:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        pl_module = trainer.lightning_module if trainer is not None else None
        weight = 1.0
        for w in self.hook.shrink_loss_weight(trainer=trainer, pl_module=pl_module):
            if w is not None:
                if not isinstance(w, (int, float)) or not math.isfinite(w):
                    raise TypeError(f"shrink_loss_weight must return a finite float or None, got {w!r}")
                weight *= float(w)
        terms = _merge(
            self.hook.shrink_training_loss(
                trainer=trainer, pl_module=pl_module, loss=loss, batch=batch, batch_idx=batch_idx
            ),
            "shrink_training_loss",
        )
        if weight == 1.0 and not terms:
            return loss
        total = loss * weight if weight != 1.0 else loss
        for name, term in terms.items():
            if not isinstance(term, torch.Tensor) or term.numel() != 1:
                raise TypeError(f"shrink_training_loss term {name!r} must be a scalar tensor, got {term!r}")
            total = total + term.reshape(())
        if pl_module is not None:
            logged = {f"shrink/{name}": term.detach() for name, term in terms.items()}
            logged["shrink/task_loss"] = loss.detach()
            pl_module.log_dict(logged, on_step=True, on_epoch=False, logger=True, prog_bar=False)
        return total

    # ------------------------------------------------------------------ optimizer step hooks

    def _make_step_post_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        def step_post_hook(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            if trainer is None:
                return
            self.hook.shrink_after_optimizer_step(
                trainer=trainer, pl_module=trainer.lightning_module, optimizer=optimizer
            )

        return step_post_hook

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hook_handles:
            handle.remove()
        self._step_hook_handles.clear()

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer with its callbacks into the workers: the manager (which may
        # hold tracing writers and hook handles) is rebuilt there in `setup`.
        state = self.__dict__.copy()
        state["_step_hook_handles"] = []
        state["_trainer_ref"] = None
        return state


def _stage_name(stage: Any) -> str:
    # Lightning passes a `TrainerFn` (a str enum); hooks get the plain string.
    return str(getattr(stage, "value", stage))


def _merge(results: Iterable[Mapping[str, Any] | None], hook_name: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for result in results:
        for key, value in (result or {}).items():
            if key in merged:
                raise ValueError(f"two plugins returned {key!r} from {hook_name}; names must be unique")
            merged[key] = value
    return merged


def _log_registered(pm: ShrinkPluginManager) -> None:
    names = sorted(name for name, _ in pm.list_name_plugin())
    rank_zero_info(f"lightning-shrink plugins: {', '.join(names)}")
