"""The demo's compression recipe: the technique callbacks of the compressed fine-tune, built from a
:class:`~lightning_shrink.demo.config.DemoConfig`."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_shrink.demo.config import DemoConfig

__all__ = ["compression_callbacks"]


def compression_callbacks(cfg: DemoConfig, teacher: nn.Module | None) -> list[Any]:
    """The callbacks of ``cfg.techniques``, in the order pruning, quantization, distillation (the
    order does not matter to the hook system; it is the order of the printed description).

    Args:
        cfg: The run's configuration.
        teacher: The frozen dense model to distil from; needed when ``"distillation"`` is one of
            the techniques.
    """
    from lightning_shrink import GradualMagnitudePruning, KnowledgeDistillation, QuantizationAwareTraining

    callbacks: list[Any] = []
    if "pruning" in cfg.techniques:
        # Fractions of the run: prune from 5 % to 70 % of the steps, then let the model recover.
        # scope="layer": every layer reaches the target on its own. A global threshold removes
        # MiniLM's pooler entirely (its weights are the smallest: the sentence-transformers
        # checkpoint never trained it), and the classifier then sees a constant.
        callbacks.append(
            GradualMagnitudePruning(
                target_sparsity=cfg.sparsity,
                start_step=0.05,
                end_step=0.7,
                frequency=cfg.prune_frequency,
                scope="layer",
            )
        )
    if "quantization" in cfg.techniques:
        callbacks.append(
            QuantizationAwareTraining(
                weight_bits=8,
                activations="dynamic",
                embedding_bits=cfg.embedding_bits,
                embedding_group_size=cfg.embedding_group_size if cfg.embedding_bits == 4 else None,
            )
        )
    if "distillation" in cfg.techniques:
        if teacher is None:
            raise ValueError("compression_callbacks: distillation needs the `teacher`")
        callbacks.append(KnowledgeDistillation(teacher, temperature=cfg.temperature, alpha=cfg.alpha))
    return callbacks
