"""Knowledge distillation: :class:`KnowledgeDistillation`, its configuration, plugin, losses and
teacher-logit cache.

One job per module: ``config`` (the validated configuration), ``teacher`` (loading, freezing,
placing and running the teacher), ``layers`` (layer maps against the models), ``capture`` (what the
student and the teacher computed), ``projections`` (the learned width maps), ``terms`` (one step's
loss terms), ``losses`` (the loss functions), ``cache`` (teacher logits per example), ``state``
(checkpoint state and the resume check), ``plugin`` (the hooks) and ``callback`` (the callback).
"""

from lightning_shrink.distillation.cache import TeacherLogitCache
from lightning_shrink.distillation.callback import KnowledgeDistillation
from lightning_shrink.distillation.config import DistillationConfig
from lightning_shrink.distillation.losses import (
    attention_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kl_divergence_loss,
)
from lightning_shrink.distillation.plugin import DistillationPlugin
from lightning_shrink.distillation.projections import Projection, Projections

__all__ = [
    "DistillationConfig",
    "DistillationPlugin",
    "KnowledgeDistillation",
    "Projection",
    "Projections",
    "TeacherLogitCache",
    "attention_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "kl_divergence_loss",
]
