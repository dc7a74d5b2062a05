"""The int8 inference layers that :func:`lightning_shrink.convert` puts in place of prepared layers.

Each layer's state dict holds plain tensors (``weight`` int8, ``weight_scale`` float32, ``bias``,
and for static activations ``input_scale``/``input_zero_point``), so a converted model exports to
safetensors as is. They compute what the fake-quantized layers simulated: weights bit for bit, and
activations with the arithmetic of the x86 int8 kernel, which the simulation reproduces (see
:mod:`lightning_shrink.quantization.fake_quant`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_shrink.quantization import _kernels
from lightning_shrink.quantization.config import LayerSettings
from lightning_shrink.quantization.fake_layers import (
    FakeQuantEmbedding,
    FakeQuantTiedLinear,
    _FakeQuantConvMixin,
    _FakeQuantMixin,
    is_prepared,
)
from lightning_shrink.quantization.fake_quant import (
    fake_quantize_activation_dynamic,
    fake_quantize_activation_static,
    static_qparams,
    weight_scale,
)

__all__ = [
    "INT8_CLASSES",
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "convert_module",
    "convert_modules",
    "is_converted",
]


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
    """Common ``config``/``from_config`` of the int8 layers (used by export and load): the config is
    the constructor's arguments, read back from the attributes of the same names (``bias``: whether
    the layer has one)."""

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this layer (without its tensors), as plain data."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: (self.bias is not None) if n == "bias" else getattr(self, n) for n in names}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Int8Base:
        """The layer :meth:`config` describes, with zero tensors (loading fills them)."""
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
                x = fake_quantize_activation_dynamic(x)
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
    def from_prepared(cls, module: nn.Module, table: Int8Embedding | None = None) -> Int8Linear:
        """Build from a fake-quantized ``nn.Linear`` or transformers ``Conv1D``.

        Args:
            module: The prepared layer.
            table: For a head tied to an embedding (``FakeQuantTiedLinear``), the converted table:
                the layer then holds the table's very ``weight`` and ``weight_scale`` tensors.
        """
        s: LayerSettings = module.shrink_qat
        axis = module.weight_axis
        out_features = module.weight.shape[axis]
        in_features = module.weight.shape[1 - axis]
        bits, group_size = module._weight_bits(), module._group_size()
        new = cls(in_features, out_features, module.bias is not None, s.activations, bits, group_size)
        if table is not None:
            if (table.weight_bits, table.group_size) != (bits, group_size) or table.weight.shape != (
                out_features,
                in_features,
            ):
                raise ValueError(
                    f"a tied head ({out_features} x {in_features}, int{bits}) does not fit its table "
                    f"({tuple(table.weight.shape)}, int{table.weight_bits})"
                )
            new.weight, new.weight_scale = table.weight, table.weight_scale  # one tensor, two layers
        else:
            q, scale = _quantize(module.weight, axis, bits, group_size)
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
        raise ValueError(
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.float()
        if self.activations == "dynamic":
            x = fake_quantize_activation_dynamic(x)
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


def is_converted(module: nn.Module) -> bool:
    """Whether ``module`` is an int8 inference layer."""
    return isinstance(module, _Int8Base)


@torch.no_grad()
def convert_module(module: nn.Module, table: Int8Embedding | None = None) -> _Int8Base:
    """The int8 inference layer for a prepared layer (the prepared layer is not modified).

    ``table`` is the converted embedding whose table a tied head shares (see
    :func:`convert_modules`).
    """
    if isinstance(module, FakeQuantEmbedding):
        return Int8Embedding.from_prepared(module)
    if isinstance(module, _FakeQuantConvMixin):
        return Int8Conv.from_prepared(module)
    if isinstance(module, _FakeQuantMixin):
        return Int8Linear.from_prepared(module, table)
    raise TypeError(f"{type(module).__name__} is not a fake-quantized layer")


def convert_modules(model: nn.Module) -> dict[str, _Int8Base]:
    """The int8 layer of every prepared layer of ``model``, by qualified name (``model`` is not
    modified).

    A head whose weight is a prepared embedding's table (``FakeQuantTiedLinear``) gets the converted
    table's tensors, so the two layers keep sharing one int8 table.

    Raises:
        ValueError: a tied head's table is not a prepared embedding of ``model``.
    """
    prepared = [(n, m) for n, m in model.named_modules() if n and is_prepared(m)]
    converted: dict[str, _Int8Base] = {}
    tables: dict[int, Int8Embedding] = {}
    for name, module in prepared:
        if isinstance(module, FakeQuantEmbedding):
            table = convert_module(module)
            assert isinstance(table, Int8Embedding)
            converted[name] = tables[id(module.weight)] = table
    for name, module in prepared:
        if name in converted:
            continue
        table = None
        if isinstance(module, FakeQuantTiedLinear):
            table = tables.get(id(module.weight))
            if table is None:
                raise ValueError(
                    f"layer {name!r} is prepared as a head tied to an embedding, but its weight is no "
                    "prepared embedding's table"
                )
        try:
            converted[name] = convert_module(module, table)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc
    return converted
