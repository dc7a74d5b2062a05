"""The knowledge-distillation callback: :class:`KnowledgeDistillation`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_shrink.distillation.cache import CacheKey
from lightning_shrink.distillation.config import DistillationConfig, LayerKey
from lightning_shrink.distillation.plugin import DistillationPlugin
from lightning_shrink.lightning import TechniqueCallback

__all__ = ["KnowledgeDistillation"]


class KnowledgeDistillation(TechniqueCallback):
    """Distil a teacher into the model being fine-tuned, without changing its ``training_step``.

    The loss becomes ``(1 - alpha) * task_loss + alpha * (kl_weight * KL + hidden_mse_weight * MSE +
    hidden_cosine_weight * (1 - cos) + attention_weight * attention MSE)``; each term is logged under
    the plugin's name, ``distillation/kl``, ``distillation/hidden_mse``... (``distillation-2/...`` for
    a second callback).

    How it works: when the model is configured (after ``configure_model``) a forward hook is put on
    the *student*, the model inside the LightningModule (the outermost transformers
    ``PreTrainedModel`` submodule, else the LightningModule itself; ``student=`` names another). The
    hook records the inputs and outputs of the forward call that ``training_step`` makes; right after
    ``training_step`` the teacher runs under ``torch.inference_mode`` on the same inputs and the loss
    terms are added. For modules where that cannot work (the student is called twice, or the teacher
    needs other inputs), call :meth:`KnowledgeDistillation.record` in ``training_step``.

    The teacher is frozen (``requires_grad=False``), in eval mode, kept on the plugin (never a
    submodule of the LightningModule, so never in its checkpoint or optimizer) and moved to the
    LightningModule's device. Learned projections (where a mapped student layer is narrower or wider
    than the teacher's) are the plugin's own tensors: added to the first optimizer as a parameter
    group of their own, saved in the plugin's checkpoint state, averaged across DDP ranks.

    Args:
        teacher: An ``nn.Module``, a LightningModule, a path to a Lightning checkpoint (loaded with
            ``teacher_class.load_from_checkpoint``) or a transformers model directory. A
            LightningModule teacher is called through its own inner model when it has one at the
            student's attribute path (or a transformers submodule).
        temperature: Softening temperature ``T > 0`` of the KL term (scaled by ``T**2``).
        alpha: Weight of the distillation terms in ``[0, 1]``; the task loss gets ``1 - alpha``. A
            callable ``global_step -> alpha`` schedules it.
        kl_weight: Weight of the logit KL divergence.
        hidden_mse_weight: Weight of the hidden-state MSE over ``layer_map``.
        hidden_cosine_weight: Weight of the hidden-state ``1 - cosine`` loss over ``layer_map``.
        attention_weight: Weight of the attention-map MSE over ``attention_layer_map``.
        layer_map: ``{student_layer: teacher_layer}`` for the hidden-state losses: indices into a
            transformers model's ``hidden_states`` (0 is the embeddings' output), or names of
            submodules whose outputs are compared (for any model). A learned linear projection maps
            the student's width to the teacher's where they differ.
        attention_layer_map: ``{student_layer: teacher_layer}`` indices into ``attentions``
            (transformers models; attention is switched to the eager implementation during ``fit``
            since SDPA returns no attention maps, and switched back at fit end).
        student: Dotted attribute path of the student inside the LightningModule (``""`` for the
            LightningModule itself); ``None`` chooses as described above.
        teacher_class: Class used to load a path teacher (a LightningModule class for a checkpoint,
            a transformers class for a directory).
        teacher_dtype: Run the teacher in this floating dtype (e.g. ``torch.bfloat16``).
        cache_key: Cache the teacher's logits per example, keyed by this batch field (e.g. the
            dataset index, ``"idx"``) or by a function ``batch -> keys``. Only with the KL term
            alone (hidden and attention terms need the teacher's forward anyway).
        logits_fn: Function ``model output -> logits`` for outputs that are neither a tensor, nor
            have ``.logits``/``["logits"]``, nor are a tuple with the logits first.
        projection_lr: Learning rate of the learned projections; ``None``: the optimizer's.
        projection_weight_decay: Weight decay of the learned projections; ``None``: the optimizer's.
        name: The plugin's registered name, the namespace of its loss terms, metrics, checkpoint state
            and report rows; ``None``: ``"distillation"`` (``"distillation-2"``... for further instances).

    Attributes:
        config: The validated :class:`~lightning_shrink.distillation.DistillationConfig`.
    """

    plugin_name = "distillation"

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike[str],
        temperature: float = 2.0,
        alpha: float | Callable[[int], float] = 0.5,
        *,
        kl_weight: float = 1.0,
        hidden_mse_weight: float = 0.0,
        hidden_cosine_weight: float = 0.0,
        attention_weight: float = 0.0,
        layer_map: Mapping[LayerKey, LayerKey] | None = None,
        attention_layer_map: Mapping[int, int] | None = None,
        student: str | None = None,
        teacher_class: type | None = None,
        teacher_dtype: torch.dtype | None = None,
        cache_key: CacheKey | None = None,
        logits_fn: Callable[[Any], torch.Tensor] | None = None,
        projection_lr: float | None = None,
        projection_weight_decay: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config = DistillationConfig(
            teacher=teacher,
            temperature=temperature,
            alpha=alpha,
            kl_weight=kl_weight,
            hidden_mse_weight=hidden_mse_weight,
            hidden_cosine_weight=hidden_cosine_weight,
            attention_weight=attention_weight,
            layer_map=layer_map if layer_map is not None else (),
            attention_layer_map=attention_layer_map if attention_layer_map is not None else (),
            student=student,
            teacher_class=teacher_class,
            teacher_dtype=teacher_dtype,
            cache_key=cache_key,
            logits_fn=logits_fn,
            projection_lr=projection_lr,
            projection_weight_decay=projection_weight_decay,
        )

    def make_plugin(self) -> DistillationPlugin:
        """The plugin that implements distillation's hooks, configured by :attr:`config`."""
        return DistillationPlugin(self.config)

    @staticmethod
    def record(pl_module: pl.LightningModule, student_output: Any, *args: Any, **kwargs: Any) -> None:
        """The one hook for modules that the automatic capture cannot serve.

        Call it in ``training_step`` with the student's output and the inputs to give the teacher::

            out = self.model(**batch)
            KnowledgeDistillation.record(self, out, **batch)

        A recorded call takes precedence over what the forward hook captured in that step; use it
        when the student is called more than once per step, or when the teacher must get other
        inputs than the student. Outside a distillation ``fit``'s ``training_step`` it does nothing.
        """
        trainer = _attached_trainer(pl_module)
        if trainer is None:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, KnowledgeDistillation) and callback._plugin is not None:
                capture = callback._plugin.capture
                if capture.armed:
                    capture.record(student_output, args, kwargs)


def _attached_trainer(module: Any) -> pl.Trainer | None:
    """The Trainer a LightningModule is attached to, or ``None``."""
    if not isinstance(module, pl.LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None
