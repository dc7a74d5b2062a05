"""The plugin of :class:`~lightning_shrink.GradualMagnitudePruning`: selects the parameters, follows the
schedule, keeps pruned weights at zero, and reports."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_shrink.adapters import check_supported, mask_lora_deltas
from lightning_shrink.adapters.gradients import BaseGradients
from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning import compat
from lightning_shrink.lightning.param_groups import fused_available
from lightning_shrink.lightning.technique import TechniquePlugin
from lightning_shrink.pruning.config import OWNER, PruningConfig
from lightning_shrink.pruning.criteria import Criterion, make_criterion
from lightning_shrink.pruning.distributed import (
    Comm,
    broadcast_masks,
    is_dtensor,
    local_tensor,
    replicated_world_size,
    sharded_comm,
)
from lightning_shrink.pruning.masks import check_divides, compute_masks
from lightning_shrink.pruning.report import report_rows, shortfall, shortfall_warning
from lightning_shrink.pruning.schedule import PruningSchedule
from lightning_shrink.pruning.selection import PruneTarget, group_indices, select_targets
from lightning_shrink.pruning.state import STATE_VERSION, check_resume, is_pruning_state, resume_record
from lightning_shrink.pruning.structured import (
    STRUCTURED_KINDS,
    GroupSpec,
    structured_shortfall,
    structured_targets,
    structured_update,
)
from lightning_shrink.types import ParamGroup, ReportRow

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

__all__ = ["PruningPlugin"]


class PruningPlugin(TechniquePlugin):
    """The hook implementations of one :class:`~lightning_shrink.GradualMagnitudePruning` (registered as
    ``"pruning"``, ``"pruning-2"``...).

    Args:
        config: The validated configuration.
    """

    default_name = "pruning"
    config: PruningConfig

    def __init__(self, config: PruningConfig) -> None:
        super().__init__(config)
        self.targets: list[PruneTarget] = []
        #: The layers' head or neuron groups of a structured pattern (``None`` otherwise).
        self.group_specs: list[GroupSpec] | None = None
        self.params: list[torch.nn.Parameter] = []
        self.keeps: list[torch.Tensor] = []
        self.schedule: PruningSchedule | None = None
        self.last_update_step: int | None = None
        self.update_count = 0
        self.sparsity = 0.0
        self.target_now = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self._pruned: list[int] = []
        self._total_steps = float("inf")
        self._warned_emptied: set[str] = set()
        self._restored: Mapping[str, Any] | None = None
        self._started = False
        self._layers_pending = False
        self._active: list[int] = []
        self._comm = Comm()
        self._replicated_world = 1
        #: The importance criterion (``config.criterion``), bound to the pruned parameters at fit start.
        self.criterion: Criterion = make_criterion(OWNER, config.criterion, config.criterion_options)
        #: Gradient criteria: the frozen LoRA base weights among the targets, whose gradients are
        #: computed for the fit.
        self._base_grads: BaseGradients | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-masks (``True`` = kept), by qualified parameter name."""
        return {t.name: k for t, k in zip(self.targets, self.keeps, strict=True)}

    # ------------------------------------------------------------------ set-up

    @hookimpl
    def shrink_setup(self, stage: str) -> None:
        """Forget the previous fit's selection and schedule."""
        if stage == "fit":
            self.targets, self.params, self.schedule = [], [], None
            self._restored, self._base_grads = None, None

    @hookimpl
    def shrink_configure_model(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Select the parameters to prune (LoRA: the base weights, their adapters masked alike); refuse
        patterns that match nothing and overlaps with other pruning callbacks."""
        if stage != "fit":
            return
        cfg = self.config
        check_supported(pl_module, OWNER)
        if cfg.pattern.kind in STRUCTURED_KINDS:
            self.targets, self.group_specs = structured_targets(pl_module, cfg)
        else:
            self.targets, self.group_specs = select_targets(pl_module, cfg), None
        mask_lora_deltas(pl_module, [t.name for t in self.targets])
        named = dict(pl_module.named_parameters(remove_duplicate=False))
        for t in self.targets:
            check_divides(named[t.name].shape, t.transposed, cfg.pattern, t.name)
        mine = {id(named[t.name]): t.name for t in self.targets}
        for peer in self.peers():
            if not isinstance(peer, PruningPlugin) or not peer.targets:
                continue
            both = [mine[id(named[t.name])] for t in peer.targets if id(named.get(t.name)) in mine]
            if both:
                first, second = sorted((peer.name, self.name))
                raise ValueError(
                    f"{OWNER}: plugins {first!r} and {second!r} both select {both[:3]}"
                    f"{f' and {len(both) - 3} more' if len(both) > 3 else ''}: a parameter can follow one "
                    "schedule only; make their `modules` / `exclude_modules` disjoint"
                )

    @hookimpl
    def shrink_load_state(self, trainer: pl.Trainer, state: Mapping[str, Any]) -> None:
        """Keep this plugin's checkpoint state for the first batch; refuse pruning states no plugin
        claims and a changed configuration."""
        if trainer.state.fn != "fit":
            return
        names = {self.name, *(p.name for p in self.peers() if isinstance(p, PruningPlugin))}
        unclaimed = sorted(k for k, v in state.items() if is_pruning_state(v) and k not in names)
        if unclaimed:
            raise ValueError(
                f"{OWNER}: the checkpoint holds the pruning state of {unclaimed}, but the Trainer has no "
                f"GradualMagnitudePruning registered under that name (registered: {sorted(names)}); those "
                "masks would no longer be enforced. Resume with the callbacks (and `name`s) of the original "
                "run"
            )
        saved = state.get(self.name)
        self._restored = saved if saved else None
        if self._restored is not None and self.schedule is not None:
            check_resume(self.name, self._restored, self._record())

    @hookimpl
    def shrink_optimizer_param_groups(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> list[ParamGroup] | None:
        """Bind the importance criterion to the pruned parameters; train learned scores (movement) in a
        parameter group of their own."""
        if not self.targets:
            return None
        named = dict(pl_module.named_parameters(remove_duplicate=False))
        params = [named[t.name] for t in self.targets]
        criterion = self.criterion
        if criterion.name != "magnitude" and any(is_dtensor(p) for p in params):
            raise ValueError(
                f"{OWNER} ({self.name!r}): criterion={criterion.name!r} is not supported on FSDP2-sharded "
                "parameters (its per-weight scores would be per-shard state that a checkpoint does not "
                "restore); use criterion='magnitude' under FSDP2, or DDP"
            )
        names = [t.name for t in self.targets]
        base_grads = BaseGradients(pl_module, names, params) if criterion.needs_gradients else None
        self._base_grads = base_grads or None
        if self._base_grads is not None and self.technique_registered("privacy"):
            # The frozen base weights' gradients are plain autograd sums, neither clipped per example
            # nor noised: masks chosen from them would depend on the private data outside the DP
            # accounting.
            raise ValueError(
                f"{OWNER} ({self.name!r}): criterion={criterion.name!r} on the frozen base weights of LoRA "
                f"layers ({self._base_grads.first_layer()!r}, ...) reads gradients that DifferentialPrivacy "
                "does not clip or noise (it privatizes the adapters' gradients only), so the masks would "
                "leak the training data outside the privacy guarantee; use criterion='magnitude' with "
                "DifferentialPrivacy and LoRA"
            )
        criterion.bind(names, params, base_grads.effective() if base_grads else None)
        groups = criterion.param_groups()
        if not groups:
            return groups
        optimizer = compat.optimizer_of(trainer)
        if optimizer is None:
            raise ValueError(
                f"{OWNER} ({self.name!r}): criterion={criterion.name!r} learns its scores with the run's "
                f"optimizer, but {type(pl_module).__name__}.configure_optimizers returned none; configure "
                "an optimizer or use criterion='magnitude' or 'taylor'"
            )
        for group in groups:
            if fused_available(optimizer, group["params"]):
                group["fused"] = True  # the scores step in one kernel per tensor (see fused_available)
        return groups

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the schedule in optimizer steps and find how the parameters are distributed."""
        cfg = self.config
        named = dict(pl_module.named_parameters(remove_duplicate=False))
        self.params = [named[t.name] for t in self.targets]
        if any(is_dtensor(p) for p in self.params):
            if self.group_specs is not None:
                raise ValueError(
                    f"{OWNER} ({self.name!r}): `pattern='{cfg.pattern}'` does not support sharded (FSDP2) "
                    "parameters; prune heads or neurons under DDP or on one device"
                )
            self._comm = sharded_comm(self.targets, self.params, cfg.pattern)
            self._replicated_world = 1
        else:
            self._comm = Comm()
            self._replicated_world = replicated_world_size()
        self._total_steps = float(trainer.estimated_stepping_batches)
        self.schedule = cfg.resolve_schedule(self._total_steps)
        if self.schedule.final_step > self._total_steps:
            rank_zero_warn(
                f"{OWNER} ({self.name!r}): the schedule's last mask update is at optimizer step "
                f"{self.schedule.final_step}, after the run's {int(self._total_steps)} steps; "
                "`target_sparsity` will not be reached"
            )
        if self._restored is not None:
            check_resume(self.name, self._restored, self._record())
        elif (
            self.criterion.needs_gradients
            and self.schedule.is_update_step(0)
            and self.schedule.sparsity(0) > 0
        ):
            raise ValueError(
                f"{OWNER} ({self.name!r}): criterion={self.criterion.name!r} scores weights from their "
                f"gradients, but the schedule prunes to {self.schedule.sparsity(0):g} at step 0, before any "
                "gradient: set `start_step` >= 1 or `initial_sparsity=0`"
            )
        if self._base_grads is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and self.criterion.reads_step_gradients:
                raise ValueError(
                    f"{OWNER} ({self.name!r}): criterion={self.criterion.name!r} on the frozen base weights "
                    f"of LoRA layers ({self._base_grads.first_layer()!r}, ...) reads gradients that the "
                    "optimizer does not hold, which the gradient scaler of precision='16-mixed' leaves "
                    "scaled; use precision='bf16-mixed', criterion='movement' or criterion='magnitude'"
                )
            self._base_grads.enable()
        self.keeps = []
        self._active = []
        self._started = False

    def _record(self) -> dict[str, Any]:
        assert self.schedule is not None
        return resume_record(self.config, self.schedule, self.targets, self._total_steps)

    def _start(self, trainer: pl.Trainer) -> None:
        """First batch of the fit: the checkpoint (if any) and the optimizer state are restored."""
        assert self.schedule is not None
        self._started = True
        restored, self._restored = self._restored, None
        locals_ = [local_tensor(p) for p in self.params]
        keeps: list[torch.Tensor] | None = None
        if restored is not None:
            # Under FSDP2 each rank holds the masks of its own shard and only one rank's state is
            # saved: the masks are rebuilt from the restored weights' zeros instead.
            saved = {} if (self._comm.sharded or restored.get("sharded")) else restored.get("masks", {})
            if all(
                t.name in saved and tuple(saved[t.name].shape) == tuple(w.shape)
                for t, w in zip(self.targets, locals_, strict=True)
            ):
                keeps = [
                    saved[t.name].to(device=w.device, dtype=torch.bool)
                    for t, w in zip(self.targets, locals_, strict=True)
                ]
            self.last_update_step = restored.get("last_update_step")
            self.update_count = int(restored.get("update_count", 0))
            if "criterion" in restored or self.criterion.name != "magnitude":
                self.criterion.load_state_dict(restored.get("criterion", {}))
        else:
            self.last_update_step = None
            self.update_count = 0
        if keeps is None:
            # Zeros already in the weights (an already-sparse model, a second fit) are the initial
            # masks; an all-zero parameter is zero-initialized, not pruned.
            nonzero = self._comm.all_reduce(torch.tensor([int(torch.count_nonzero(w)) for w in locals_]))
            keeps = [
                w != 0 if int(nz) else torch.ones_like(w, dtype=torch.bool)
                for w, nz in zip(locals_, nonzero.tolist(), strict=True)
            ]
            keeps = self._broadcast(keeps)
        self.keeps = keeps
        step = trainer.global_step
        if self.schedule.is_update_step(step) and self.last_update_step != step:
            self._update(trainer, step)
        elif restored is None and step > self.schedule.start:
            rank_zero_warn(
                f"{OWNER} ({self.name!r}): the fit starts at optimizer step {step} (a resumed checkpoint) "
                f"without this plugin's state; the masks are computed now for the schedule's sparsity at "
                f"this step ({self.schedule.sparsity(step):.4g}), at once rather than gradually"
            )
            self._update(trainer, step)
        else:
            self._refresh_stats(step)
            self._zero_optimizer_state(trainer)
        self._apply()

    # ------------------------------------------------------------------ training

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer) -> None:
        """At the first batch: restore or build the masks (checkpoint weights and optimizer state are
        loaded by now) and apply them."""
        if not self._started and self.targets:
            self._start(trainer)

    @hookimpl
    def shrink_after_backward(self, trainer: pl.Trainer) -> None:
        """Movement criteria: set the scores' gradient from the weights' (every micro-batch)."""
        if self._started:
            self.criterion.after_backward()

    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, trainer: pl.Trainer) -> None:
        """With ``mask_gradients``: zero the gradients of pruned weights, after other plugins changed
        the gradients; then update the criterion's statistics (Taylor) from the final gradients."""
        if not self._started:
            if not self.targets:
                return
            self._start(trainer)
        if self.config.mask_gradients:
            self._mask_gradients()
        if self._base_grads is not None and self.criterion.reads_step_gradients:
            self._base_grads.average()
        self.criterion.before_optimizer_step()
        if self._base_grads is not None:
            self._base_grads.release()

    def _mask_gradients(self) -> None:
        grads, masks = [], []
        for i in self._active:
            grad = self.params[i].grad
            if grad is not None:
                grads.append(local_tensor(grad))
                masks.append(self.keeps[i])
        if grads:
            with torch.no_grad():
                torch._foreach_mul_(grads, masks)

    @hookimpl
    def shrink_after_optimizer_step(self, trainer: pl.Trainer) -> None:
        """Update the masks at schedule steps, then multiply them into the weights."""
        if not self._started:
            return
        step = trainer.global_step + 1
        if self.schedule is not None and self.schedule.is_update_step(step) and self.last_update_step != step:
            self._update(trainer, step)
        self._apply()

    def _apply(self) -> None:
        # One fused in-place multiply over all pruned parameters by their boolean masks (the one mask
        # a weight has: multiplying by a bool is bitwise the multiply by a 0/1 mask of the weight's dtype,
        # without a second copy of the masks; measured in benchmarks/bench_memory.py).
        if self._active:
            # Local shards are looked up every step: FSDP2 may re-create them after set-up.
            params = [local_tensor(self.params[i]) for i in self._active]
            for i, p in zip(self._active, params, strict=True):
                if self.keeps[i].device != p.device:
                    # Lightning's teardown moves the model back to the CPU before `on_fit_end`.
                    self.keeps[i] = self.keeps[i].to(p.device)
            with torch.no_grad():
                torch._foreach_mul_(params, [self.keeps[i] for i in self._active])

    def _update(self, trainer: pl.Trainer, step: int) -> None:
        """Recompute the masks for ``step``."""
        assert self.schedule is not None
        if self.criterion.needs_gradients and self.criterion.steps == 0 and self.schedule.sparsity(step) > 0:
            raise ValueError(
                f"{OWNER} ({self.name!r}): criterion={self.criterion.name!r} scores weights from their "
                f"gradients, and the mask update at step {step} (sparsity "
                f"{self.schedule.sparsity(step):.4g}) comes before any gradient was seen: the scores are all "
                "equal. Start pruning later or resume from a checkpoint written with this criterion"
            )
        new = list(self.keeps)
        with torch.no_grad():
            if self.group_specs is not None:
                new = structured_update(
                    self.group_specs,
                    self.targets,
                    self.params,
                    self.keeps,
                    self.schedule.sparsity(step, self.config.target_sparsity),
                    self.config.scope,
                    scores=self.criterion.scores(
                        list(range(len(self.targets))),
                        self.keeps,
                        [t.transposed for t in self.targets],
                        self.config.pattern,
                    ),
                )
            else:
                for indices in group_indices(self.targets).values():
                    final = self.targets[indices[0]].final_sparsity
                    transposed = [self.targets[i].transposed for i in indices]
                    keeps = [self.keeps[i] for i in indices]
                    masks = compute_masks(
                        [local_tensor(self.params[i]) for i in indices],
                        keeps,
                        transposed,
                        [self.params[i].numel() for i in indices],
                        self.schedule.sparsity(step, final),
                        self.config.pattern,
                        self._comm,
                        scores=self.criterion.scores(indices, keeps, transposed, self.config.pattern),
                    )
                    for i, m in zip(indices, masks, strict=True):
                        new[i] = m
        self.keeps = self._broadcast(new)
        self.last_update_step = step
        self.update_count += 1
        self._layers_pending = True
        self._refresh_stats(step)
        self._warn_emptied_layers(step)
        self._zero_optimizer_state(trainer)

    def _warn_emptied_layers(self, step: int) -> None:
        """A shared (global) threshold can remove a whole layer whose weights are all small, e.g. a
        head the pretrained checkpoint never trained; the model then silently loses that layer."""
        emptied = [
            name for name, s in self.layer_sparsity.items() if s >= 1.0 and name not in self._warned_emptied
        ]
        if not emptied:
            return
        self._warned_emptied.update(emptied)
        rank_zero_warn(
            f"{OWNER} ({self.name!r}): at step {step} the {self.config.scope} threshold removed every "
            f"weight of {', '.join(emptied)} (the layer now outputs its bias alone). If that is not "
            "intended, use scope='layer', cap it with sparsity_overrides={name: ...}, or list it in "
            "exclude_modules."
        )

    def _broadcast(self, keeps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Under DDP, every rank takes rank 0's masks (bitwise identical masks on all ranks)."""
        return broadcast_masks(keeps) if self._replicated_world > 1 else keeps

    def _refresh_stats(self, step: int) -> None:
        pruned = torch.tensor([int((~k).sum()) for k in self.keeps], dtype=torch.int64)
        self._pruned = self._comm.all_reduce(pruned).tolist()
        totals = [p.numel() for p in self.params]
        self.layer_sparsity = {
            t.name: c / n for t, c, n in zip(self.targets, self._pruned, totals, strict=True)
        }
        self.sparsity = sum(self._pruned) / sum(totals)
        assert self.schedule is not None
        self.target_now = self.schedule.sparsity(step) if step >= self.schedule.start else 0.0
        # The parameters that have pruned weights: their masks are enforced at every step.
        self._active = [i for i, k in enumerate(self.keeps) if not bool(k.all())]

    def _zero_optimizer_state(self, trainer: pl.Trainer) -> None:
        if not self._active:
            return
        with torch.no_grad():
            for optimizer in trainer.optimizers:
                state = optimizer.state
                for i in self._active:
                    entry = state.get(self.params[i])
                    if not entry:
                        continue
                    pruned = ~self.keeps[i]
                    for value in entry.values():
                        if isinstance(value, torch.Tensor):
                            local = local_tensor(value)
                            if local.shape == pruned.shape:
                                # At fit end Lightning has moved the optimizer state to the CPU.
                                local.masked_fill_(pruned.to(local.device), 0)

    # ------------------------------------------------------------------ visibility

    @hookimpl
    def shrink_metrics(self) -> dict[str, float] | None:
        """Log the actual and the scheduled sparsity, and each layer's at mask updates."""
        if not self._started:
            return None
        metrics = {self.key("sparsity"): self.sparsity, self.key("target_sparsity"): self.target_now}
        metrics.update({self.key(k): v for k, v in self.criterion.metrics().items()})
        if self._layers_pending and self.config.log_layer_sparsity:
            metrics.update({self.key(f"sparsity/{name}"): v for name, v in self.layer_sparsity.items()})
        self._layers_pending = False
        return metrics

    @hookimpl
    def shrink_progress_bar_metrics(self) -> dict[str, float] | None:
        """Show the actual and the scheduled sparsity."""
        if not self._started:
            return None
        return {
            self.key("sparsity"): round(self.sparsity, 4),
            self.key("target_sparsity"): round(self.target_now, 4),
        }

    @hookimpl
    def shrink_report_rows(self, model: nn.Module) -> list[ReportRow] | None:
        """Sparsity measured from the weights, overall and per layer; target, pattern, whether the target
        was reached."""
        if not self.targets or not self.params:
            return None
        reached = not self._shortfall() if self._pruned else None
        return report_rows(self.name, self.config, self.targets, self.params, model, reached)

    # ------------------------------------------------------------------ checkpoint and end

    @hookimpl
    def shrink_save_state(self, state: MutableMapping[str, Any]) -> None:
        """Save the masks, the schedule position and what a resume is compared with."""
        if not self._started:
            return
        state[self.name] = {
            "version": STATE_VERSION,
            **self._record(),
            "masks": {
                t.name: k.detach().cpu().clone() for t, k in zip(self.targets, self.keeps, strict=True)
            },
            "last_update_step": self.last_update_step,
            "update_count": self.update_count,
            "sharded": self._comm.sharded,
            "sparsity": self.sparsity,
            "pattern": str(self.config.pattern),
            "criterion": self.criterion.state_dict(),
        }

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer) -> None:
        """Apply the masks a last time, zero pruned weights' optimizer state; warn when the run ended
        short of the target."""
        if self._base_grads is not None:
            self._base_grads.restore()
        if not self._started:
            return
        self._apply()
        self._zero_optimizer_state(trainer)
        # Masks live in the weights' zeros now: the next fit starts from them.
        self._started = False
        short = self._shortfall()
        if short:
            assert self.schedule is not None
            rank_zero_warn(
                shortfall_warning(self.name, trainer.global_step, short, self.schedule, self.last_update_step)
            )

    @hookimpl
    def shrink_teardown(self) -> None:
        """Freeze again the LoRA base weights whose gradients a gradient criterion read."""
        if self._base_grads is not None:
            self._base_grads.restore()

    def _shortfall(self) -> list[str]:
        if self.group_specs is not None:
            return structured_shortfall(self.group_specs, self.targets, self.keeps, self.config.scope)
        return shortfall(self.targets, self.params, self._pruned, self.config)
