"""The hooks of knowledge distillation: :class:`DistillationPlugin`, one per
:class:`~lightning_shrink.KnowledgeDistillation` callback."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_shrink.distillation.cache import TeacherLogitCache
from lightning_shrink.distillation.capture import ForwardCapture
from lightning_shrink.distillation.config import OWNER, DistillationConfig
from lightning_shrink.distillation.layers import EagerAttention, check_layer_maps, layer_width, output_request
from lightning_shrink.distillation.projections import Projections, projection_key
from lightning_shrink.distillation.state import VERSION, describe_run, run_changes
from lightning_shrink.distillation.teacher import (
    VocabularyGuard,
    check_not_training,
    find_inner_model,
    freeze,
    load_teacher,
    place_teacher,
    teacher_identity,
)
from lightning_shrink.distillation.terms import StepTerms
from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning import TechniquePlugin
from lightning_shrink.types import ParamGroup, ReportRow

__all__ = ["DistillationPlugin"]


class DistillationPlugin(TechniquePlugin):
    """The hooks of :class:`~lightning_shrink.KnowledgeDistillation`.

    Args:
        config: The technique's configuration.

    Attributes:
        teacher: The frozen teacher (loaded at the first set-up when given as a path).
        teacher_target: The module the teacher is called through (its inner model for a
            LightningModule teacher).
        student_module: The model whose forward call is distilled into.
        projections: The learned projections (student width -> teacher width), or ``None``.
        cache: The teacher-logit cache, or ``None``.
    """

    default_name = "distillation"

    def __init__(self, config: DistillationConfig) -> None:
        super().__init__(config)
        self.config: DistillationConfig = config
        self.teacher: nn.Module | None = None
        self.teacher_target: nn.Module | None = None
        self.student_name = ""
        self.student_module: nn.Module | None = None
        self.projections: Projections | None = None
        self.cache = TeacherLogitCache(config.cache_key) if config.cache_key is not None else None
        self.capture = ForwardCapture(output_request(config))
        self.vocabulary = VocabularyGuard()
        self.attention = EagerAttention()
        self.alpha = 0.0
        self.last_terms: dict[str, torch.Tensor] = {}
        self._where = ""
        self._step_terms: StepTerms | None = None

    # ------------------------------------------------------------------ set-up

    # trylast: plugins that swap modules (quantization) do it first, so the hooks attach to the
    # final modules.
    @hookimpl(trylast=True)
    def shrink_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load and freeze the teacher, check layer maps and vocabularies, hook the student's call."""
        if stage != "fit":
            return
        cfg = self.config
        teacher = (
            self.teacher
            if self.teacher is not None
            else load_teacher(cfg.teacher, cfg.teacher_class, type(pl_module))
        )
        self.student_name, self.student_module = find_inner_model(pl_module, cfg.student, "student")
        self._where = (
            f"{type(pl_module).__name__}.{self.student_name}"
            if self.student_name
            else type(pl_module).__name__
        )
        # Check before freezing: a teacher that is the student must not get frozen.
        check_not_training(teacher, pl_module, self.student_module)
        self._check_shared_teacher()
        freeze(teacher, cfg.teacher_dtype if self.teacher is None else None)
        self.teacher = teacher
        self.teacher_target = self._target(teacher)
        check_layer_maps(cfg, self.student_module, self.teacher_target)
        self.vocabulary.attach(self.student_module, self.teacher_target)
        if cfg.attention_weight:
            self.attention.switch(self.student_module, self.teacher_target)
        self._build_projections()
        self.capture.attach(self.student_module, self.teacher_target, cfg.layer_map)
        place_teacher(teacher, pl_module, trainer.strategy, self.teacher_target)
        self._step_terms = StepTerms(
            cfg,
            self.capture,
            self.teacher_target,
            output_request(cfg),
            self.vocabulary,
            self.projections,
            self.cache,
        )

    def _target(self, teacher: nn.Module) -> nn.Module:
        if not isinstance(teacher, pl.LightningModule):
            return teacher
        if self.student_name:
            try:
                return teacher.get_submodule(self.student_name)
            except AttributeError:
                pass
        return find_inner_model(teacher, None, "teacher")[1]

    def _check_shared_teacher(self) -> None:
        teacher = self.config.teacher
        if not isinstance(teacher, nn.Module):
            return  # a path: every plugin loads its own copy
        for peer in self.peers():
            if peer.config.teacher is teacher and peer.config.teacher_dtype != self.config.teacher_dtype:
                (first, a), (second, b) = sorted(
                    [(self.name, self.config.teacher_dtype), (peer.name, peer.config.teacher_dtype)]
                )
                raise ValueError(
                    f"{OWNER}: plugins {first!r} and {second!r} share one teacher module but ask for "
                    f"different `teacher_dtype` ({a} and {b}); the teacher is converted in place, so one of "
                    "them would run in the other's dtype: give each its own copy (copy.deepcopy) or the "
                    "same `teacher_dtype`"
                )

    def _build_projections(self) -> None:
        cfg = self.config
        assert self.student_module is not None and self.teacher_target is not None
        widths = {}
        for s_key, t_key in cfg.layer_map if cfg.uses_hidden else ():
            s_width = layer_width(self.student_module, s_key, "student")
            t_width = layer_width(self.teacher_target, t_key, "teacher")
            if s_width != t_width:
                widths[projection_key(s_key)] = (s_width, t_width)
        if not widths:
            self.projections = None
            if cfg.projection_lr is not None or cfg.projection_weight_decay is not None:
                rank_zero_warn(
                    f"{OWNER} ({self.name}): `projection_lr`/`projection_weight_decay` are set, but every "
                    "layer of `layer_map` has the teacher's width, so there are no projections to train"
                )
            return
        # A second fit with the same models continues with the projections already learned.
        if self.projections is None or self.projections.widths != widths:
            self.projections = Projections(widths)

    # ------------------------------------------------------------------ fit

    @hookimpl
    def shrink_optimizer_param_groups(self, pl_module: pl.LightningModule) -> list[ParamGroup] | None:
        """Train the learned projections with their own lr / weight decay (default: the optimizer's)."""
        if self.projections is None:
            return None
        self.projections.to(device=pl_module.device)
        return self.projections.param_groups(self.config.projection_lr, self.config.projection_weight_decay)

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the teacher, refuse it in an optimizer, give every rank rank 0's projections."""
        assert self.teacher is not None
        place_teacher(self.teacher, pl_module, trainer.strategy, self.teacher_target)
        optimized = {
            id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]
        }
        for name, p in self.teacher.named_parameters():
            if id(p) in optimized:
                raise ValueError(
                    f"{OWNER}: the teacher's parameter {name!r} is in the optimizer of "
                    f"{type(pl_module).__name__}; the teacher must stay frozen"
                )
        if self.projections is not None:
            self.projections.broadcast_from_rank_zero()

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer) -> None:
        """Arm the student's capture and read this step's alpha."""
        self.capture.arm()
        self.alpha = self.config.alpha_at(trainer.global_step)

    @hookimpl
    def shrink_loss_weight(self) -> float:
        """Weight the task loss by 1 - alpha."""
        return 1.0 - self.alpha

    @hookimpl
    def shrink_training_loss(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        """Run the teacher on the student's captured inputs; return the alpha-weighted terms."""
        self.capture.armed = False
        try:
            assert self._step_terms is not None and self.student_module is not None
            call = self.capture.student_call(self._where, self.student_module)
            terms = self._step_terms(call, batch, self.alpha, pl_module.device)
        finally:
            self.capture.reset()
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return {self.key(name): value for name, value in terms.items()}

    @hookimpl
    def shrink_metrics(self) -> dict[str, float]:
        """Log alpha (and the cache's hit rate); disarm the capture."""
        # Called at the end of every training batch: disarm here too, so a training_step that
        # returned None (a skipped batch, no shrink_training_loss call) leaves nothing captured.
        self.capture.reset()
        metrics = {self.key("alpha"): self.alpha}
        if self.cache is not None:
            metrics[self.key("cache_hit_rate")] = self.cache.hit_rate
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _run(self, step: int) -> dict[str, Any]:
        assert self.teacher is not None
        return describe_run(self.config, self.student_name, teacher_identity(self.teacher), step)

    @hookimpl
    def shrink_save_state(self, trainer: pl.Trainer, state: MutableMapping[str, Any]) -> None:
        """Save the projections and a description of the run under the plugin's name."""
        if self.teacher is None:
            return
        step = trainer.global_step
        entry: dict[str, Any] = {"version": VERSION, "step": step, "run": self._run(step)}
        if self.projections is not None:
            entry["projections"] = self.projections.state()
        state[self.name] = entry

    @hookimpl
    def shrink_load_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a resume whose distillation differs from the checkpoint's; restore the projections."""
        if self.teacher is None:
            return  # not set up for fit
        entry = state.get(self.name)
        if entry is None:
            rank_zero_info(
                f"{OWNER} ({self.name}): the checkpoint holds no state of this plugin (it was written by a "
                "run without it); distillation starts with the resumed run"
            )
            saved_projections = None
        else:
            saved_run = entry.get("run")
            if saved_run is None:
                rank_zero_warn(
                    f"{OWNER} ({self.name}): the checkpoint was written by an older version that did not "
                    "record the distillation configuration; resuming without checking it"
                )
            else:
                changes = run_changes(saved_run, self._run(int(entry.get("step", 0))))
                if changes:
                    raise ValueError(
                        f"{OWNER} ({self.name}): cannot resume from this checkpoint, its distillation "
                        f"differs from this run's: {'; '.join(changes)}. Resume with the checkpoint's "
                        "configuration, or start a new fit from its weights (load its state_dict, without "
                        "`ckpt_path`)"
                    )
            saved_projections = entry.get("projections")
        if saved_projections and self.projections is None:
            raise ValueError(
                f"{OWNER} ({self.name}): the checkpoint holds learned projections for "
                f"{sorted({k.split('.')[0] for k in saved_projections})}, but this run needs none"
            )
        if self.projections is not None:
            if not saved_projections:
                raise ValueError(
                    f"{OWNER} ({self.name}): this run learns projections for {sorted(self.projections)}, but "
                    "the checkpoint holds none (its optimizer state could not match them)"
                )
            self.projections.load(saved_projections, self.name)

    # ------------------------------------------------------------------ report and end

    @hookimpl
    def shrink_report_rows(self) -> list[ReportRow]:
        """Report temperature, alpha, the terms and their last values, the teacher, the projections."""
        cfg, name = self.config, self.name
        rows = [
            ReportRow(name, "temperature", cfg.temperature),
            ReportRow(name, "alpha", self.alpha if self.last_terms else cfg.alpha_at(0), "last step"),
            ReportRow(name, "terms", ", ".join(cfg.term_names)),
        ]
        rows += [ReportRow(name, term, float(value), "last step") for term, value in self.last_terms.items()]
        if cfg.layer_map:
            rows.append(ReportRow(name, "layer_map", repr(dict(cfg.layer_map))))
        if cfg.attention_layer_map:
            rows.append(ReportRow(name, "attention_layer_map", repr(dict(cfg.attention_layer_map))))
        if self.teacher is not None:
            params = list(self.teacher.parameters())
            rows += [
                ReportRow(name, "teacher", type(self.teacher).__name__),
                ReportRow(name, "teacher parameters", sum(p.numel() for p in params)),
                ReportRow(name, "teacher dtype", ", ".join(sorted({str(p.dtype) for p in params}))),
            ]
        if self.projections is not None:
            rows.append(
                ReportRow(
                    name,
                    "projection parameters",
                    self.projections.parameter_count(),
                    ", ".join(self.projections),
                )
            )
        if self.cache is not None:
            rows.append(ReportRow(name, "cache hit rate", self.cache.hit_rate))
        return rows

    def _finalize(self) -> None:
        self.capture.detach()
        self.vocabulary.detach()
        self.attention.restore()

    @hookimpl
    def shrink_fit_end(self) -> None:
        """Remove the hooks and restore the attention implementation: a plain student again."""
        self._finalize()

    @hookimpl
    def shrink_teardown(self, stage: str) -> None:
        """Remove the hooks after a fit, also one that failed."""
        if stage == "fit":
            self._finalize()
