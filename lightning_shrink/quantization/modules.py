"""Deprecated: the names of 0.1's ``lightning_shrink.quantization.modules``, which is now
:mod:`~lightning_shrink.quantization.fake_layers` (training layers),
:mod:`~lightning_shrink.quantization.int8_layers` (inference layers) and
:mod:`~lightning_shrink.quantization.config` (``LayerSettings``). Importing a name from here warns
with a ``DeprecationWarning`` naming its new module; this module goes away in the next release."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    **dict.fromkeys(
        (
            "FakeQuantConv1d",
            "FakeQuantConv2d",
            "FakeQuantConv3d",
            "FakeQuantEmbedding",
            "FakeQuantLinear",
            "is_prepared",
            "prepare_module",
            "supported_float_class",
            "unprepare_module",
        ),
        "lightning_shrink.quantization.fake_layers",
    ),
    **dict.fromkeys(
        ("INT8_CLASSES", "Int8Conv", "Int8Embedding", "Int8Linear", "convert_module", "is_converted"),
        "lightning_shrink.quantization.int8_layers",
    ),
    "LayerSettings": "lightning_shrink.quantization.config",
}


def __getattr__(name: str) -> Any:
    target = _MOVED.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_shrink.quantization.modules is deprecated: import {name} from {target}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(target), name)
