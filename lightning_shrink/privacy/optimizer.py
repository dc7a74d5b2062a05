"""The Trainer's optimizer, wrapped in Opacus' ``DPOptimizer`` for DP-SGD.

Lightning calls ``optimizer.step(closure)``; the closure runs ``training_step``, the backward pass
and ``on_before_optimizer_step``, where the plugin clips, adds noise and accounts the step. The
wrapped optimizer then updates the parameters. A step pre-hook on the optimizer inside refuses
any update whose gradients the plugin did not privatize (a callback or module that steps it
directly), and under DDP the DP optimizer all-reduces the clipped, noised sums itself, so DDP's
own all-reduce of the raw gradients is replaced by :func:`skip_allreduce`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

from lightning_shrink.lightning import compat
from lightning_shrink.privacy.errors import PrivacyError

__all__ = [
    "LightningDPOptimizer",
    "LightningDistributedDPOptimizer",
    "StepGuard",
    "skip_allreduce",
    "wrap_optimizer",
]

_PREFIX = "DifferentialPrivacy"


class _StepAfterClosure:
    """``step(closure)``: run the closure (which privatizes the gradients), then the wrapped
    optimizer's own step. Clipping and noise are not repeated here: the plugin did them."""

    def step(self, closure: Any = None) -> Any:
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        self.original_optimizer.step()  # type: ignore[attr-defined]
        return result

    @property
    def accumulated_iterations(self) -> int:
        return 1  # gradient accumulation is refused at fit start


class LightningDPOptimizer(_StepAfterClosure, DPOptimizer):
    """Opacus' ``DPOptimizer`` stepped the way Lightning steps optimizers."""


class LightningDistributedDPOptimizer(_StepAfterClosure, DistributedDPOptimizer):
    """Opacus' ``DistributedDPOptimizer`` (noise on rank 0, all-reduced sums) stepped by Lightning."""


class StepGuard:
    """A step pre-hook on the wrapped optimizer: each update needs :meth:`allow_one` first."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._allowed = False
        self._handle = optimizer.register_step_pre_hook(self._check)

    def allow_one(self) -> None:
        """Let the next update through (the gradients are clipped and noised)."""
        self._allowed = True

    def _check(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._allowed:
            raise PrivacyError(
                f"{_PREFIX}: the optimizer was about to step with gradients that were not clipped and noised "
                "(the DP optimizer or the per-sample engine was bypassed); the step is refused"
            )
        self._allowed = False

    def remove(self) -> None:
        """Remove the pre-hook."""
        self._handle.remove()


def wrap_optimizer(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    loss_reduction: str,
) -> tuple[torch.optim.Optimizer, DPOptimizer]:
    """Wrap the Trainer's one optimizer in a DP optimizer and put it in the strategy's place.

    Returns ``(original, dp)``.

    Raises:
        PrivacyError: no optimizer, several, one that is already a DP optimizer or not a
            ``torch.optim.Optimizer``, trainable parameters it does not update, or tensors it updates
            that are not parameters of the LightningModule.
    """
    optimizers = list(trainer.optimizers)
    if not optimizers or any(compat.is_mock_optimizer(o) for o in optimizers):
        raise PrivacyError(
            f"{_PREFIX}: the LightningModule configures no optimizer; there is nothing to privatize"
        )
    if len(optimizers) != 1:
        raise PrivacyError(f"{_PREFIX}: {len(optimizers)} optimizers; DP-SGD wraps exactly one")
    original = optimizers[0]
    if isinstance(original, DPOptimizer) or not isinstance(original, torch.optim.Optimizer):
        raise PrivacyError(
            f"{_PREFIX}: cannot wrap optimizer {type(original).__name__}: a torch.optim.Optimizer that is "
            "not already a DP optimizer is needed"
        )
    in_optimizer = {id(p) for group in original.param_groups for p in group["params"]}
    trainable = {id(p): n for n, p in pl_module.named_parameters() if p.requires_grad}
    outside = [name for pid, name in trainable.items() if pid not in in_optimizer]
    foreign = [p for group in original.param_groups for p in group["params"] if id(p) not in trainable]
    if outside:
        raise PrivacyError(
            f"{_PREFIX}: trainable parameters {outside[:5]}{'...' if len(outside) > 5 else ''} are not in "
            "the optimizer; freeze them (requires_grad=False) or optimize them"
        )
    if any(p.requires_grad for p in foreign):
        raise PrivacyError(
            f"{_PREFIX}: the optimizer updates {len(foreign)} trainable tensor(s) that are not parameters of "
            "the LightningModule (a plugin's own parameter group, for instance); their per-sample gradients "
            "cannot be computed"
        )
    cls = LightningDistributedDPOptimizer if trainer.world_size > 1 else LightningDPOptimizer
    dp = cls(
        original,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
    )
    trainer.strategy.optimizers = [dp]
    return original, dp


def skip_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook that returns the bucket unreduced (the DP optimizer all-reduces)."""
    # No annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut
