"""Quantization-aware training and conversion to int8.

- :class:`QuantizationAwareTraining`: the callback; prepares layers in ``setup`` (fake quantization
  with straight-through gradients).
- :func:`prepare_qat`: the same preparation without a Trainer.
- :mod:`lightning_shrink.quantization.hooks`: the built-in plugin that converts (int8 layers),
  exports and loads; :func:`lightning_shrink.convert` / :func:`lightning_shrink.export` use it.
"""

from lightning_shrink.quantization.callback import QuantizationAwareTraining, prepare_qat, select_layers
from lightning_shrink.quantization.modules import (
    Int8Conv,
    Int8Embedding,
    Int8Linear,
    LayerSettings,
    is_converted,
    is_prepared,
    unprepare_module,
)

__all__ = [
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "LayerSettings",
    "QuantizationAwareTraining",
    "is_converted",
    "is_prepared",
    "prepare_qat",
    "select_layers",
    "unprepare_module",
]
