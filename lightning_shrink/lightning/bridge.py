"""The bridge between Lightning and the hook system.

One :class:`ShrinkCallback` per Trainer owns the plugin manager and turns Lightning's events into
hook calls. Users rarely list it: the first technique callback
(:class:`~lightning_shrink.lightning.technique.TechniqueCallback`) adds one to the Trainer when none
is there. Listing it explicitly gives access to its options (extra plugins, blocking, autoload,
tracing, or a ready manager for tests).

How it reaches Lightning, beyond the ``Callback`` hooks:

* the loss seam on ``training_step`` (see :mod:`lightning_shrink.lightning.loss`), unless the module
  uses :class:`~lightning_shrink.ShrinkLossMixin`;
* :class:`~lightning_shrink.lightning.compat.StrategyInterception` on the Trainer's strategy, for the
  point after ``configure_model`` (``shrink_configure_model``) and the checkpoint as read
  (``shrink_load_checkpoint``);
* a step post-hook on each optimizer (``register_step_post_hook``, public torch API) for
  ``shrink_after_optimizer_step``.

All three are removed at teardown and when the run fails.
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

from lightning_shrink.lightning import compat
from lightning_shrink.lightning.loss import ShrinkLossMixin
from lightning_shrink.lightning.param_groups import PluginParamGroups
from lightning_shrink.lightning.technique import TechniqueCallback
from lightning_shrink.manager import PluginError, ShrinkPluginManager, get_plugin_manager

__all__ = ["CHECKPOINT_KEY", "ShrinkCallback"]

#: Key of the plugins' state in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_shrink"

# Marks the `training_step` wrapper of the loss seam in a LightningModule's `__dict__`.
_PATCH_MARK = "__lightning_shrink_patch__"

# Hooks the bridge calls once per implementation (to name the plugin in errors): no hook wrappers.
_PER_IMPLEMENTATION_HOOKS = ("shrink_optimizer_param_groups", "shrink_ddp_comm_hook")


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
        self._interception: compat.StrategyInterception | None = None
        self._stage: str | None = None
        self._param_groups = PluginParamGroups()
        self._mixin_calls = 0
        self._loss_plugins: list[str] = []

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
    def is_fitting(self) -> bool:
        """Whether a ``fit`` stage is set up and not torn down."""
        return self._stage == "fit"

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
        explicit = {cb.name for cb in techniques if cb.name is not None}
        counts: dict[str, int] = {}
        for cb in techniques:
            if pm.is_registered(cb.plugin):
                continue
            if cb.name is not None:
                name = cb.name
                if pm.has_plugin(name):
                    raise PluginError(
                        f"{type(cb).__name__}(name={name!r}): another plugin is registered under that name; "
                        "give every technique callback a unique `name`",
                        plugin_name=name,
                    )
            else:
                base = cb.plugin_name
                counts[base] = counts.get(base, 0) + 1
                name = base if counts[base] == 1 else f"{base}-{counts[base]}"
                while pm.has_plugin(name) or name in explicit:
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
        for hook_name in _PER_IMPLEMENTATION_HOOKS:
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    raise PluginError(
                        f"lightning-shrink plugin {pm.label(impl.plugin_name)!r}: {hook_name} cannot be "
                        "implemented as a hook wrapper",
                        plugin_name=impl.plugin_name,
                    )
        _log_registered(pm)
        return pm

    def _call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook_name`` on its own, in pluggy's order, through the
        manager (so tracing and recorders see the calls); returns ``(plugin name, result)`` pairs."""
        pm = self.pluginmanager
        impls = list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))
        firstresult = bool(getattr(pm.hook, hook_name).spec.opts.get("firstresult"))
        results = []
        for impl in impls:
            others = [other.plugin for other in impls if other.plugin is not impl.plugin]
            result = pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
            if not firstresult:
                result = result[0] if result else None
            results.append((pm.label(impl.plugin_name), result))
        return results

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.find(trainer)  # raises if several bridges are listed
        stage = _stage_name(stage)
        if (
            self._stage == stage
            and self._interception is not None
            and self._interception.strategy is trainer.strategy
            and not self._interception.fired
        ):
            return  # already set up in this round (see TechniqueCallback.setup)
        self._trainer_ref = weakref.ref(trainer)
        self._stage = stage
        pm = self._build_manager(trainer)
        self._loss_plugins = sorted(
            {
                pm.label(impl.plugin_name)
                for impl in pm.hook.shrink_training_loss.get_hookimpls()
                + pm.hook.shrink_loss_weight.get_hookimpls()
            }
        )
        if stage == "fit" and not pl_module.automatic_optimization and self._loss_plugins:
            raise PluginError(
                f"plugins {self._loss_plugins} add loss terms, which needs automatic optimization; "
                f"{type(pl_module).__name__} sets `automatic_optimization = False`"
            )
        pm.hook.shrink_setup(trainer=trainer, pl_module=pl_module, stage=stage)
        self._remove_interception()
        self._interception = compat.StrategyInterception(
            trainer.strategy,
            on_model_configured=lambda: self._configure_model(trainer, stage),
            on_checkpoint=lambda checkpoint: self._checkpoint_read(trainer, checkpoint),
        )
        if stage == "fit" and not isinstance(pl_module, ShrinkLossMixin):
            self._patch_training_step(pl_module)

    def _configure_model(self, trainer: pl.Trainer, stage: str) -> None:
        self.hook.shrink_configure_model(trainer=trainer, pl_module=trainer.lightning_module, stage=stage)

    def _checkpoint_read(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        self.hook.shrink_load_checkpoint(
            trainer=trainer, pl_module=trainer.lightning_module, checkpoint=checkpoint
        )

    # ------------------------------------------------------------------ fit

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._param_groups = PluginParamGroups()
        groups = self._call_each("shrink_optimizer_param_groups", trainer=trainer, pl_module=pl_module)
        self._param_groups.add(compat.optimizer_of(trainer), trainer.lr_scheduler_configs, groups)
        self.hook.shrink_fit_start(trainer=trainer, pl_module=pl_module)
        self._register_comm_hook(trainer, pl_module)
        self._remove_step_hooks()
        for optimizer in trainer.optimizers:
            target = compat.unwrap_optimizer(optimizer)
            # Optimizer wrappers (Opacus' DPOptimizer) step the optimizer they wrap.
            while hasattr(target, "original_optimizer"):
                target = target.original_optimizer
            handle = target.register_step_post_hook(self._make_step_post_hook(optimizer))
            self._step_hook_handles.append(handle)
        self._mixin_calls = 0

    def _register_comm_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return
        supplied = [
            (name, result)
            for name, result in self._call_each("shrink_ddp_comm_hook", trainer=trainer, pl_module=pl_module)
            if result is not None
        ]
        if not supplied:
            return
        names = [name for name, _ in supplied]
        if len(supplied) > 1:
            raise PluginError(
                f"plugins {names} each supply a DDP communication hook, and DDP takes one: remove one of "
                "them from the Trainer",
                plugin_name=names[1],
            )
        own = compat.ddp_comm_hook_of(trainer.strategy)
        if own is not None:
            raise PluginError(
                f"lightning-shrink plugin {names[0]!r} supplies the DDP communication hook, but the strategy "
                f"registers its own ({getattr(own, '__name__', own)!r}, DDPStrategy(ddp_comm_hook=...)); DDP "
                "takes one: remove one of them",
                plugin_name=names[0],
            )
        state, hook = supplied[0][1]
        model.register_comm_hook(state, hook)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook.shrink_train_epoch_start(trainer=trainer, pl_module=pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._mixin_calls = 0
        self.hook.shrink_train_batch_start(
            trainer=trainer, pl_module=pl_module, batch=batch, batch_idx=batch_idx
        )

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook.shrink_after_backward(trainer=trainer, pl_module=pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._param_groups.average_gradients()
        self.hook.shrink_before_optimizer_step(trainer=trainer, pl_module=pl_module, optimizer=optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mixin = isinstance(pl_module, ShrinkLossMixin)
        if mixin and self._loss_plugins and outputs is not None and self._mixin_calls == 0:
            raise PluginError(
                f"{type(pl_module).__name__} uses ShrinkLossMixin, but its training_step did not return "
                f"self.shrink_loss(loss, batch, batch_idx): the loss terms of {self._loss_plugins} would "
                "be missing from the loss",
                plugin_name=self._loss_plugins[0],
            )
        metrics = _merge(self.hook.shrink_metrics(trainer=trainer, pl_module=pl_module), "shrink_metrics")
        bar = _merge(
            self.hook.shrink_progress_bar_metrics(trainer=trainer, pl_module=pl_module),
            "shrink_progress_bar_metrics",
        )
        # Without a logger, values still reach `trainer.callback_metrics` (logger=False avoids
        # Lightning's "no logger configured" warning for every key). A key in both results is
        # logged once, to both.
        has_logger = bool(trainer.loggers)
        for values, to_logger, prog_bar in (
            ({k: v for k, v in metrics.items() if k not in bar}, has_logger, False),
            ({k: metrics[k] for k in bar if k in metrics}, has_logger, True),
            ({k: v for k, v in bar.items() if k not in metrics}, False, True),
        ):
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False, logger=to_logger, prog_bar=prog_bar)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook.shrink_train_epoch_end(trainer=trainer, pl_module=pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_step_hooks()
        self.hook.shrink_fit_end(trainer=trainer, pl_module=pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        self._remove_interception()
        self._unpatch_training_step(pl_module)
        self._stage = None
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

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state: dict[str, Any] = {}
        self.hook.shrink_save_state(trainer=trainer, pl_module=pl_module, state=state)
        checkpoint[CHECKPOINT_KEY] = state
        self.hook.shrink_save_checkpoint(trainer=trainer, pl_module=pl_module, checkpoint=checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.hook.shrink_load_state(
            trainer=trainer, pl_module=pl_module, state=checkpoint.get(CHECKPOINT_KEY, {})
        )

    # ------------------------------------------------------------------ the loss seam

    def _patch_training_step(self, pl_module: pl.LightningModule) -> None:
        current = pl_module.__dict__.get("training_step")
        if getattr(current, _PATCH_MARK, None) is self:
            return
        self._unpatch_training_step(pl_module)  # a patch left by another bridge (another Trainer)
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if output is None:
                return None
            batch = args[0] if args else kwargs.get("batch")
            batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
            if isinstance(output, Mapping):
                output = dict(output)
                output["loss"] = self.add_loss_terms(output["loss"], batch, batch_idx)
                return output
            return self.add_loss_terms(output, batch, batch_idx)

        setattr(training_step, _PATCH_MARK, self)
        # An instance attribute shadows the class's method; removing it restores the model.
        pl_module.__dict__["training_step"] = training_step

    @staticmethod
    def _unpatch_training_step(pl_module: pl.LightningModule) -> None:
        if getattr(pl_module.__dict__.get("training_step"), _PATCH_MARK, None) is not None:
            del pl_module.__dict__["training_step"]

    def add_loss_terms(
        self, loss: torch.Tensor, batch: Any, batch_idx: int, from_mixin: bool = False
    ) -> torch.Tensor:
        """``weight * loss + sum(terms)`` from ``shrink_loss_weight`` and ``shrink_training_loss``;
        logs each term, the task loss and the weight."""
        if from_mixin:
            self._mixin_calls += 1
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        pl_module = trainer.lightning_module if trainer is not None else None
        weight = 1.0
        for w in self.hook.shrink_loss_weight(trainer=trainer, pl_module=pl_module):
            if w is not None:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
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
        if pl_module is not None and trainer is not None:
            logged = {name: term.detach() for name, term in terms.items()}
            logged["shrink/task_loss"] = loss.detach()
            logged["shrink/task_loss_weight"] = weight
            pl_module.log_dict(
                logged, on_step=True, on_epoch=False, logger=bool(trainer.loggers), prog_bar=False
            )
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

    def _remove_interception(self) -> None:
        if self._interception is not None:
            self._interception.remove()
            self._interception = None

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer with its callbacks into the workers: the manager (which may
        # hold tracing writers and hook handles) is rebuilt there in `setup`.
        state = self.__dict__.copy()
        state["_step_hook_handles"] = []
        state["_trainer_ref"] = None
        state["_interception"] = None
        state["_param_groups"] = PluginParamGroups()
        state["_stage"] = None
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
    names = sorted(pm.label(name) for name, _ in pm.list_name_plugin())
    rank_zero_info(f"lightning-shrink plugins: {', '.join(names)}")
