"""Knowledge distillation: :class:`KnowledgeDistillation`, its losses and its teacher-logit cache."""

from lightning_shrink.distillation.cache import TeacherLogitCache
from lightning_shrink.distillation.callback import (
    PROJECTIONS_ATTRIBUTE,
    DistillationPlugin,
    KnowledgeDistillation,
    Projection,
)
from lightning_shrink.distillation.losses import (
    attention_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kl_divergence_loss,
)

__all__ = [
    "PROJECTIONS_ATTRIBUTE",
    "DistillationPlugin",
    "KnowledgeDistillation",
    "Projection",
    "TeacherLogitCache",
    "attention_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "kl_divergence_loss",
]
