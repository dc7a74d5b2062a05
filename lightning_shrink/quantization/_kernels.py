"""The one place that touches ``torch.ao`` / ``torch.ops.quantized``: packed int8 CPU kernels.

``torch.ao.quantization`` is deprecated in favour of torchao, but on this CPU (x86, avx512_vnni)
its fbgemm/x86 kernels are the fastest int8 path we measured (see docs/quantization.md). To keep a
torch upgrade from silently breaking conversion, everything goes through :func:`pack` and
:func:`linear`, and a pure-torch reference implementation (the fake-quant numerics, computed in
float) takes over when the operators are missing or fail to pack, or when
``LIGHTNING_SHRINK_INT8_KERNEL=reference`` is set. Tests run both paths.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from lightning_shrink.quantization.fake_quant import (
    ACTIVATION_QMAX,
    fake_quantize_activation_dynamic,
    fake_quantize_activation_static,
)

__all__ = ["ENV_KERNEL", "REDUCE_RANGE", "kernel_name", "linear", "native_available", "pack"]

#: Environment variable: ``reference`` forces the pure-torch path.
ENV_KERNEL = "LIGHTNING_SHRINK_INT8_KERNEL"

#: Dynamic-activation range reduction of the fbgemm kernel: 7-bit activations, which the int16 pair
#: sums of the AVX2 multiply-add cannot overflow (with 8 bits they saturate on CPUs without VNNI).
#: The fake quantization simulates exactly this (:mod:`lightning_shrink.quantization.fake_quant`).
REDUCE_RANGE = ACTIVATION_QMAX == 127

#: Quantized engines whose linear kernels are fbgemm's, whose arithmetic the fake quantization
#: reproduces; on any other engine the reference path runs.
_FBGEMM_ENGINES = ("x86", "fbgemm")


def native_available() -> bool:
    """Whether the packed int8 operators exist in this torch build, on an fbgemm engine."""
    ops = getattr(torch.ops, "quantized", None)
    try:
        if torch.backends.quantized.engine not in _FBGEMM_ENGINES:
            return False
        return ops is not None and all(
            hasattr(ops, name)
            for name in ("linear_prepack", "linear_dynamic", "linear_with_input_q_dq_qweight_dq_output_fp32")
        )
    except (RuntimeError, AttributeError):
        return False


def kernel_name() -> str:
    """``"x86-int8"`` when the native kernels are used, ``"reference"`` otherwise."""
    if os.environ.get(ENV_KERNEL, "").strip().lower() == "reference" or not native_available():
        return "reference"
    return "x86-int8"


def pack(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any | None:
    """Pack an int8 ``(out, in)`` weight with per-output-channel ``scale`` for the native kernel.

    Returns ``None`` when the reference path is to be used.
    """
    if kernel_name() == "reference" or weight.device.type != "cpu":
        return None
    try:
        with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated"
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                weight.to(torch.int8).contiguous(),
                scale.double(),
                torch.zeros(scale.shape[0], dtype=torch.long),
                0,
            )
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    packed: Any | None,
    activations: str | None,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(weight).T + bias`` with 7-bit activations (``"dynamic"``, ``"static"``) or
    float activations (``None``), on the native kernel when ``packed`` is given.

    Static activations are clamped to the range their scale and zero point represent before the
    kernel quantizes them (it would clamp to ``[0, 255]`` only), so that it computes exactly what
    :func:`~lightning_shrink.quantization.fake_quant.fake_quantize_activation_static` simulates.
    """
    dtype = x.dtype
    x = x.float()
    if packed is not None and activations == "dynamic":
        out = torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
    elif packed is not None and activations == "static":
        scale, zero_point = float(input_scale), int(input_zero_point)
        low, high = -zero_point * scale, (ACTIVATION_QMAX - zero_point) * scale
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.clamp(low, high), scale, zero_point, packed
        )
    else:
        if activations == "dynamic":
            x = fake_quantize_activation_dynamic(x)
        elif activations == "static":
            x = fake_quantize_activation_static(x, input_scale, input_zero_point)
        out = F.linear(x, weight.float() * scale.unsqueeze(1), bias)
    return out.to(dtype)
