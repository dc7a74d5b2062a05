"""The DP-SGD plugin behind :class:`lightning_shrink.DifferentialPrivacy` (imports Opacus).

At ``shrink_fit_start`` (optimizers exist, the model is wrapped, no step ran) it checks the run
(:mod:`~lightning_shrink.privacy.checks`), takes over the training data
(:mod:`~lightning_shrink.privacy.data`), calibrates the noise (:mod:`~lightning_shrink.privacy.accounting`),
attaches a per-sample engine (:mod:`~lightning_shrink.privacy.ghost` or
:mod:`~lightning_shrink.privacy.opacus_hooks`) and wraps the optimizer
(:mod:`~lightning_shrink.privacy.optimizer`). Every step it clips each example's gradient, checks
that every layer saw exactly the batch's examples, adds the noise and accounts the step, before
any other plugin changes the gradients. Every Lightning internal it needs goes through
:mod:`lightning_shrink.lightning.compat` (``load_train_dataloaders``,
``replace_train_dataloaders``, ``strategy_kind``, ``ddp_comm_hook_of``, ``is_mock_optimizer``,
``unwrap_optimizer``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch import nn

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning import compat
from lightning_shrink.lightning.technique import TechniquePlugin
from lightning_shrink.privacy import checks, ghost
from lightning_shrink.privacy.accounting import PrivacyAccount, plan_budget
from lightning_shrink.privacy.config import PrivacyConfig
from lightning_shrink.privacy.data import PrivateData, take_over_training_data
from lightning_shrink.privacy.errors import PrivacyError
from lightning_shrink.privacy.layers import SharedIndexExpander
from lightning_shrink.privacy.opacus_hooks import HooksEngine
from lightning_shrink.privacy.optimizer import StepGuard, skip_allreduce, wrap_optimizer
from lightning_shrink.types import CommHook, ReportRow

__all__ = ["PrivacyError", "PrivacyPlugin"]

_PREFIX = "DifferentialPrivacy"


class PrivacyPlugin(TechniquePlugin):
    """DP-SGD as lightning-shrink hooks; configured by a :class:`~lightning_shrink.privacy.PrivacyConfig`."""

    default_name = "privacy"
    config: PrivacyConfig

    def __init__(self, config: PrivacyConfig) -> None:
        super().__init__(config)
        self.account = PrivacyAccount(config.accountant)
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sample_rate: float | None = None
        self.delta: float | None = config.delta
        self.dataset_size: int | None = None
        #: The step count the budget allows (``None`` without ``target_epsilon``).
        self.max_steps: int | None = None
        #: The engine in use, ``"ghost"`` or ``"hooks"`` (``None`` before the first fit).
        self.grad_sample_mode: str | None = None
        #: Per-sample gradient norms (before clipping) of the last step, for inspection.
        self.last_per_sample_norms: torch.Tensor | None = None
        #: Why the run was stopped for its privacy budget (``None`` if it was not).
        self.stop_reason: str | None = None
        self._engine: Any = None
        self._data: PrivateData | None = None
        self._expander: SharedIndexExpander | None = None
        self._expander_handles: list[Any] = []
        self._original: torch.optim.Optimizer | None = None
        self._dp: DPOptimizer | None = None
        self._guard: StepGuard | None = None
        self._examples = 0
        self._stand_in = False
        self._restored: Mapping[str, Any] | None = None
        self._checkpoint_steps = 0
        self._stop_announced = False

    # ------------------------------------------------------------------ the account

    @property
    def history(self) -> list[list[float]]:
        """Accountant history: ``[noise_multiplier, sample_rate, steps]`` entries, oldest first."""
        return self.account.history

    @property
    def steps(self) -> int:
        """Noisy steps taken so far (all fits of this plugin)."""
        return self.account.steps

    def epsilon_after(self, extra_steps: int = 0) -> float:
        """The epsilon spent after ``extra_steps`` more steps at the current noise and rate."""
        if self.delta is None:
            return 0.0
        return self.account.epsilon(self.delta, extra_steps, self.noise_multiplier, self.sample_rate)

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far."""
        return self.epsilon_after(0)

    # ------------------------------------------------------------------ set-up and fit start

    @hookimpl
    def shrink_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget what a previous stage read from a checkpoint."""
        self._restored = None
        self._checkpoint_steps = 0

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse runs that cannot be private, then take over data, noise, per-sample engine and optimizer."""
        self._close()
        checks.check_run(trainer, pl_module, instances=1 + len(self.peers()))
        checks.check_model(pl_module)
        checks.check_checkpoint_covered(self.name, self.account.steps, self._checkpoint_steps)
        self._data = take_over_training_data(trainer, self.config.poisson_sampling)
        self.dataset_size, self.sample_rate = self._data.dataset_size, self._data.sample_rate
        self._calibrate(trainer)
        self._check_resumed_configuration(trainer)
        self._attach_engine(trainer, pl_module)
        assert self.noise_multiplier is not None and self.sample_rate is not None
        self._original, self._dp = wrap_optimizer(
            trainer,
            pl_module,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=self.sample_rate * self.dataset_size / trainer.world_size,
            loss_reduction=self.config.loss_reduction,
        )
        self._guard = StepGuard(self._original)
        checks.warn_compositions(self)
        rank_zero_info(
            f"{_PREFIX}: DP-SGD with noise_multiplier={self.noise_multiplier:.4g}, "
            f"max_grad_norm={self.config.max_grad_norm}, sample_rate={self.sample_rate:.4g} "
            f"(N={self.dataset_size}), delta={self.delta:.3g}, accountant={self.config.accountant!r}, "
            f"per-sample gradients: {self.grad_sample_mode!r}, batch_first={self.config.batch_first}"
            + (
                f"; target epsilon {self.config.target_epsilon} allows {self.max_steps} step(s)"
                if self.max_steps is not None
                else ""
            )
        )

    def _calibrate(self, trainer: pl.Trainer) -> None:
        assert self.dataset_size is not None and self.sample_rate is not None
        self.delta, noise, self.max_steps = plan_budget(
            self.config,
            self.account,
            self.delta,
            self.sample_rate,
            self.dataset_size,
            float(trainer.estimated_stepping_batches),
        )
        if noise is not None:
            self.noise_multiplier = noise

    def _check_resumed_configuration(self, trainer: pl.Trainer) -> None:
        if self._restored is None:
            return
        checks.check_resumed_configuration(
            self._restored,
            {
                "accountant": self.config.accountant,
                "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.config.max_grad_norm,
                "sample_rate": self.sample_rate,
                "dataset_size": self.dataset_size,
                "delta": self.delta,
                "poisson_sampling": self.config.poisson_sampling,
            },
            trainer.world_size,
        )

    def _attach_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mode = self.config.grad_sample_mode
        unsupported = ghost.unsupported_layers(pl_module)
        if mode == "auto":
            mode = "hooks" if unsupported else "ghost"
        if mode == "ghost":
            if unsupported:
                raise PrivacyError(
                    f"{_PREFIX}(grad_sample_mode='ghost'): no ghost clipping for the trainable layers "
                    f"{unsupported}; use grad_sample_mode='hooks' (Opacus)"
                )
            # Under DDP every trainable parameter must get an autograd gradient (DDP's reducer waits
            # for it), so linear weights stay in the graph there.
            self._engine = ghost.GhostClippingEngine(
                pl_module,
                self.config.loss_reduction,
                skip_weight_grads=trainer.world_size == 1,
                batch_first=self.config.batch_first,
            )
        else:
            checks.check_hooks_engine(pl_module)
            self._engine = HooksEngine(
                pl_module, self.config.loss_reduction, batch_first=self.config.batch_first
            )
        self.grad_sample_mode = mode
        self._expander = SharedIndexExpander(self.config.batch_first)
        for module in pl_module.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                self._expander_handles.append(module.register_forward_pre_hook(self._expander))

    @hookimpl
    def shrink_ddp_comm_hook(self, trainer: pl.Trainer) -> CommHook | None:
        """Replace DDP's all-reduce of raw gradients by a no-op (the DP optimizer reduces the noised sums)."""
        if self._dp is None or trainer.world_size == 1:
            return None
        return (None, skip_allreduce)

    # ------------------------------------------------------------------ per batch / step

    @hookimpl
    def shrink_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Check that the batch is Poisson-sampled and note its number of examples."""
        if self._data is None:
            return
        if trainer.train_dataloader is not self._data.loader:
            raise PrivacyError(
                f"{_PREFIX}: the training dataloader was replaced after DifferentialPrivacy took it over; "
                "batches are no longer Poisson-sampled"
            )
        examples = self._data.counter.next_count()
        self._stand_in = examples == 0 and self._data.stand_in_for_empty
        self._examples = 1 if self._stand_in else examples
        if self._expander is not None:
            self._expander.examples = self._examples
        if self._engine is not None:
            self._engine.reset()  # activations of a batch whose step was refused

    @hookimpl(tryfirst=True)
    def shrink_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hide the raw gradients from later hooks (set them to None): they see only privatized ones."""
        if self._dp is None:
            return
        for p in self._dp.params:
            p.grad = None

    @hookimpl(tryfirst=True)
    def shrink_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip each example's gradient, add the noise and account the step (before other plugins)."""
        dp = self._dp
        if dp is None:
            return
        if compat.unwrap_optimizer(optimizer) is not dp:
            raise PrivacyError(
                f"{_PREFIX}: the Trainer steps {type(optimizer).__name__}, not the DP optimizer installed at "
                "fit start; the step is refused"
            )
        if self.max_steps is not None and self.steps + 1 > self.max_steps:
            raise PrivacyError(
                f"{_PREFIX}: the privacy budget is spent (epsilon={self.epsilon:.4g}, target "
                f"{self.config.target_epsilon}); the step is refused"
            )
        norms = self._engine.clip_and_accumulate(dp, self._examples, discard=self._stand_in)
        self.last_per_sample_norms = norms.detach()
        dp.add_noise()
        dp.scale_grad()
        if isinstance(dp, DistributedDPOptimizer):
            dp.reduce_gradients()
        assert self.noise_multiplier is not None and self.sample_rate is not None
        self.account.record(self.noise_multiplier, self.sample_rate)
        assert self._guard is not None
        self._guard.allow_one()

    @hookimpl
    def shrink_after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Stop the run when one more step would exceed the target epsilon."""
        if self.max_steps is not None and self.steps >= self.max_steps and not trainer.should_stop:
            trainer.should_stop = True
            if not self._stop_announced:
                self._stop_announced = True
                self.stop_reason = (
                    f"{_PREFIX}: stopping after step {self.steps}: epsilon={self.epsilon:.4g}, and one more "
                    f"step would spend {self.epsilon_after(1):.4g} > target_epsilon="
                    f"{self.config.target_epsilon} (delta={self.delta:.3g}, accountant "
                    f"{self.config.accountant!r})"
                )
                rank_zero_warn(self.stop_reason)

    @hookimpl
    def shrink_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Mapping[str, float] | None:
        """Log the epsilon spent and the noisy steps taken."""
        if self.delta is None or self._dp is None:
            return None
        return {self.key("epsilon"): self.epsilon, self.key("steps"): float(self.steps)}

    @hookimpl
    def shrink_progress_bar_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Mapping[str, float] | None:
        """Show the epsilon spent."""
        if self.delta is None or self._dp is None:
            return None
        return {self.key("epsilon"): self.epsilon}

    # ------------------------------------------------------------------ end, state, report

    def _close(self) -> None:
        for handle in self._expander_handles:
            handle.remove()
        self._expander_handles.clear()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the original optimizer back and remove every hook: the model is plain again."""
        self._close()
        if self._dp is not None and list(trainer.strategy.optimizers) == [self._dp]:
            trainer.strategy.optimizers = [self._original]
        for p in pl_module.parameters():
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        self._dp = self._original = None
        self._data = None

    @hookimpl
    def shrink_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks also when the fit failed."""
        if stage == "fit":
            self._close()

    @hookimpl
    def shrink_save_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: MutableMapping[str, Any]
    ) -> None:
        """Save the accountant history and the configuration it was spent with."""
        state[self.name] = {
            "history": [list(e) for e in self.history],
            "accountant": self.config.accountant,
            "delta": self.delta,
            "max_grad_norm": self.config.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "dataset_size": self.dataset_size,
            "poisson_sampling": self.config.poisson_sampling,
        }

    @hookimpl
    def shrink_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: MutableMapping[str, Any]
    ) -> None:
        """Note how many optimizer steps the checkpoint has taken (all must be in the account)."""
        self._checkpoint_steps = int(checkpoint.get("global_step", 0) or 0)

    @hookimpl
    def shrink_load_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]
    ) -> None:
        """Restore the accountant history (the configuration is compared at fit start)."""
        saved = state.get(self.name)
        if not saved:
            return
        self._restored = dict(saved)
        self.account = PrivacyAccount(self.config.accountant, saved.get("history", []))
        if self.config.delta is None and saved.get("delta") is not None:
            self.delta = saved["delta"]

    @hookimpl
    def shrink_report_rows(self, trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
        """The privacy spent and the mechanism that spent it."""
        if self.delta is None or self.noise_multiplier is None:
            return None
        rows = [
            ReportRow(self.name, "epsilon", self.epsilon),
            ReportRow(self.name, "delta", self.delta),
            ReportRow(self.name, "accountant", self.config.accountant),
            ReportRow(self.name, "noise multiplier", self.noise_multiplier),
            ReportRow(self.name, "max grad norm", self.config.max_grad_norm),
            ReportRow(self.name, "sample rate", self.sample_rate),
            ReportRow(self.name, "steps", self.steps),
            ReportRow(self.name, "per-sample gradients", self.grad_sample_mode or ""),
            ReportRow(self.name, "batch first", self.config.batch_first),
        ]
        if self.config.target_epsilon is not None:
            rows.append(ReportRow(self.name, "target epsilon", self.config.target_epsilon))
        if not self.config.poisson_sampling:
            rows.append(ReportRow(self.name, "guarantee", "none: Poisson sampling was off"))
        return rows
