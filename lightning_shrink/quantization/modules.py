"""Fake-quantized training layers and the int8 inference layers they convert to.

Preparation does not replace modules: it changes the class of a supported layer in place
(``layer.__class__ = FakeQuantLinear``), the way ``torch.nn.utils.parametrize`` does. The layer
keeps its identity, its ``weight``/``bias`` Parameters (so the optimizer, pruning masks,
checkpoints and ``state_dict`` keys see the very same tensors), its hooks and its attributes;
only ``forward`` changes. :func:`unprepare_module` restores the original class.

Conversion replaces each prepared layer by an ``Int8*`` module whose state dict holds plain
tensors (``weight`` int8, ``weight_scale`` float32, ``bias``, and for static activations
``input_scale``/``input_zero_point``), so a converted model exports to safetensors as is.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_shrink.quantization import _kernels
from lightning_shrink.quantization.fake_quant import (
    fake_quantize_activation_per_token,
    fake_quantize_activation_static,
    fake_quantize_weight,
    static_qparams,
    weight_scale,
)

__all__ = [
    "FakeQuantConv1d",
    "FakeQuantConv2d",
    "FakeQuantConv3d",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "LayerSettings",
    "convert_module",
    "is_converted",
    "is_prepared",
    "prepare_module",
    "supported_float_class",
    "unprepare_module",
]


@dataclass
class LayerSettings:
    """Quantization settings shared by all layers one :class:`QuantizationAwareTraining` prepared.

    The plugin flips ``fake_quant_enabled`` / ``observer_enabled`` on this one object to switch
    every layer at once.
    """

    weight_bits: int = 8
    group_size: int | None = None
    activations: str | None = "dynamic"
    embedding_bits: int = 8
    embedding_group_size: int | None = None
    averaging_constant: float = 0.01
    fake_quant_enabled: bool = True
    observer_enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["fake_quant_enabled"], d["observer_enabled"]
        return d


_SETTINGS = "shrink_qat"
_FLOAT_CLASS = "_shrink_float_class"


# ---------------------------------------------------------------------------------------------
# Fake-quantized training layers (class-swapped in place).
# ---------------------------------------------------------------------------------------------


class _FakeQuantMixin:
    """Shared logic: weight fake-quant and input fake-quant/observation."""

    #: Dimension of ``weight`` that indexes output channels.
    weight_axis = 0
    #: ``"per_token"`` for matrix layers, ``"per_tensor"`` for convolutions (dynamic activations).
    dynamic_granularity = "per_token"

    shrink_qat: LayerSettings

    def _fake_weight(self) -> torch.Tensor:
        s = self.shrink_qat
        if not s.fake_quant_enabled:
            return self.weight
        return fake_quantize_weight(self.weight, self.weight_axis, s.weight_bits, self._group_size())

    def _group_size(self) -> int | None:
        return self.shrink_qat.group_size

    def _fake_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shrink_qat
        if s.activations is None:
            return x
        if s.activations == "static":
            if s.observer_enabled and self.training:
                self._observe(x)
            if not s.fake_quant_enabled or not self._observed():
                return x
            scale, zero_point = static_qparams(self.input_min, self.input_max)
            return fake_quantize_activation_static(x, scale, zero_point)
        if not s.fake_quant_enabled:
            return x
        if self.dynamic_granularity == "per_token":
            return fake_quantize_activation_per_token(x)
        lo, hi = torch.aminmax(x.detach())
        scale, zero_point = static_qparams(lo, hi)
        return fake_quantize_activation_static(x, scale, zero_point)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_shrink_observed", None)  # the loaded range decides
        super()._load_from_state_dict(*args, **kwargs)

    def _observed(self) -> bool:
        # One device sync per layer until the first range exists, then a Python flag.
        if self.__dict__.get("_shrink_observed"):
            return True
        observed = bool(torch.isfinite(self.input_min))
        self.__dict__["_shrink_observed"] = observed
        return observed

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        c = self.shrink_qat.averaging_constant
        first = torch.isinf(self.input_min)
        self.input_min.copy_(torch.where(first, lo, self.input_min + c * (lo - self.input_min)))
        self.input_max.copy_(torch.where(first, hi, self.input_max + c * (hi - self.input_max)))


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (per output channel) and input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self._fake_input(input), self._fake_weight(), self.bias)


class _FakeQuantConvMixin(_FakeQuantMixin):
    dynamic_granularity = "per_tensor"

    def _group_size(self) -> int | None:
        return None  # convolutions: one scale per output channel, also for int4

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._fake_input(input), self._fake_weight(), self.bias)


class FakeQuantConv1d(_FakeQuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight (per output channel) and input (per tensor)."""


class FakeQuantConv2d(_FakeQuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight (per output channel) and input (per tensor)."""


class FakeQuantConv3d(_FakeQuantConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight (per output channel) and input (per tensor)."""


class FakeQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose looked-up rows are fake-quantized with symmetric scales per row (int8,
    or int4 per row or per group of ``embedding_group_size`` elements). Computing the scales from
    the gathered rows equals quantizing the whole table row by row, at the cost of the batch's
    tokens instead of the whole vocabulary."""

    shrink_qat: LayerSettings

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        s = self.shrink_qat
        if not s.fake_quant_enabled:
            return out
        if s.embedding_bits == 8:
            return fake_quantize_activation_per_token(out)
        rows = out.reshape(-1, self.embedding_dim)
        return fake_quantize_weight(rows, 0, s.embedding_bits, s.embedding_group_size).reshape(out.shape)


def _hf_conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


_FAKE_HF_CONV1D: type | None = None


def _fake_quant_hf_conv1d() -> type:
    """``FakeQuantConv1D``, a subclass of transformers' ``Conv1D`` (created on first use so that
    importing this module does not import transformers)."""
    global _FAKE_HF_CONV1D
    if _FAKE_HF_CONV1D is None:
        base = _hf_conv1d_class()
        if base is None:
            raise ImportError("transformers is needed to quantize its Conv1D layers")

        class FakeQuantConv1D(_FakeQuantMixin, base):
            """transformers' ``Conv1D`` (GPT-2; weight ``(in, out)``) with fake-quantized weight
            (per output channel, axis 1) and input (per token)."""

            weight_axis = 1

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                size_out = (*x.size()[:-1], self.nf)
                x = self._fake_input(x)
                x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self._fake_weight())
                return x.view(size_out)

        FakeQuantConv1D.__module__ = __name__
        FakeQuantConv1D.__qualname__ = "FakeQuantConv1D"
        _FAKE_HF_CONV1D = FakeQuantConv1D
    return _FAKE_HF_CONV1D


def __getattr__(name: str) -> Any:  # PEP 562: lets pickle find the lazily created class
    if name == "FakeQuantConv1D":
        return _fake_quant_hf_conv1d()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SWAPS: dict[type, type] = {
    nn.Linear: FakeQuantLinear,
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.Conv3d: FakeQuantConv3d,
    nn.Embedding: FakeQuantEmbedding,
}


def _fsdp_wrapper(cls: type) -> tuple[type | None, type]:
    """``(FSDPModule, original class)`` for a class that FSDP2's ``fully_shard`` made (it puts
    ``FSDPModule`` first in a dynamic subclass, ``FSDP<Name>``), else ``(None, cls)``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if wrapper is not None and len(cls.__bases__) == 2 and cls.__bases__[0] is wrapper:
        return wrapper, cls.__bases__[1]
    return None, cls


_WRAPPED: dict[tuple[type, type], type] = {}


def _rewrap(module_cls: type, target: type) -> type:
    """``target``, wrapped the way ``module_cls`` is wrapped by FSDP2 (so a sharded layer keeps
    ``FSDPModule``'s methods after preparation)."""
    wrapper, _ = _fsdp_wrapper(module_cls)
    if wrapper is None:
        return target
    key = (wrapper, target)
    if key not in _WRAPPED:
        namespace = (
            {"__deepcopy__": module_cls.__dict__["__deepcopy__"]}
            if "__deepcopy__" in module_cls.__dict__
            else {}
        )
        _WRAPPED[key] = type(f"FSDP{target.__name__}", (wrapper, target), namespace)
    return _WRAPPED[key]


def supported_float_class(module: nn.Module) -> str | None:
    """Why ``module`` cannot be prepared, or ``None`` if it can.

    Only the exact classes ``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding mode), ``nn.Embedding``
    and transformers' ``Conv1D`` are supported (also when FSDP2's ``fully_shard`` wrapped them): a
    subclass may override ``forward`` (or, like ``nn.MultiheadAttention``'s projection, not be called
    at all), and fake-quantizing it would silently have no effect.
    """
    _, cls = _fsdp_wrapper(type(module))
    if cls in _SWAPS:
        if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
            return f"convolution with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            return "nn.Embedding with max_norm or sparse gradients"
        return None
    hf = _hf_conv1d_class() if "transformers" in sys.modules else None
    if hf is not None and cls is hf:
        return None
    return (
        f"{cls.__module__}.{cls.__qualname__} is not supported (supported: nn.Linear, nn.Conv1d, "
        "nn.Conv2d, nn.Conv3d, nn.Embedding, transformers' Conv1D; subclasses are not)"
    )


def is_prepared(module: nn.Module) -> bool:
    """Whether ``module`` is a fake-quantized layer."""
    return isinstance(module, (_FakeQuantMixin, FakeQuantEmbedding))


def is_converted(module: nn.Module) -> bool:
    """Whether ``module`` is an int8 inference layer."""
    return isinstance(module, (Int8Linear, Int8Conv, Int8Embedding))


def prepare_module(module: nn.Module, settings: LayerSettings) -> None:
    """Turn a supported float layer into its fake-quantized form, in place (see module docs)."""
    problem = supported_float_class(module)
    if problem is not None:
        raise TypeError(problem)
    cls = type(module)
    _, plain = _fsdp_wrapper(cls)
    target = _SWAPS.get(plain) or _fake_quant_hf_conv1d()
    module.__dict__[_FLOAT_CLASS] = cls
    module.__dict__[_SETTINGS] = settings
    module.__class__ = _rewrap(cls, target)
    if settings.activations == "static" and not isinstance(module, nn.Embedding):
        device = module.weight.device
        module.register_buffer("input_min", torch.tensor(float("inf"), device=device))
        module.register_buffer("input_max", torch.tensor(float("-inf"), device=device))


def unprepare_module(module: nn.Module) -> None:
    """Restore a prepared layer's float class (its parameters are untouched)."""
    module.__class__ = module.__dict__.pop(_FLOAT_CLASS)
    module.__dict__.pop(_SETTINGS, None)
    module.__dict__.pop("_shrink_observed", None)
    for name in ("input_min", "input_max"):
        module._buffers.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Int8 inference layers.
# ---------------------------------------------------------------------------------------------


def _quantize(weight: torch.Tensor, axis: int, bits: int, group_size: int | None) -> tuple[torch.Tensor, ...]:
    """Integer values (int8 storage, output channels first) and scales of ``weight``, exactly as
    :func:`fake_quantize_weight` rounds them."""
    w = weight.detach().float()
    if axis != 0:
        w = w.transpose(0, axis)
    w = w.contiguous()
    scale = weight_scale(w, 0, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    if group_size is None:
        s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        q = torch.clamp(torch.round(w / s), -qmax, qmax)
    else:
        g = w.reshape(w.shape[0], -1, group_size)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -qmax, qmax).reshape(w.shape)
    return q.to(torch.int8), scale


class _Int8Base(nn.Module):
    """Common ``from_config``/``config`` of the int8 layers (used by export and load)."""

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Int8Base:
        return cls(**config)


class Int8Linear(_Int8Base):
    """An int8 linear layer for CPU inference.

    State: ``weight`` (int8, ``(out_features, in_features)``), ``weight_scale`` (float32,
    ``(out_features,)``, or ``(out_features, in_features // group_size)`` for grouped int4),
    ``bias`` (float32 or absent), and for static activations ``input_scale``/``input_zero_point``.
    8-bit weights run on the packed x86 int8 kernels (dynamic or static activations) through
    :mod:`lightning_shrink.quantization._kernels`; weight-only and grouped int4 layers dequantize
    their weight in each forward (they save memory, not time).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activations: str | None = "dynamic",
        weight_bits: int = 8,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activations, self.weight_bits, self.group_size = activations, weight_bits, group_size
        n_scale = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n_scale))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if activations == "static":
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self._packed: Any = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None  # new weights: repack on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        self._packed = None  # moved or cast: repack on the next forward
        return super()._apply(fn, recurse)

    def config(self) -> dict[str, Any]:
        return dict(
            in_features=self.in_features,
            out_features=self.out_features,
            bias=self.bias is not None,
            activations=self.activations,
            weight_bits=self.weight_bits,
            group_size=self.group_size,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with, ``(out_features, in_features)``."""
        if self.group_size is None:
            return self.weight.float() * self.weight_scale.unsqueeze(1)
        g = self.weight.float().reshape(self.out_features, -1, self.group_size)
        return (g * self.weight_scale.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight_bits != 8 or self.activations is None:
            x = input.float()
            if self.activations == "dynamic":
                x = fake_quantize_activation_per_token(x)
            elif self.activations == "static":
                x = fake_quantize_activation_static(x, self.input_scale, self.input_zero_point)
            return F.linear(x, self.dequantized_weight(), self.bias).to(input.dtype)
        if self._packed is None:
            packed = _kernels.pack(self.weight, self.weight_scale, self.bias)
            self._packed = False if packed is None else packed
        return _kernels.linear(
            input,
            self.weight,
            self.weight_scale,
            self.bias,
            None if self._packed is False else self._packed,
            self.activations,
            getattr(self, "input_scale", None),
            getattr(self, "input_zero_point", None),
        )

    @classmethod
    def from_prepared(cls, module: nn.Module) -> Int8Linear:
        """Build from a fake-quantized ``nn.Linear`` or transformers ``Conv1D``."""
        s: LayerSettings = module.shrink_qat
        axis = module.weight_axis
        out_features = module.weight.shape[axis]
        in_features = module.weight.shape[1 - axis]
        new = cls(
            in_features, out_features, module.bias is not None, s.activations, s.weight_bits, s.group_size
        )
        q, scale = _quantize(module.weight, axis, s.weight_bits, s.group_size)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach().float())
        _copy_static_qparams(module, new)
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activations={self.activations}, weight_bits={self.weight_bits}, group_size={self.group_size}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = None  # packed kernels are rebuilt on first use
        return state


def _copy_static_qparams(src: nn.Module, dst: nn.Module) -> None:
    if getattr(dst, "input_scale", None) is None:
        return
    if not bool(torch.isfinite(src.input_min)):
        raise RuntimeError(
            "static activation ranges were never observed (the model was not trained or evaluated "
            "in training mode after QuantizationAwareTraining prepared it); run at least one "
            "training step before convert()"
        )
    scale, zero_point = static_qparams(src.input_min, src.input_max)
    dst.input_scale.copy_(scale)
    dst.input_zero_point.copy_(zero_point)


class Int8Conv(_Int8Base):
    """A convolution with int8 weights (per output channel) for inference.

    It stores int8 weights and reproduces the fake-quantized numerics exactly, but computes in
    float (dequantizing the weight in each forward): torch has no maintained int8 convolution
    for dynamic activations on CPU.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int] | str,
        dilation: list[int],
        groups: int,
        bias: bool = True,
        activations: str | None = "dynamic",
        weight_bits: int = 8,
    ) -> None:
        super().__init__()
        self.dim, self.in_channels, self.out_channels = dim, in_channels, out_channels
        self.kernel_size, self.stride, self.padding = list(kernel_size), list(stride), padding
        self.dilation, self.groups = list(dilation), groups
        self.activations, self.weight_bits = activations, weight_bits
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        if activations == "static":
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))

    def config(self) -> dict[str, Any]:
        return dict(
            dim=self.dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            activations=self.activations,
            weight_bits=self.weight_bits,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.float()
        if self.activations == "dynamic":
            lo, hi = torch.aminmax(x)
            scale, zero_point = static_qparams(lo, hi)
            x = fake_quantize_activation_static(x, scale, zero_point)
        elif self.activations == "static":
            x = fake_quantize_activation_static(x, self.input_scale, self.input_zero_point)
        w = self.weight.float() * self.weight_scale.reshape(-1, *([1] * self.dim + [1]))
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        out = conv(x, w, self.bias, tuple(self.stride), padding, tuple(self.dilation), self.groups)
        return out.to(input.dtype)

    @classmethod
    def from_prepared(cls, module: nn.Module) -> Int8Conv:
        """Build from a fake-quantized ``nn.Conv1d/2d/3d``."""
        s: LayerSettings = module.shrink_qat
        dim = module.weight.dim() - 2
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        new = cls(
            dim,
            module.in_channels,
            module.out_channels,
            list(module.kernel_size),
            list(module.stride),
            padding,
            list(module.dilation),
            module.groups,
            module.bias is not None,
            s.activations,
            s.weight_bits,
        )
        q, scale = _quantize(module.weight, 0, s.weight_bits, None)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach().float())
        _copy_static_qparams(module, new)
        return new


class Int8Embedding(_Int8Base):
    """An embedding table stored as int8 values with symmetric scales; looked-up rows are
    dequantized, with the same values as the fake-quantized table.

    State: ``weight`` (int8, ``(num_embeddings, embedding_dim)``; for ``weight_bits=4`` the values
    lie in ``[-7, 7]`` and :func:`lightning_shrink.export` packs two per byte) and ``weight_scale``
    (float32, ``(num_embeddings,)``, or ``(num_embeddings, embedding_dim // group_size)``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        weight_bits: int = 8,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_bits, self.group_size = weight_bits, group_size
        n_scale = (num_embeddings,) if group_size is None else (num_embeddings, embedding_dim // group_size)
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n_scale))

    def config(self) -> dict[str, Any]:
        return dict(
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            padding_idx=self.padding_idx,
            weight_bits=self.weight_bits,
            group_size=self.group_size,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight).float()
        scales = F.embedding(input, self.weight_scale.reshape(self.num_embeddings, -1))
        if self.group_size is None:
            return rows * scales
        grouped = rows.reshape(*rows.shape[:-1], -1, self.group_size) * scales.unsqueeze(-1)
        return grouped.reshape(rows.shape)

    @classmethod
    def from_prepared(cls, module: nn.Module) -> Int8Embedding:
        """Build from a fake-quantized ``nn.Embedding``."""
        s: LayerSettings = module.shrink_qat
        bits, group_size = s.embedding_bits, s.embedding_group_size
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, bits, group_size)
        q, scale = _quantize(module.weight, 0, bits, group_size)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        return new

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.weight_bits}{group}"


INT8_CLASSES: dict[str, type[_Int8Base]] = {
    "Int8Linear": Int8Linear,
    "Int8Conv": Int8Conv,
    "Int8Embedding": Int8Embedding,
}


@torch.no_grad()
def convert_module(module: nn.Module) -> _Int8Base:
    """The int8 inference layer for a prepared layer (the prepared layer is not modified)."""
    if isinstance(module, FakeQuantEmbedding):
        return Int8Embedding.from_prepared(module)
    if isinstance(module, _FakeQuantConvMixin):
        return Int8Conv.from_prepared(module)
    if isinstance(module, _FakeQuantMixin):
        return Int8Linear.from_prepared(module)
    raise TypeError(f"{type(module).__name__} is not a fake-quantized layer")
