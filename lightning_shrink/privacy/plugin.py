"""The DP-SGD plugin behind :class:`lightning_shrink.DifferentialPrivacy` (imports Opacus).

What it takes over at ``shrink_fit_start`` (optimizers exist, the model is wrapped, no step ran):

* **per-sample gradients**: Opacus' per-sample gradient hooks (``"hooks"``) or this package's
  ghost-norm/book-keeping engine (``"ghost"``, :mod:`lightning_shrink.privacy.ghost`) attached to
  the LightningModule's layers;
* **the optimizer**: each optimizer of the Trainer's strategy is wrapped in an Opacus
  ``DPOptimizer`` (``DistributedDPOptimizer`` under DDP) and put back with the public
  ``trainer.strategy.optimizers`` setter. Clipping and noise run in ``shrink_before_optimizer_step``
  (``tryfirst``: before gradient masks of other plugins), and a step pre-hook on the wrapped optimizer
  refuses any update whose gradients were not privatized;
* **the data**: the training dataloader is rebuilt with Opacus' Poisson samplers. Lightning creates
  it only when the fit loop starts, so the plugin asks the fit loop to load it now
  (``trainer.fit_loop.setup_data()``, which Lightning's own ``run`` then skips as already done),
  swaps it in the fit loop's ``CombinedLoader`` (``flattened`` setter) and re-creates the loop's
  batch iterator. These two private attributes of Lightning 2.6 (``fit_loop._combined_loader``,
  ``fit_loop._data_fetcher``) are the only internals used; every batch then checks that
  ``trainer.train_dataloader`` is still the Poisson loader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import wrap_collate_with_empty
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning import compat
from lightning_shrink.lightning.technique import TechniquePlugin
from lightning_shrink.types import CommHook, ReportRow

if TYPE_CHECKING:
    from lightning_shrink.privacy.callback import DifferentialPrivacy

__all__ = ["PrivacyError", "PrivacyPlugin"]

_PREFIX = "DifferentialPrivacy"


class PrivacyError(RuntimeError):
    """The run cannot be made differentially private as configured (raised before any step)."""


# ---------------------------------------------------------------------------- samplers


class _DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler, but yielding empty local batches too.

    Opacus' version skips an empty local batch, which would leave the ranks with different
    numbers of batches (and DDP waiting forever); an empty local batch is a valid Poisson draw.
    """

    def __iter__(self) -> Any:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()


# ---------------------------------------------------------------------------- optimizer


class _StepMixin:
    """Lightning calls ``optimizer.step(closure)``; the closure runs ``training_step``, the
    backward pass and ``on_before_optimizer_step`` (where the plugin clips and adds noise). The
    wrapped optimizer then steps only if the plugin privatized the gradients of this step."""

    _plugin: PrivacyPlugin

    def step(self, closure: Any = None) -> Any:
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if self._plugin._skip_step:
            self._plugin._skip_step = False
            return result
        self.original_optimizer.step()  # type: ignore[attr-defined]
        return result

    @property
    def accumulated_iterations(self) -> int:
        return 1  # gradient accumulation is refused at fit start


class _LightningDPOptimizer(_StepMixin, DPOptimizer):
    pass


class _LightningDistributedDPOptimizer(_StepMixin, DistributedDPOptimizer):
    pass


# ---------------------------------------------------------------------------- engines


class _HooksEngine:
    """Opacus' per-sample gradient hooks (materialize ``p.grad_sample`` for every example)."""

    name = "hooks"

    def __init__(self, module: nn.Module, loss_reduction: str) -> None:
        try:
            self.hooks = GradSampleHooks(module, batch_first=True, loss_reduction=loss_reduction, strict=True)
        except NotImplementedError as exc:
            raise PrivacyError(f"{_PREFIX}: Opacus cannot compute per-sample gradients: {exc}") from exc

    def clip_and_accumulate(self, optimizer: DPOptimizer) -> torch.Tensor:
        missing = [p for p in optimizer.params if getattr(p, "grad_sample", None) is None]
        if missing:
            raise PrivacyError(
                f"{_PREFIX}: {len(missing)} trainable parameter(s) got no per-sample gradient in this step "
                "(used outside the layers Opacus hooks, e.g. through a functional call on `.weight`, "
                "or not used at all): their gradient cannot be clipped, the step is refused"
            )
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], 1)
        optimizer.clip_and_accumulate()
        return norms.norm(2, dim=1)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self.hooks.cleanup()


# ---------------------------------------------------------------------------- the plugin


class PrivacyPlugin(TechniquePlugin):
    """DP-SGD as lightning-shrink hooks; configured by :class:`DifferentialPrivacy`."""

    default_name = "privacy"

    def __init__(self, config: DifferentialPrivacy) -> None:
        super().__init__(config)
        #: Accountant history: ``[noise_multiplier, sample_rate, steps]`` entries, oldest first.
        self.history: list[list[float]] = []
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sample_rate: float | None = None
        self.delta: float | None = config.delta
        self.dataset_size: int | None = None
        self.max_steps: int | None = None
        self.grad_sample_mode: str | None = None
        #: Per-sample gradient norms (before clipping) of the last step, for inspection.
        self.last_per_sample_norms: torch.Tensor | None = None
        self._engine: Any = None
        self._originals: list[torch.optim.Optimizer] = []
        self._dp_optimizers: list[DPOptimizer] = []
        self._guards: list[Any] = []
        self._embedding_hooks: list[Any] = []
        self._loader: DataLoader | None = None
        self._batch_size = 0
        self._privatized = False
        self._skip_step = False
        self._stop_announced = False
        #: Why the run was stopped for its privacy budget (``None`` if it was not).
        self.stop_reason: str | None = None
        self._eps_cache: dict[tuple, float] = {}

    # ------------------------------------------------------------------ accounting

    @property
    def steps(self) -> int:
        """Noisy steps taken so far (all fits of this plugin)."""
        return int(sum(entry[2] for entry in self.history))

    def epsilon_after(self, extra_steps: int = 0) -> float:
        """The epsilon spent after ``extra_steps`` more steps at the current noise and rate."""
        history = [tuple(e) for e in self.history]
        if extra_steps:
            assert self.noise_multiplier is not None and self.sample_rate is not None
            if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
                history[-1] = (*history[-1][:2], history[-1][2] + extra_steps)
            else:
                history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf
        key = tuple(history)
        if key not in self._eps_cache:
            accountant = create_accountant(self.config.accountant)
            accountant.history = list(history)
            self._eps_cache[key] = float(accountant.get_epsilon(delta=self.delta))
        return self._eps_cache[key]

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far."""
        return self.epsilon_after(0) if self.delta is not None else 0.0

    def _record_step(self) -> None:
        assert self.noise_multiplier is not None and self.sample_rate is not None
        if self.history and tuple(self.history[-1][:2]) == (self.noise_multiplier, self.sample_rate):
            self.history[-1][2] += 1
        else:
            self.history.append([self.noise_multiplier, self.sample_rate, 1])

    def _max_extra_steps(self, target: float) -> int:
        """The largest number of further steps that keeps epsilon <= ``target``."""
        if self.epsilon_after(1) > target:
            return 0
        lo, hi = 1, 2
        while self.epsilon_after(hi) <= target:
            lo, hi = hi, hi * 2
            if hi > 10**9:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------ fit start

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        self._check_run(trainer, pl_module)
        self._check_model(pl_module)
        self._take_over_data(trainer)
        self._calibrate(trainer)
        self._attach_engine(trainer, pl_module)
        self._wrap_optimizers(trainer, pl_module)
        self._warn_compositions(trainer)
        rank_zero_info(
            f"{_PREFIX}: DP-SGD with noise_multiplier={self.noise_multiplier:.4g}, "
            f"max_grad_norm={self.config.max_grad_norm}, sample_rate={self.sample_rate:.4g} "
            f"(N={self.dataset_size}), delta={self.delta:.3g}, accountant={self.config.accountant!r}, "
            f"per-sample gradients: {self.grad_sample_mode!r}"
            + (
                f"; target epsilon {self.config.target_epsilon} allows {self.max_steps} step(s)"
                if self.max_steps is not None
                else ""
            )
        )

    def _check_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problems = []
        if not pl_module.automatic_optimization:
            problems.append(
                "manual optimization (`automatic_optimization = False`): the module steps its optimizers "
                "itself, so clipping, noise and accounting cannot be guaranteed"
            )
        if self.peers():
            problems.append(
                f"{len(self.peers()) + 1} DifferentialPrivacy callbacks in one Trainer; one DP-SGD "
                "mechanism (one optimizer, one accountant) covers the whole run: keep one"
            )
        strategy = trainer.strategy
        kind = compat.strategy_kind(strategy)
        if kind == "ddp_spawn":
            problems.append("strategy 'ddp_spawn' is not supported; use strategy='ddp'")
        elif kind not in ("single_device", "ddp", "ddp_fork"):
            problems.append(
                f"strategy {type(strategy).__name__} is not supported (single device and 'ddp' are): "
                "its optimizer and gradient handling cannot be taken over"
            )
        if trainer.accumulate_grad_batches != 1:
            problems.append(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: accumulating several "
                "Poisson-sampled batches into one noisy step is not the mechanism the accountant "
                "analyses; raise the dataloader's batch size instead"
            )
        if str(trainer.precision) == "16-mixed":
            problems.append(
                "precision='16-mixed' uses a gradient scaler that steps the optimizer itself; "
                "use '32-true' or 'bf16-mixed'"
            )
        if trainer.reload_dataloaders_every_n_epochs:
            problems.append("reload_dataloaders_every_n_epochs would replace the Poisson-sampled dataloader")
        if trainer.overfit_batches:
            problems.append("overfit_batches replaces the sampler with a sequential one")
        if problems:
            raise PrivacyError(
                f"{_PREFIX}: differential privacy cannot be applied to this run: " + "; ".join(problems)
            )

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        problems = []
        direct = [n for n, p in pl_module.named_parameters(recurse=False) if p.requires_grad]
        if direct:
            problems.append(
                f"trainable parameters {direct} are registered directly on the LightningModule; "
                "per-sample gradients are computed per layer: move them into a submodule"
            )
        for child_name, child in pl_module.named_children():
            trainable = any(p.requires_grad for p in child.parameters())
            for name, module in child.named_modules():
                full = f"{child_name}.{name}" if name else child_name
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and trainable:
                    problems.append(
                        f"{full} ({type(module).__name__}) normalizes with batch statistics, which mixes "
                        "examples: replace it with GroupNorm or LayerNorm (opacus ModuleValidator.fix)"
                    )
        for error in ModuleValidator.validate(pl_module, strict=False):
            text = str(error)
            if "training mode" in text or "BatchNorm" in text:
                continue  # the Trainer sets train mode itself; batch norm is reported above
            problems.append(text)
        if problems:
            raise PrivacyError(
                f"{_PREFIX}: the model cannot be trained with per-sample gradient clipping: "
                + "; ".join(problems)
            )

    def _take_over_data(self, trainer: pl.Trainer) -> DataLoader:
        loaders = compat.load_train_dataloaders(trainer)
        if loaders is None:
            raise PrivacyError(
                f"{_PREFIX}: no training dataloader to take over (limit_train_batches=0 or no training_step)"
            )
        if len(loaders) != 1:
            raise PrivacyError(
                f"{_PREFIX}: {len(loaders)} training dataloaders; Poisson sampling needs exactly one"
            )
        dl = loaders[0]
        if not isinstance(dl, DataLoader):
            raise PrivacyError(
                f"{_PREFIX}: the training data is a {type(dl).__name__}, not a torch DataLoader; "
                "it cannot be Poisson-sampled"
            )
        if isinstance(dl.dataset, IterableDataset):
            raise PrivacyError(
                f"{_PREFIX}: the training DataLoader reads an IterableDataset, which cannot be "
                "Poisson-sampled (each example must be selectable by index)"
            )
        try:
            n = len(dl.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise PrivacyError(f"{_PREFIX}: the training dataset has no length: {exc}") from exc
        world = trainer.world_size
        num_batches = len(dl)
        if dl.batch_size is not None:
            sample_rate = min(1.0, dl.batch_size * world / n)
        else:
            sample_rate = min(1.0, 1.0 / num_batches)
        self.dataset_size = n
        self.sample_rate = sample_rate
        if not self.config.poisson_sampling:
            rank_zero_warn(
                f"{_PREFIX}(poisson_sampling=False): the dataloader's own sampling is kept; the reported "
                "epsilon assumes Poisson sampling and is NOT a formal guarantee for this run"
            )
            self._loader = dl
            return dl
        # Different sampling randomness on every rank, reproducible under `seed_everything`.
        seed = int(torch.randint(0, 2**62, (1,)).item()) + 7919 * trainer.global_rank
        generator = torch.Generator().manual_seed(seed)
        if world > 1:
            batch_sampler: Any = _DistributedPoissonSampler(
                total_size=n, sample_rate=sample_rate, steps=num_batches, generator=generator
            )
        else:
            batch_sampler = UniformWithReplacementSampler(
                num_samples=n, sample_rate=sample_rate, steps=num_batches, generator=generator
            )
        extra: dict[str, Any] = {}
        if dl.num_workers > 0:
            extra = dict(prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)
        poisson = DataLoader(
            dl.dataset,
            batch_sampler=batch_sampler,
            collate_fn=wrap_collate_with_empty(collate_fn=dl.collate_fn, batch_first=True),
            num_workers=dl.num_workers,
            pin_memory=dl.pin_memory,
            timeout=dl.timeout,
            worker_init_fn=dl.worker_init_fn,
            multiprocessing_context=dl.multiprocessing_context,
            **extra,
        )
        compat.replace_train_dataloaders(trainer, [poisson])
        self._loader = poisson
        return poisson

    def _calibrate(self, trainer: pl.Trainer) -> None:
        n = self.dataset_size
        assert n is not None and self.sample_rate is not None
        if self.delta is None:
            self.delta = 1.0 / (10 * n)
        elif self.delta >= 1.0 / n:
            raise PrivacyError(
                f"{_PREFIX}: `delta`={self.config.delta} must be below 1/N = {1.0 / n:.3g} "
                f"(N = {n} training examples): a larger delta allows releasing an example outright"
            )
        config = self.config
        if config.target_epsilon is None:
            self.max_steps = None
            if config.noise_multiplier == 0:
                rank_zero_warn(
                    f"{_PREFIX}: noise_multiplier=0 adds no noise: the run is clipped but NOT private "
                    "(epsilon is infinite)"
                )
            return
        planned = config.steps if config.steps is not None else round(config.epochs / self.sample_rate)
        try:
            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=config.target_epsilon,
                    target_delta=self.delta,
                    sample_rate=self.sample_rate,
                    steps=planned,
                    accountant=config.accountant,
                )
            )
        except ValueError as exc:
            raise PrivacyError(
                f"{_PREFIX}: cannot calibrate noise for target_epsilon={config.target_epsilon} over "
                f"{planned} steps: {exc}"
            ) from exc
        remaining = self._max_extra_steps(config.target_epsilon)
        if remaining == 0:
            raise PrivacyError(
                f"{_PREFIX}: target_epsilon={config.target_epsilon} is already spent "
                f"(epsilon={self.epsilon:.4g} after {self.steps} step(s)); no further step is allowed"
            )
        self.max_steps = self.steps + remaining

    def _attach_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mode = self.config.grad_sample_mode
        from lightning_shrink.privacy import ghost

        if mode == "auto":
            mode = "ghost" if not ghost.unsupported_layers(pl_module) else "hooks"
        if mode == "ghost":
            unsupported = ghost.unsupported_layers(pl_module)
            if unsupported:
                raise PrivacyError(
                    f"{_PREFIX}(grad_sample_mode='ghost'): no ghost clipping for the trainable layers "
                    f"{unsupported}; use grad_sample_mode='hooks' (Opacus)"
                )
            # Under DDP every trainable parameter must get an autograd gradient (DDP's reducer waits
            # for it), so linear weights stay in the graph there.
            self._engine = ghost.GhostClippingEngine(
                pl_module, self.config.loss_reduction, skip_weight_grads=trainer.world_size == 1
            )
        else:
            in_eval = [n for n, m in pl_module.named_modules() if not m.training and _trainable_direct(m)]
            if in_eval:
                raise PrivacyError(
                    f"{_PREFIX}(grad_sample_mode='hooks'): trainable layers {in_eval[:5]}"
                    f"{'...' if len(in_eval) > 5 else ''} are in eval mode, and Opacus' per-sample hooks "
                    "skip layers in eval mode (Lightning does not switch a model loaded in eval mode, like "
                    "a transformers `from_pretrained` model, to training mode): call `.train()` on the model "
                    "or use grad_sample_mode='ghost'"
                )
            self._engine = _HooksEngine(pl_module, self.config.loss_reduction)
        self.grad_sample_mode = mode
        # transformers' BERT-style embeddings look up positions with a (1, T) index shared by the
        # batch; per-sample gradients need one row per example: expand such inputs to the batch.
        for module in pl_module.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                self._embedding_hooks.append(module.register_forward_pre_hook(self._expand_shared_index))

    def _expand_shared_index(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or not torch.is_grad_enabled():
            return None
        index = args[0]
        if isinstance(index, torch.Tensor) and index.dim() >= 1 and index.shape[0] == 1 < self._batch_size:
            return (index.expand(self._batch_size, *index.shape[1:]), *args[1:])
        return None

    def _wrap_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
                f"{_PREFIX}: cannot wrap optimizer {type(original).__name__}: a torch.optim.Optimizer "
                "that is not already a DP optimizer is needed"
            )
        in_optimizer = {id(p) for group in original.param_groups for p in group["params"]}
        trainable = {id(p): n for n, p in pl_module.named_parameters() if p.requires_grad}
        outside = [name for pid, name in trainable.items() if pid not in in_optimizer]
        foreign = [p for group in original.param_groups for p in group["params"] if id(p) not in trainable]
        if outside:
            raise PrivacyError(
                f"{_PREFIX}: trainable parameters {outside[:5]}{'...' if len(outside) > 5 else ''} are "
                "not in the optimizer; freeze them (requires_grad=False) or optimize them"
            )
        if any(p.requires_grad for p in foreign):
            raise PrivacyError(
                f"{_PREFIX}: the optimizer updates {len(foreign)} trainable tensor(s) that are not "
                "parameters of the LightningModule; their per-sample gradients cannot be computed"
            )
        world = trainer.world_size
        assert self.sample_rate is not None and self.dataset_size is not None
        expected = self.sample_rate * self.dataset_size / world  # expected local batch size
        cls = _LightningDistributedDPOptimizer if world > 1 else _LightningDPOptimizer
        dp = cls(
            original,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction=self.config.loss_reduction,
        )
        dp._plugin = self
        self._originals = [original]
        self._dp_optimizers = [dp]
        trainer.strategy.optimizers = [dp]
        self._guards.append(original.register_step_pre_hook(self._refuse_unprivatized_step))

    @hookimpl
    def shrink_ddp_comm_hook(self, trainer: pl.Trainer) -> CommHook | None:
        # The DP optimizer all-reduces the clipped, noised sum itself: DDP's all-reduce of the raw
        # gradients would be wasted work (Opacus' DPDDP does the same).
        if not self._dp_optimizers or trainer.world_size == 1:
            return None
        return (None, _skip_allreduce)

    def _refuse_unprivatized_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._privatized:
            raise PrivacyError(
                f"{_PREFIX}: the optimizer was about to step with gradients that were not clipped and "
                "noised (the DP optimizer or the per-sample engine was bypassed); the step is refused"
            )
        self._privatized = False

    def _warn_compositions(self, trainer: pl.Trainer) -> None:
        from lightning_shrink.distillation.callback import DistillationPlugin

        if self.pluginmanager is None:
            return
        if any(isinstance(p, DistillationPlugin) for p in self.pluginmanager.get_plugins()):
            rank_zero_warn(
                f"{_PREFIX} with KnowledgeDistillation: the (epsilon, delta) guarantee covers the student's "
                "training only if the teacher did not see the private training data (or was itself "
                "trained with DP, whose budget then adds up). Distillation terms are clipped per example "
                "only when they are per-example functions of the student's forward pass on the batch."
            )

    # ------------------------------------------------------------------ per batch / step

    @hookimpl
    def shrink_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._loader is None:
            return
        if trainer.train_dataloader is not self._loader:
            raise PrivacyError(
                f"{_PREFIX}: the training dataloader was replaced after DifferentialPrivacy took it over; "
                "batches are no longer Poisson-sampled"
            )
        self._batch_size = _batch_size(batch)
        if self._engine is not None:
            self._engine.reset()  # activations of a batch whose step was skipped

    @hookimpl(tryfirst=True)
    def shrink_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._dp_optimizers:
            return
        dp = self._dp_optimizers[0]
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
        if all(p.grad is None and getattr(p, "grad_sample", None) is None for p in dp.params) and (
            self._engine.name == "hooks" or not self._engine.has_data()
        ):
            self._skip_step = True  # training_step returned None: no backward, no step
            return
        norms = self._engine.clip_and_accumulate(dp)
        self.last_per_sample_norms = norms.detach()
        dp.add_noise()
        dp.scale_grad()
        if isinstance(dp, DistributedDPOptimizer):
            dp.reduce_gradients()
        self._record_step()
        self._privatized = True

    @hookimpl
    def shrink_after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
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
        if self.delta is None or not self._dp_optimizers:
            return None
        return {self.key("epsilon"): self.epsilon, self.key("steps"): float(self.steps)}

    @hookimpl
    def shrink_progress_bar_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Mapping[str, float] | None:
        if self.delta is None or not self._dp_optimizers:
            return None
        return {self.key("epsilon"): self.epsilon}

    # ------------------------------------------------------------------ end, state, report

    def _close(self) -> None:
        for handle in [*self._guards, *self._embedding_hooks]:
            handle.remove()
        self._guards.clear()
        self._embedding_hooks.clear()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._privatized = self._skip_step = False

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self._dp_optimizers and list(trainer.strategy.optimizers) == self._dp_optimizers:
            trainer.strategy.optimizers = list(self._originals)
        for p in pl_module.parameters():
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        self._dp_optimizers = []
        self._loader = None

    @hookimpl
    def shrink_teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    @hookimpl
    def shrink_save_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: MutableMapping[str, Any]
    ) -> None:
        state[self.name] = {
            "history": [list(e) for e in self.history],
            "accountant": self.config.accountant,
            "delta": self.delta,
            "max_grad_norm": self.config.max_grad_norm,
        }

    @hookimpl
    def shrink_load_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]
    ) -> None:
        saved = state.get(self.name)
        if not saved:
            return
        if saved.get("accountant", self.config.accountant) != self.config.accountant:
            raise PrivacyError(
                f"{_PREFIX}: the checkpoint's epsilon was accounted with {saved.get('accountant')!r}, "
                f"this run uses {self.config.accountant!r}; use the same accountant to continue"
            )
        self.history = [list(e) for e in saved.get("history", [])]
        if self.delta is None:
            self.delta = saved.get("delta")

    @hookimpl
    def shrink_report_rows(self, trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
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
        ]
        if self.config.target_epsilon is not None:
            rows.append(ReportRow(self.name, "target epsilon", self.config.target_epsilon))
        if not self.config.poisson_sampling:
            rows.append(ReportRow(self.name, "guarantee", "none: Poisson sampling was off"))
        return rows


def _trainable_direct(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _skip_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    # No annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return _batch_size(batch["input_ids"])
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0
