"""Quantization-aware training and conversion to int8.

- :class:`QuantizationAwareTraining`: the callback (:mod:`~lightning_shrink.quantization.callback`),
  configured by a :class:`QuantizationConfig` (:mod:`~lightning_shrink.quantization.config`); its
  plugin (:mod:`~lightning_shrink.quantization.plugin`) prepares layers before the optimizer exists.
- :func:`prepare_qat` / :func:`select_layers` (:mod:`~lightning_shrink.quantization.prepare`): the
  same preparation without a Trainer.
- :mod:`~lightning_shrink.quantization.fake_quant`: the fake-quantization arithmetic;
  :mod:`~lightning_shrink.quantization.fake_layers`: the fake-quantized training layers;
  :mod:`~lightning_shrink.quantization.int8_layers`: the int8 inference layers, on the kernels of
  :mod:`~lightning_shrink.quantization._kernels`.
- :mod:`~lightning_shrink.quantization.hooks`: the built-in plugin ``int8`` that converts, exports
  and loads; :func:`lightning_shrink.convert` / :func:`lightning_shrink.export` use it.
"""

from lightning_shrink.quantization.callback import QuantizationAwareTraining
from lightning_shrink.quantization.config import LayerSettings, QuantizationConfig
from lightning_shrink.quantization.fake_layers import is_prepared, unprepare_module
from lightning_shrink.quantization.int8_layers import Int8Conv, Int8Embedding, Int8Linear, is_converted
from lightning_shrink.quantization.plugin import QuantizationPlugin
from lightning_shrink.quantization.prepare import prepare_qat, select_layers

__all__ = [
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "LayerSettings",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "QuantizationPlugin",
    "is_converted",
    "is_prepared",
    "prepare_qat",
    "select_layers",
    "unprepare_module",
]
