"""What the per-sample gradient engines need to know about a layer.

* **Its trained parameters** (:func:`trainable_direct`) and whether a per-layer rule covers them all
  (:func:`uncovered_parameters`): the rules of linear, embedding, normalization and convolution
  layers compute the gradients of ``weight`` and ``bias`` only, so a further parameter registered
  on such a layer would get no per-sample gradient.
* **Which dimension of its input indexes the examples** (:func:`batch_dim`). With
  ``batch_first=True`` it is the first. With ``batch_first=False`` (time-major models, the default
  layout of ``nn.RNN`` and ``nn.Transformer``) an input with two or more leading dimensions (the
  dimensions before a layer's feature dimensions) is ``(T, B, ...)`` and has its examples in the
  second; an input with one leading dimension, such as a classifier head on pooled ``(B, D)``
  features, has them in the first. Convolutions and channel normalizations always take
  ``(B, C, ...)``. The engines check every step that this dimension has exactly as many entries as
  the batch has examples.
* **The tensor its weight multiplies** (:func:`weight_input`): the input itself, or for a layer
  that :class:`~lightning_shrink.QuantizationAwareTraining` fake-quantizes, the fake-quantized
  input. The straight-through estimator passes gradients through the rounding unchanged, so a
  fake-quantized layer's per-example weight gradient is the float layer's rule applied to that
  input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "RULE_PARAMETERS",
    "SharedIndexExpander",
    "batch_dim",
    "trainable_direct",
    "uncovered_parameters",
    "weight_input",
]

#: The parameters a per-layer rule (Opacus' or the ghost engine's) computes gradients for.
RULE_PARAMETERS: tuple[str, ...] = ("weight", "bias")

# Layers whose input is (B, C, ...) whatever the model's layout: only the first dimension is leading.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.EmbeddingBag,
)


def trainable_direct(module: nn.Module) -> list[nn.Parameter]:
    """The parameters registered on ``module`` itself (not on its children) that require grad."""
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def uncovered_parameters(module: nn.Module) -> list[str]:
    """Names of trainable parameters of ``module`` that a per-layer rule does not compute."""
    return [
        n for n, p in module.named_parameters(recurse=False) if p.requires_grad and n not in RULE_PARAMETERS
    ]


def _feature_dims(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, _CHANNELS_FIRST):
        return x.dim() - 1
    if isinstance(module, nn.Embedding):
        return 0
    normalized = getattr(module, "normalized_shape", None)  # LayerNorm, RMSNorm
    if isinstance(normalized, tuple):
        return len(normalized)
    return 1


def batch_dim(module: nn.Module, x: torch.Tensor, batch_first: bool) -> int:
    """The dimension of ``x``, an input of ``module``, that indexes the examples (see above)."""
    if batch_first or x.dim() == 0:
        return 0
    return 1 if x.dim() - _feature_dims(module, x) >= 2 else 0


def is_fake_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a layer prepared by quantization-aware training."""
    from lightning_shrink.quantization import is_prepared

    return is_prepared(module)


def weight_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor ``module``'s weight multiplies when ``module`` is called on ``x``.

    For a fake-quantized linear layer or convolution this recomputes what its forward computed
    from ``x`` (``_fake_input`` of :mod:`lightning_shrink.quantization.fake_layers`, which updates
    nothing for the weight-only and dynamic settings :mod:`lightning_shrink.privacy.checks`
    allows); every other layer's weight multiplies ``x`` itself.
    """
    fake_input = getattr(module, "_fake_input", None)
    if fake_input is not None and is_fake_quantized(module):
        with torch.no_grad():
            return fake_input(x)
    return x


class SharedIndexExpander:
    """A forward pre-hook for trainable ``nn.Embedding`` layers that expands an index shared by the
    batch to one row per example.

    transformers' BERT-style embeddings look positions up with a ``(1, T)`` index shared by every
    example of the batch; per-example gradients need the lookup per example, so such an index is
    expanded along the batch dimension to :attr:`examples` (the current batch's number of
    examples, which the plugin sets every batch). Validation forwards (no autograd) are untouched.
    """

    def __init__(self, batch_first: bool) -> None:
        self.batch_first = batch_first
        self.examples = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not torch.is_grad_enabled():
            return None
        index = args[0]
        if not isinstance(index, torch.Tensor) or index.dim() == 0:
            return None
        dim = batch_dim(module, index, self.batch_first)
        if index.shape[dim] != 1 or self.examples == 1:
            return None
        shape = list(index.shape)
        shape[dim] = self.examples
        return (index.expand(*shape), *args[1:])
