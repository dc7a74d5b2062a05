"""Every access to Lightning's internals, in one place.

lightning-shrink talks to Lightning through its public API (``Callback`` hooks, ``Trainer``
properties, the strategy's ``optimizers`` setter) except for what is in this module. Each function
says which private name it reads or which object it wraps, and why no public API does it. They are
tested against the Lightning versions in :data:`TESTED_LIGHTNING` (``pyproject.toml`` bounds the
dependency to them); when Lightning changes one of these internals, this module is the one place to
update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch

__all__ = [
    "TESTED_LIGHTNING",
    "StrategyInterception",
    "ddp_comm_hook_of",
    "is_mock_optimizer",
    "load_train_dataloaders",
    "optimizer_of",
    "replace_train_dataloaders",
    "strategy_kind",
    "unwrap_optimizer",
]

#: The Lightning releases the test suite runs against: CI installs the newest allowed (2.6.6, the whole
#: suite); 2.6.0 ran the bridge, hook, technique and export tests and the multi-process ones, 2.6.1,
#: 2.6.4 and 2.6.5 the single-process ones. 2.6.2 and 2.6.3 are excluded (compromised releases).
TESTED_LIGHTNING = ("2.6.0", "2.6.1", "2.6.4", "2.6.5", "2.6.6")


def is_mock_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is the placeholder Lightning installs when ``configure_optimizers``
    returns ``None``.

    Reads ``lightning.pytorch.core.optimizer._MockOptimizer`` (private; Lightning 2.x has no public
    way to tell "no optimizer configured").
    """
    from lightning.pytorch.core.optimizer import _MockOptimizer

    return isinstance(optimizer, _MockOptimizer)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside a ``LightningOptimizer`` (the object ``training_step``
    and ``on_before_optimizer_step`` receive), or ``optimizer`` itself.

    Uses the public ``LightningOptimizer.optimizer`` property (which returns the private
    ``_optimizer``).
    """
    from lightning.pytorch.core.optimizer import LightningOptimizer

    if isinstance(optimizer, LightningOptimizer):
        return optimizer.optimizer
    return optimizer


def strategy_kind(strategy: Any) -> str:
    """What kind of strategy ``strategy`` is, by exact type.

    ``"single_device"``, ``"ddp"``, ``"ddp_spawn"`` or ``"ddp_fork"`` (``DDPStrategy`` started by
    spawning or forking: reads the private ``DDPStrategy._start_method``; the public ``launcher`` is
    created only during set-up),
    ``"model_parallel"`` (FSDP2/tensor parallel), ``"fsdp"`` (Lightning's FSDP1), ``"deepspeed"``,
    or ``"other"``. Exact types, not ``isinstance``: a subclass may change how gradients or optimizers
    are handled, so techniques that must take over the optimizer treat it as ``"other"``.
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    kind = type(strategy)
    if kind is SingleDeviceStrategy:
        return "single_device"
    if kind is DDPStrategy:
        start = getattr(strategy, "_start_method", "popen")
        return {"popen": "ddp", "spawn": "ddp_spawn"}.get(start, "ddp_fork")
    if kind is ModelParallelStrategy:
        return "model_parallel"
    if kind is FSDPStrategy:
        return "fsdp"
    if kind is DeepSpeedStrategy:
        return "deepspeed"
    return "other"


def ddp_comm_hook_of(strategy: Any) -> Callable[..., Any] | None:
    """The communication hook a ``DDPStrategy`` registers itself (``DDPStrategy(ddp_comm_hook=...)``).

    Reads the private ``DDPStrategy._ddp_comm_hook`` (no public accessor).
    """
    return getattr(strategy, "_ddp_comm_hook", None)


def load_train_dataloaders(trainer: pl.Trainer) -> list[Any] | None:
    """Create the training dataloaders now (Lightning creates them when the fit loop starts, after
    ``on_fit_start``) and return them, or ``None`` when there are none.

    Calls the fit loop's ``setup_data()`` (public; the loop's own call then returns early because
    the data are loaded) and reads the private ``fit_loop._combined_loader``.
    """
    fit_loop = trainer.fit_loop
    fit_loop.setup_data()
    combined = fit_loop._combined_loader
    if combined is None:
        return None
    return list(combined.flattened)


def replace_train_dataloaders(trainer: pl.Trainer, loaders: list[Any]) -> None:
    """Put ``loaders`` in place of the fit loop's training dataloaders (after
    :func:`load_train_dataloaders`) and re-create the loop's batch iterator over them.

    Uses the public ``CombinedLoader.flattened`` setter on the private ``fit_loop._combined_loader``
    and re-creates the iterator of the private ``fit_loop._data_fetcher``.
    """
    fit_loop = trainer.fit_loop
    fit_loop._combined_loader.flattened = loaders
    iter(fit_loop._data_fetcher)


class StrategyInterception:
    """Finds the point after ``configure_model`` and the moment a checkpoint has been read.

    Lightning 2.6 offers callbacks no hook between ``configure_model`` and the strategy's set-up
    (which wraps the model in DDP/FSDP and calls ``configure_optimizers``), nor between reading a
    ``ckpt_path`` and loading its weights. The Trainer runs, in this order: ``setup`` hooks,
    ``configure_model``, then *either* ``strategy.load_checkpoint`` (restore before set-up: most
    strategies) *or* ``strategy.setup`` (FSDP, ``ModelParallelStrategy``, DeepSpeed restore after it).

    This object wraps the two methods of one strategy **instance** (an attribute in the instance's
    ``__dict__`` shadows the class's method; the class is never changed) for one stage:

    * the first call of either runs ``on_model_configured`` once, before the method;
    * every ``load_checkpoint`` passes the checkpoint it read to ``on_checkpoint`` before returning
      it, i.e. before Lightning loads its weights.

    :meth:`remove` restores the strategy (the bridge calls it at teardown and on exceptions).
    Tested with the strategies in the test suite: single device, ``ddp``, ``ddp_spawn`` (where it is
    installed in the worker process) and ``ModelParallelStrategy``.
    """

    _WRAPPED = ("load_checkpoint", "setup")

    def __init__(
        self,
        strategy: Any,
        on_model_configured: Callable[[], None],
        on_checkpoint: Callable[[Any], None],
    ) -> None:
        self.strategy = strategy
        self._on_model_configured = on_model_configured
        self._on_checkpoint = on_checkpoint
        self.fired = False
        self.remove()
        for name in self._WRAPPED:
            strategy.__dict__[name] = self._wrap(name, getattr(strategy, name))

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            self._on_model_configured()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._fire()
            result = original(*args, **kwargs)
            if name == "load_checkpoint" and isinstance(result, dict):
                self._on_checkpoint(result)
            return result

        wrapper.__lightning_shrink_interception__ = self  # type: ignore[attr-defined]
        return wrapper

    def remove(self) -> None:
        """Restore the strategy's own methods (also those of an earlier, unremoved interception)."""
        for name in self._WRAPPED:
            current = self.strategy.__dict__.get(name)
            if getattr(current, "__lightning_shrink_interception__", None) is not None:
                del self.strategy.__dict__[name]

    def __getstate__(self) -> dict[str, Any]:  # pragma: no cover - never pickled in practice
        raise TypeError("StrategyInterception is per process and cannot be pickled")


def optimizer_of(trainer: pl.Trainer, index: int = 0) -> torch.optim.Optimizer | None:
    """The ``index``-th optimizer of the Trainer's strategy as a ``torch.optim.Optimizer``, or
    ``None`` when ``configure_optimizers`` configured none (public ``trainer.optimizers``, unwrapped by
    :func:`unwrap_optimizer`; the placeholder is recognised by :func:`is_mock_optimizer`)."""
    optimizers = trainer.optimizers
    if len(optimizers) <= index or is_mock_optimizer(optimizers[index]):
        return None
    return unwrap_optimizer(optimizers[index])
