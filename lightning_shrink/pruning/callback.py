"""The :class:`GradualMagnitudePruning` callback and the plugin that does the work."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning.technique import TechniqueCallback, TechniquePlugin
from lightning_shrink.pruning.masks import (
    Comm,
    Pattern,
    check_divides,
    compute_masks,
    is_dtensor,
    local_tensor,
    parse_pattern,
)
from lightning_shrink.pruning.schedule import SCHEDULES, PruningSchedule, resolve_step
from lightning_shrink.pruning.selection import PruneTarget, select_targets
from lightning_shrink.types import ReportRow

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

__all__ = ["GradualMagnitudePruning", "PruningPlugin"]

_STATE_VERSION = 1
_SCOPES = ("global", "layer")


def _check_sparsity(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{argument}` must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_step(value: Any, argument: str, allow_zero: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{argument}` must be an int (optimizer steps) or a float fraction in (0, 1], got {value!r}"
        )
    if isinstance(value, int):
        if value < (0 if allow_zero else 1):
            raise ValueError(
                f"`{argument}` must be {'>= 0' if allow_zero else '>= 1'} optimizer steps, got {value}"
            )
        return value
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"`{argument}` as a float is a fraction of the run's optimizer steps and must be in "
            f"{'[0, 1]' if allow_zero else '(0, 1]'}, got {value!r}"
        )
    return value


class GradualMagnitudePruning(TechniqueCallback):
    r"""Prune weights by magnitude while the model is fine-tuned, gradually, following a schedule.

    After every real optimizer step the masks are re-applied in place (``weight *= mask``), so
    pruned weights stay exactly zero while parameter names and ``state_dict`` keys do not change:
    the trained model loads with a plain ``load_state_dict``. The optimizer state of pruned weights
    (momentum, Adam moments) is zeroed whenever the masks change and at fit end, so the optimizer
    cannot revive them (``mask_gradients=True`` keeps it zero at every step). Masks are recomputed from the
    weights' magnitudes only at update steps; masks never shrink during a run (a pruned weight stays
    pruned).

    Args:
        target_sparsity: Final fraction of zeros in the selected weights, in ``[0, 1)``. For an
            ``"N:M"`` pattern it must equal ``1 - N/M``.
        initial_sparsity: Sparsity at ``start_step`` (``"cubic"``, ``"linear"``).
        start_step: First mask update, after that many optimizer steps (``0``: before the first
            step). An ``int`` counts optimizer steps (not batches: with ``accumulate_grad_batches``
            a step is several batches); a ``float`` in ``[0, 1]`` is a fraction of the run's total
            optimizer steps (``trainer.estimated_stepping_batches``), resolved when fit starts.
        end_step: The step at which ``target_sparsity`` is reached; ``int`` or fraction as above.
            ``None``: the last step of the run. Ending before the run ends (e.g. ``0.75``) leaves
            steps for the model to recover.
        frequency: Optimizer steps between mask updates (``int``), or a fraction of the run's steps
            (``float``). Default ``0.02``: about 50 updates over a run.
        schedule: ``"cubic"`` (Zhu & Gupta 2017:
            :math:`s_t = s_f + (s_i - s_f)(1 - \frac{t - t_0}{n\Delta t})^3`), ``"linear"``,
            ``"constant"`` (one shot at ``start_step``) or a callable ``step -> sparsity``.
        pattern: ``"unstructured"``; ``"N:M"`` semi-structured (``"2:4"``, ``"4:8"``...): at most
            **N non-zero weights kept** in every group of M consecutive weights along the input
            dimension, PyTorch's ``to_sparse_semi_structured`` layout (``"2:4"`` = 2 of every 4
            kept, 50% sparsity); or ``"rows"``: whole output rows (output units / channels), scored
            by their root-mean-square.
        scope: ``"global"``: one magnitude threshold across all selected weights, or ``"layer"``:
            every weight reaches the scheduled sparsity on its own.
        modules: Glob patterns (``fnmatch``) of the qualified module names to prune, e.g.
            ``["model.bert.encoder.*"]``. ``None``: every module of ``module_types`` except the
            output layer (the last selected module, and the model's ``get_output_embeddings()``)
            and weights tied to modules of other types (embeddings). With explicit ``modules``
            every matching module is pruned, the output layer included.
        exclude_modules: Glob patterns of module names never to prune.
        module_types: Module classes to prune. ``None``: ``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d``, ``nn.Conv3d`` and transformers' ``Conv1D`` (GPT-2). Add
            ``nn.Embedding`` to prune embeddings.
        parameter_names: Names of the parameters to prune within a selected module. Default
            ``("weight",)``; biases and norms are not pruned unless named here. Frozen
            parameters (``requires_grad=False``, e.g. a teacher) are never pruned.
        prune_output_layer: Also prune the output layer when ``modules`` is ``None``.
        sparsity_overrides: Glob pattern of module names to that module's own final sparsity, e.g.
            ``{"*.attention.*": 0.5}``. Overridden modules get their own threshold and follow the
            same schedule to their own target.
        log_layer_sparsity: Log each layer's sparsity (``pruning/sparsity/<name>``) at every mask
            update, in addition to the overall ``pruning/sparsity``.
        mask_gradients: Also zero the gradients of pruned weights before every optimizer step, so
            that their optimizer state (momentum, Adam moments) stays exactly zero at all times, not
            only after each mask update and at fit end. Costs a second multiply per step; useful
            with optimizers that mix coordinates (L-BFGS) or when inspecting optimizer state.
        name: The plugin's registered name, the namespace of its metrics, checkpoint state and report
            rows; ``None``: ``"pruning"`` (``"pruning-2"``... for further instances).

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(0.8, end_step=0.75)])
        trainer.fit(model)
        torch.save(model.state_dict(), "pruned.pt")  # plain keys, zeros where pruned
    """

    plugin_name = "pruning"

    def __init__(
        self,
        target_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int | float = 0,
        end_step: int | float | None = None,
        frequency: int | float = 0.02,
        schedule: str | Callable[[int], float] = "cubic",
        pattern: str = "unstructured",
        scope: str = "global",
        modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] = (),
        module_types: Sequence[type[nn.Module]] | None = None,
        parameter_names: str | Sequence[str] = ("weight",),
        prune_output_layer: bool = False,
        sparsity_overrides: Mapping[str, float] | None = None,
        log_layer_sparsity: bool = True,
        mask_gradients: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.target_sparsity = _check_sparsity(target_sparsity, "target_sparsity")
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.target_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must not exceed "
                f"`target_sparsity` ({target_sparsity})"
            )
        self.start_step = _check_step(start_step, "start_step", allow_zero=True)
        self.end_step = None if end_step is None else _check_step(end_step, "end_step", allow_zero=False)
        self.frequency = _check_step(frequency, "frequency", allow_zero=False)
        if (
            self.end_step is not None
            and type(self.end_step) is type(self.start_step)
            and self.end_step <= self.start_step
            and schedule != "constant"
        ):
            raise ValueError(f"`end_step` ({end_step}) must be after `start_step` ({start_step})")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(
                f"`schedule` must be one of {list(SCHEDULES)} or a callable step -> sparsity, "
                f"got {schedule!r}"
            )
        self.schedule = schedule
        self.pattern: Pattern = parse_pattern(pattern)
        if self.pattern.sparsity is not None and abs(self.pattern.sparsity - self.target_sparsity) > 1e-9:
            raise ValueError(
                f"`pattern='{pattern}'` keeps {self.pattern.n} of every {self.pattern.m} weights, i.e. "
                f"sparsity {self.pattern.sparsity:g}; `target_sparsity` is {target_sparsity} "
                f"(set it to {self.pattern.sparsity:g})"
            )
        if scope not in _SCOPES:
            raise ValueError(f"`scope` must be one of {list(_SCOPES)}, got {scope!r}")
        self.scope = scope
        self.modules = (
            [modules] if isinstance(modules, str) else (list(modules) if modules is not None else None)
        )
        if self.modules is not None and not self.modules:
            raise ValueError("`modules` is empty; pass None for the default selection")
        self.exclude_modules = (
            [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        )
        if module_types is not None:
            module_types = tuple(module_types)
            if not module_types or not all(isinstance(t, type) for t in module_types):
                raise TypeError(
                    f"`module_types` must be a non-empty sequence of module classes, got {module_types!r}"
                )
        self.module_types = module_types
        self.parameter_names = (
            (parameter_names,) if isinstance(parameter_names, str) else tuple(parameter_names)
        )
        if not self.parameter_names:
            raise ValueError("`parameter_names` must name at least one parameter, e.g. ('weight',)")
        self.prune_output_layer = bool(prune_output_layer)
        overrides = dict(sparsity_overrides or {})
        for key, value in overrides.items():
            _check_sparsity(value, f"sparsity_overrides[{key!r}]")
        if overrides and self.pattern.kind == "nm":
            raise ValueError(
                "`sparsity_overrides` cannot be combined with an N:M `pattern` (its sparsity is fixed)"
            )
        if overrides and callable(schedule) and self.target_sparsity == 0.0:
            raise ValueError(
                "`sparsity_overrides` with a callable `schedule` needs `target_sparsity` > 0 (for scaling)"
            )
        self.sparsity_overrides = {k: float(v) for k, v in overrides.items()}
        self.log_layer_sparsity = bool(log_layer_sparsity)
        self.mask_gradients = bool(mask_gradients)

    def make_plugin(self) -> PruningPlugin:
        return PruningPlugin(self)

    # Convenience accessors for users and tests ------------------------------------------------

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-masks (``True`` = kept), by qualified parameter name (local shards
        under FSDP2)."""
        return self.plugin.masks

    @property
    def sparsity(self) -> float:
        """The selected weights' sparsity after the last mask update."""
        return self.plugin.sparsity


class PruningPlugin(TechniquePlugin):
    """The hook implementations of :class:`GradualMagnitudePruning` (registered as ``"pruning"``)."""

    default_name = "pruning"

    def __init__(self, config: GradualMagnitudePruning) -> None:
        super().__init__(config)
        self.targets: list[PruneTarget] = []
        self.params: list[torch.nn.Parameter] = []
        self.keeps: list[torch.Tensor] = []
        self.schedule: PruningSchedule | None = None
        self.last_update_step: int | None = None
        self.update_count = 0
        self.sparsity = 0.0
        self.target_now = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self._warned_emptied: set[str] = set()
        self._restored: Mapping[str, Any] | None = None
        self._started = False
        self._layers_pending = False
        self._active: list[int] = []
        self._active_masks: list[torch.Tensor] = []
        self._comm = Comm()
        self._replicated_world = 1

    # ------------------------------------------------------------------ public state

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {t.name: k for t, k in zip(self.targets, self.keeps, strict=True)}

    # ------------------------------------------------------------------ set-up

    @hookimpl
    def shrink_load_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]
    ) -> None:
        saved = state.get(self.name)
        self._restored = saved if saved else None

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg = self.config
        self.targets = select_targets(
            pl_module,
            module_types=cfg.module_types,
            modules=cfg.modules,
            exclude_modules=cfg.exclude_modules,
            parameter_names=cfg.parameter_names,
            prune_output_layer=cfg.prune_output_layer,
            scope=cfg.scope,
            target_sparsity=cfg.target_sparsity,
            sparsity_overrides=cfg.sparsity_overrides,
        )
        named = dict(pl_module.named_parameters(remove_duplicate=False))
        self.params = [named[t.name] for t in self.targets]
        sharded = [is_dtensor(p) for p in self.params]
        for t, p in zip(self.targets, self.params, strict=True):
            check_divides(p.shape, t.transposed, cfg.pattern, t.name)
        if any(sharded):
            self._comm = self._sharded_comm(self.params)
            self._replicated_world = 1
        else:
            self._comm = Comm()
            ddp = dist.is_available() and dist.is_initialized()
            self._replicated_world = dist.get_world_size() if ddp else 1
        self.schedule = self._resolve_schedule(trainer)
        self.keeps = []
        self._active, self._active_masks = [], []
        self._started = False

    def _sharded_comm(self, params: Sequence[torch.Tensor]) -> Comm:
        from torch.distributed.tensor import Shard

        mesh = None
        for t, p in zip(self.targets, params, strict=True):
            if not is_dtensor(p):
                raise ValueError(
                    f"GradualMagnitudePruning: {t.name!r} is not sharded while others are (FSDP2)"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"GradualMagnitudePruning supports parameters sharded on dim 0 over a 1-D mesh (FSDP2 "
                    f"fully_shard); {t.name!r} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
                )
            if t.transposed and self.config.pattern.kind != "unstructured":
                raise ValueError(
                    f"`pattern='{self.config.pattern}'` on the sharded transformers Conv1D {t.name!r}: its "
                    "input dimension is the sharded one; use pattern='unstructured' or shard differently"
                )
            mesh = p.device_mesh if mesh is None else mesh
        return Comm(group=mesh.get_group(), sharded=True)

    def _resolve_schedule(self, trainer: pl.Trainer) -> PruningSchedule:
        cfg = self.config
        total = float(trainer.estimated_stepping_batches)
        start = resolve_step(cfg.start_step, total, "start_step")
        end_label = "end_step" if cfg.end_step is not None else "end_step (None: the whole run)"
        end = resolve_step(cfg.end_step if cfg.end_step is not None else 1.0, total, end_label, minimum=1)
        frequency = resolve_step(cfg.frequency, total, "frequency", minimum=1)
        if cfg.schedule != "constant" and end <= start:
            raise ValueError(
                f"`end_step` resolves to step {end}, not after `start_step` (step {start}) "
                f"for a run of {total:g} optimizer steps"
            )
        last = start if cfg.schedule == "constant" else end
        if math.isfinite(total) and last > total:
            rank_zero_warn(
                f"GradualMagnitudePruning: the schedule's last mask update is at optimizer step {last}, "
                "after "
                f"the run's {int(total)} steps; `target_sparsity` will not be reached"
            )
        return PruningSchedule(cfg.schedule, cfg.initial_sparsity, cfg.target_sparsity, start, end, frequency)

    def _start(self, trainer: pl.Trainer) -> None:
        """First batch of the fit: the checkpoint (if any) and the optimizer state are restored."""
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
            elif saved:
                rank_zero_warn(
                    "GradualMagnitudePruning: the checkpoint's masks do not match the selected parameters; "
                    "masks are rebuilt from the restored weights' zeros"
                )
            self.last_update_step = restored.get("last_update_step")
            self.update_count = int(restored.get("update_count", 0))
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
        if self.schedule is not None and self.schedule.is_update_step(step) and self.last_update_step != step:
            self._update(trainer, step)
        else:
            self._refresh_stats(step)
            self._zero_optimizer_state(trainer)
        self._apply()

    # ------------------------------------------------------------------ training

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer) -> None:
        if not self._started and self.targets:
            self._start(trainer)

    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, trainer: pl.Trainer) -> None:
        if not self.config.mask_gradients:
            return
        if not self._started:
            if not self.targets:
                return
            self._start(trainer)
        grads, masks = [], []
        for i, mask in zip(self._active, self._active_masks, strict=True):
            grad = self.params[i].grad
            if grad is not None:
                grads.append(local_tensor(grad))
                masks.append(mask)
        if grads:
            with torch.no_grad():
                torch._foreach_mul_(grads, masks)

    @hookimpl
    def shrink_after_optimizer_step(self, trainer: pl.Trainer) -> None:
        if not self._started:
            return
        step = trainer.global_step + 1
        if self.schedule is not None and self.schedule.is_update_step(step) and self.last_update_step != step:
            self._update(trainer, step)
        self._apply()

    def _apply(self) -> None:
        # One fused in-place multiply over all pruned parameters, by masks of the parameters' own
        # dtype: the vectorized path (bool masks take PyTorch's slower casting path, masked_fill_
        # is slower still on CPU; measured in benchmarks/bench_pruning.py).
        if self._active:
            # Local shards are looked up every step: FSDP2 may re-create them after set-up.
            params = [local_tensor(self.params[i]) for i in self._active]
            if self._active_masks[0].device != params[0].device:
                # Lightning's teardown moves the model back to the CPU before `on_fit_end`.
                self._active_masks = [m.to(p.device) for m, p in zip(self._active_masks, params, strict=True)]
            with torch.no_grad():
                torch._foreach_mul_(params, self._active_masks)

    def _update(self, trainer: pl.Trainer, step: int) -> None:
        """Recompute the masks for ``step``."""
        assert self.schedule is not None
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.targets):
            groups.setdefault(t.group, []).append(i)
        new = list(self.keeps)
        with torch.no_grad():
            for indices in groups.values():
                final = self.targets[indices[0]].final_sparsity
                sparsity = self.schedule.sparsity(step, final)
                masks = compute_masks(
                    [local_tensor(self.params[i]) for i in indices],
                    [self.keeps[i] for i in indices],
                    [self.targets[i].transposed for i in indices],
                    [self.params[i].numel() for i in indices],
                    sparsity,
                    self.config.pattern,
                    self._comm,
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
            f"GradualMagnitudePruning: at step {step} the {self.config.scope} threshold removed every "
            f"weight of {', '.join(emptied)} (the layer now outputs its bias alone). If that is not "
            "intended, use scope='layer', cap it with sparsity_overrides={name: ...}, or list it in "
            "exclude_modules."
        )

    def _broadcast(self, keeps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Under DDP, every rank takes rank 0's masks (bitwise identical masks on all ranks)."""
        if self._replicated_world <= 1:
            return keeps
        flat = torch.cat([k.reshape(-1) for k in keeps]).to(torch.uint8)
        backend = dist.get_backend()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        flat = flat.to(device)
        dist.broadcast(flat, src=0)
        out, offset = [], 0
        for k in keeps:
            n = k.numel()
            out.append(flat[offset : offset + n].view(k.shape).to(device=k.device, dtype=torch.bool))
            offset += n
        return out

    def _refresh_stats(self, step: int) -> None:
        pruned = torch.tensor([int((~k).sum()) for k in self.keeps], dtype=torch.int64)
        pruned = self._comm.all_reduce(pruned)
        totals = [p.numel() for p in self.params]
        self.layer_sparsity = {
            t.name: int(c) / n for t, c, n in zip(self.targets, pruned.tolist(), totals, strict=True)
        }
        self.sparsity = int(pruned.sum()) / sum(totals)
        assert self.schedule is not None
        self.target_now = self.schedule.sparsity(step) if step >= self.schedule.start else 0.0
        # The parameters that have pruned weights, and their masks in the parameters' dtype: what is
        # enforced at every step.
        self._active = [i for i, k in enumerate(self.keeps) if not bool(k.all())]
        self._active_masks = [self.keeps[i].to(self.params[i].dtype) for i in self._active]

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
        if not self._started:
            return None
        metrics = {self.key("sparsity"): self.sparsity, self.key("target_sparsity"): self.target_now}
        if self._layers_pending and self.config.log_layer_sparsity:
            metrics.update({self.key(f"sparsity/{name}"): v for name, v in self.layer_sparsity.items()})
        self._layers_pending = False
        return metrics

    @hookimpl
    def shrink_progress_bar_metrics(self) -> dict[str, float] | None:
        if not self._started:
            return None
        return {
            self.key("sparsity"): round(self.sparsity, 4),
            self.key("target_sparsity"): round(self.target_now, 4),
        }

    @hookimpl
    def shrink_report_rows(self, trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
        if not self.targets or not self.params:
            return None
        by_id = {id(p): t for t, p in zip(self.targets, self.params, strict=True)}
        rows: list[ReportRow] = []
        zeros = total = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = by_id.get(id(p))
                if t is None:
                    continue
                w = local_tensor(p)
                z = w.numel() - int(torch.count_nonzero(w))
                zeros += z
                total += w.numel()
                rows.append(ReportRow(self.name, "sparsity", z / w.numel() if w.numel() else 0.0, name))
        if not rows:
            return None
        head = [
            ReportRow(self.name, "sparsity", zeros / total, "pruned layers"),
            ReportRow(self.name, "target sparsity", self.config.target_sparsity, "pruned layers"),
            ReportRow(self.name, "pattern", str(self.config.pattern), "pruned layers"),
            ReportRow(self.name, "pruned layers", len(rows), ""),
        ]
        return head + rows

    # ------------------------------------------------------------------ checkpoint and end

    @hookimpl
    def shrink_save_state(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        if not self._started:
            return
        state[self.name] = {
            "version": _STATE_VERSION,
            "masks": {
                t.name: k.detach().cpu().clone() for t, k in zip(self.targets, self.keeps, strict=True)
            },
            "last_update_step": self.last_update_step,
            "update_count": self.update_count,
            "sharded": self._comm.sharded,
            "sparsity": self.sparsity,
            "pattern": str(self.config.pattern),
            "schedule": {
                "start": self.schedule.start if self.schedule else None,
                "end": self.schedule.end if self.schedule else None,
                "frequency": self.schedule.frequency if self.schedule else None,
            },
        }

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer) -> None:
        if not self._started:
            return
        self._apply()
        self._zero_optimizer_state(trainer)
        # Masks live in the weights' zeros now: the next fit starts from them.
        self._started = False
