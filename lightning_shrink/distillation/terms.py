"""One training step's distillation terms: the teacher's run on the student's captured inputs (or
its cached logits) and the assembly of the weighted terms from both models' outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_shrink.distillation import losses
from lightning_shrink.distillation.cache import TeacherLogitCache, input_fingerprints
from lightning_shrink.distillation.capture import Capture, ForwardCapture, indexed_output, logits_of
from lightning_shrink.distillation.config import DistillationConfig, LayerKey
from lightning_shrink.distillation.projections import Projections, projection_key
from lightning_shrink.distillation.teacher import VocabularyGuard, run_teacher

__all__ = ["StepTerms"]


class StepTerms:
    """Computes a step's terms, ``{term: alpha * weight * loss}`` for the terms of ``config``.

    Args:
        config: The technique's configuration.
        capture: The hooks that recorded the student's call and the mapped layers.
        teacher: The module the teacher is called through (the teacher, or its inner model).
        output_request: What a transformers teacher is asked to return.
        guard: The vocabulary check run before the teacher.
        projections: The learned projections, or ``None`` when the widths match.
        cache: The teacher-logit cache, or ``None``.
    """

    def __init__(
        self,
        config: DistillationConfig,
        capture: ForwardCapture,
        teacher: nn.Module,
        output_request: dict[str, bool],
        guard: VocabularyGuard,
        projections: Projections | None,
        cache: TeacherLogitCache | None,
    ) -> None:
        self.config = config
        self.capture = capture
        self.teacher = teacher
        self.output_request = output_request
        self.guard = guard
        self.projections = projections
        self.cache = cache

    def __call__(
        self, call: Capture, batch: Any, alpha: float, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The terms for the student's ``call`` in this step, each already multiplied by ``alpha``
        and its weight; zeros without running the teacher when ``alpha`` is 0."""
        cfg = self.config
        if alpha == 0.0:
            zero = torch.zeros((), device=device)
            return dict.fromkeys(cfg.term_names, zero)
        student_logits = logits_of(call.output, "student", cfg.logits_fn) if cfg.kl_weight else None
        teacher_logits, teacher_out = self._teacher(call, batch, student_logits)
        mask = call.kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None
        terms: dict[str, torch.Tensor] = {}
        if student_logits is not None:
            kl_mask = mask if mask is not None and student_logits.dim() == 3 else None
            kl = losses.kl_divergence_loss(student_logits, teacher_logits, cfg.temperature, kl_mask)
            terms["kl"] = alpha * cfg.kl_weight * kl
        if cfg.uses_hidden:
            mse = cos = None
            for s_key, t_key in cfg.layer_map:
                s_h = self._hidden(call.output, s_key, "student")
                t_h = self._hidden(teacher_out, t_key, "teacher")
                key = projection_key(s_key)
                if self.projections is not None and key in self.projections:
                    s_h = self.projections[key](s_h)
                h_mask = mask if mask is not None and s_h.dim() == 3 else None
                if cfg.hidden_mse_weight:
                    value = losses.hidden_mse_loss(s_h, t_h, h_mask)
                    mse = value if mse is None else mse + value
                if cfg.hidden_cosine_weight:
                    value = losses.hidden_cosine_loss(s_h, t_h, h_mask)
                    cos = value if cos is None else cos + value
            n = len(cfg.layer_map)
            if mse is not None:
                terms["hidden_mse"] = alpha * cfg.hidden_mse_weight * mse / n
            if cos is not None:
                terms["hidden_cosine"] = alpha * cfg.hidden_cosine_weight * cos / n
        if cfg.attention_weight:
            total = None
            for s_key, t_key in cfg.attention_layer_map:
                s_a = indexed_output(call.output, "attentions", s_key, "student", "attention_layer_map")
                t_a = indexed_output(teacher_out, "attentions", t_key, "teacher", "attention_layer_map")
                value = losses.attention_loss(s_a, t_a)
                total = value if total is None else total + value
            terms["attention"] = alpha * cfg.attention_weight * total / len(cfg.attention_layer_map)
        return terms

    def _teacher(
        self, call: Capture, batch: Any, student_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, Any]:
        """The teacher's logits (cached or computed) and its output (``None`` on a cache hit)."""
        keys = fingerprints = None
        if self.cache is not None and student_logits is not None:
            batch_size = student_logits.shape[0]
            keys = self.cache.keys_for(batch, batch_size)
            fingerprints = input_fingerprints(call.args, call.kwargs, batch_size)
            cached = self.cache.lookup(keys, fingerprints)
            if cached is not None:
                return cached.to(student_logits.device), None
        self.guard.check_inputs(call.args, call.kwargs)
        with self.capture.teacher_call():
            output = run_teacher(
                self.teacher, call.args, call.kwargs, self.output_request, self.config.teacher_dtype
            )
        teacher_logits = None
        if student_logits is not None:
            teacher_logits = logits_of(output, "teacher", self.config.logits_fn)
            if self.cache is not None:
                losses.check_shapes("logits", student_logits, teacher_logits)
                self.cache.store(keys, teacher_logits, fingerprints)
        return teacher_logits, output

    def _hidden(self, output: Any, key: LayerKey, side: str) -> torch.Tensor:
        if isinstance(key, str):
            return self.capture.layer_output(side, key)
        return indexed_output(output, "hidden_states", key, side, "layer_map")
