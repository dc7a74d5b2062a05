"""The distillation losses, as plain functions of student and teacher tensors.

Every function checks that the student's and the teacher's tensors have the same shape and names
both shapes when they differ. ``mask`` arguments take a ``(batch, sequence)`` tensor of ones for
real tokens and zeros for padding (a transformers ``attention_mask``); positions where it is zero
do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_loss", "check_shapes", "hidden_cosine_loss", "hidden_mse_loss", "kl_divergence_loss"]


def check_shapes(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ``ValueError`` naming both shapes when the student's and the teacher's tensors differ."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"KnowledgeDistillation: {what} of the student have shape {tuple(student.shape)} but those of "
            f"the teacher have shape {tuple(teacher.shape)}; they must match"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (one value per position, shape ``(batch, ...)``) over unmasked positions."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def kl_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton's distillation loss: ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``.

    The KL divergence is taken over the last dimension (the classes or the vocabulary) and averaged
    over all other positions (examples, or tokens of a language model, where ``mask`` selects the
    real tokens). The ``T**2`` factor keeps the gradient's magnitude independent of the
    temperature, so ``alpha`` means the same at every temperature.

    Args:
        student_logits: ``(..., classes)``; gradients flow into it.
        teacher_logits: Same shape; treated as a constant.
        temperature: Softening temperature ``T > 0``.
        mask: Optional ``(...)`` mask over the positions (the logits' shape without the last dim).
    """
    check_shapes("logits", student_logits, teacher_logits)
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return _masked_mean(kl, mask) * (t * t)


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between hidden states ``(..., width)``, averaged over the features and
    the (unmasked) positions. Project the student's states first when the widths differ."""
    check_shapes("hidden states (after projection)", student_hidden, teacher_hidden)
    per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return _masked_mean(per_position, mask)


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - cosine similarity`` of hidden states along the last dimension, averaged over the
    (unmasked) positions."""
    check_shapes("hidden states (after projection)", student_hidden, teacher_hidden)
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, mask)


def attention_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """Attention-map transfer: mean squared error between attention probabilities
    ``(batch, heads, query, key)``.

    When the student and the teacher have different numbers of heads, both maps are first averaged
    over their heads (so any head counts can be mapped); otherwise head ``h`` matches head ``h``.
    """
    if (
        student_attention.dim() == 4
        and teacher_attention.dim() == 4
        and student_attention.shape[1] != teacher_attention.shape[1]
    ):
        student_attention = student_attention.mean(1)
        teacher_attention = teacher_attention.mean(1)
    check_shapes("attention maps", student_attention, teacher_attention)
    return (student_attention.float() - teacher_attention.float()).pow(2).mean()
