"""Fake-quantized training layers, made by changing a float layer's class in place.

Preparation does not replace modules: it changes the class of a supported layer in place
(``layer.__class__ = FakeQuantLinear``), the way ``torch.nn.utils.parametrize`` does. The layer
keeps its identity, its ``weight``/``bias`` Parameters (so the optimizer, pruning masks,
checkpoints and ``state_dict`` keys see the very same tensors), its hooks and its attributes;
only ``forward`` changes. :func:`unprepare_module` restores the original class.

The fake-quantized weight is not kept for backward: it is a new tensor as large as the (unsharded)
weight, and autograd would hold one per layer from forward to backward, cancelling FSDP2's resharding
after forward. The layer's operation runs under ``saved_tensors_hooks`` that store, instead of it,
what recomputes it in backward from the original weight (which FSDP2 gathers again for backward
anyway); autograd's own backward of the layer then runs on identical values, so the gradients are
bitwise those of keeping the copy. The hooks stay with the graph until backward, so they hold only
what identifies the copy, never the copy itself (:func:`recompute_in_backward`; the LoRA layers of
:mod:`lightning_shrink.adapters.lora_layer` use it for their weight-sized deltas too). Under
``torch.func`` transforms (per-example gradients), which do not allow such hooks, the copy is kept.

Every prepared layer holds the :class:`~lightning_shrink.quantization.config.LayerSettings` of the
plugin that prepared it as ``layer.shrink_qat`` (its arithmetic, its owner, the on/off switches).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_shrink.quantization.config import LayerSettings
from lightning_shrink.quantization.fake_quant import (
    fake_quantize_activation_dynamic,
    fake_quantize_activation_static,
    fake_quantize_rows,
    fake_quantize_weight,
    static_qparams,
)

__all__ = [
    "FakeQuantConv1d",
    "FakeQuantConv2d",
    "FakeQuantConv3d",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "FakeQuantTiedLinear",
    "is_prepared",
    "prepare_module",
    "supported_float_class",
    "unprepare_module",
]

_SETTINGS = "shrink_qat"
_FLOAT_CLASS = "_shrink_float_class"


def _all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of this batch over every process: one all-reduce (max of ``-lo`` and ``hi``)."""
    import torch.distributed as dist

    both = torch.stack([lo.neg(), hi])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[0].neg(), both[1]


#: Recompute fake-quantized weights in backward instead of keeping them (see the module docs).
RECOMPUTE_IN_BACKWARD = True


class _Recompute:
    """What is saved for backward in place of a view of a tensor that ``recompute()`` makes again
    (a fake-quantized weight): the view's geometry, and the versions of the tensors it is made from."""

    __slots__ = ("inputs", "offset", "owner", "recompute", "size", "stride", "versions", "what")

    def __init__(
        self,
        owner: str,
        what: str,
        recompute: Callable[[], torch.Tensor],
        inputs: tuple[torch.Tensor, ...],
        view: torch.Tensor,
    ) -> None:
        self.owner, self.what, self.recompute, self.inputs = owner, what, recompute, inputs
        self.versions = tuple(t._version for t in inputs)
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def unpack(self) -> torch.Tensor:
        if any(t._version != v for t, v in zip(self.inputs, self.versions, strict=True)):
            raise RuntimeError(
                f"{self.owner}: its weight was modified in place between forward and backward; the "
                f"{self.what} recomputed for backward would differ from the one forward used"
            )
        with torch.no_grad():
            q = self.recompute()
        return q.as_strided(self.size, self.stride, self.offset)


def recompute_in_backward(
    owner: str,
    value: torch.Tensor,
    recompute: Callable[[], torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    compute: Callable[[torch.Tensor], torch.Tensor],
    what: str = "fake-quantized weight",
) -> torch.Tensor:
    """``compute(value)``, where whatever autograd would save of ``value`` (a new tensor as large as a
    weight) is replaced by a record that calls ``recompute()`` (under ``no_grad``, bitwise ``value``
    again) in backward; ``inputs`` are the tensors ``value`` is made from, checked unchanged then
    (``owner`` and ``what`` name the layer and ``value`` in the error otherwise).

    The hooks live as long as the graph (autograd keeps them with what they saved): they hold only
    what identifies ``value``, never ``value`` itself, so nothing keeps it alive after ``compute``.
    Under ``torch.func`` transforms, which do not allow such hooks, ``value`` is kept as usual.
    """
    if not RECOMPUTE_IN_BACKWARD or torch._C._are_functorch_transforms_active():
        return compute(value)
    storage, dtype = value.untyped_storage().data_ptr(), value.dtype

    def pack(t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() == storage and t.dtype == dtype:
            return _Recompute(owner, what, recompute, inputs, t)
        return t

    def unpack(saved: Any) -> torch.Tensor:
        return saved.unpack() if isinstance(saved, _Recompute) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return compute(value)


class _FakeQuantMixin:
    """Shared logic: weight fake-quant and input fake-quant/observation."""

    #: Dimension of ``weight`` that indexes output channels.
    weight_axis = 0
    #: How dynamic activations are quantized: one scale per tensor, as the x86 int8 kernel does
    #: (read by differential privacy, for which a scale shared by the batch mixes examples).
    dynamic_granularity = "per_tensor"

    shrink_qat: LayerSettings

    def _weight_bits(self) -> int:
        """Bits of the weight's values."""
        return self.shrink_qat.weight_bits

    def _group_size(self) -> int | None:
        """Input features per weight scale (``None``: one scale per output channel)."""
        return self.shrink_qat.group_size

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(weight, self.weight_axis, self._weight_bits(), self._group_size())

    def _fake_weight(self) -> torch.Tensor:
        if not self.shrink_qat.fake_quant_enabled:
            return self.weight
        return self._quantize(self.weight)

    def _with_fake_weight(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(fake-quantized weight)``, with the fake-quantized weight recomputed in backward
        rather than kept (see the module docs)."""
        weight = self.weight
        if not (self.shrink_qat.fake_quant_enabled and torch.is_grad_enabled() and weight.requires_grad):
            return compute(self._fake_weight())
        return recompute_in_backward(
            type(self).__name__,
            self._quantize(weight),
            lambda: self._quantize(weight.detach()),
            (weight,),
            compute,
        )

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
        return fake_quantize_activation_dynamic(x)

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
        if self.shrink_qat.sync_observers:
            lo, hi = _all_reduce_range(lo, hi)
        c = self.shrink_qat.averaging_constant
        first = torch.isinf(self.input_min)
        self.input_min.copy_(torch.where(first, lo, self.input_min + c * (lo - self.input_min)))
        self.input_max.copy_(torch.where(first, hi, self.input_max + c * (hi - self.input_max)))


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight (per output channel) and input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self._fake_input(input)
        return self._with_fake_weight(lambda w: F.linear(x, w, self.bias))


class FakeQuantTiedLinear(FakeQuantLinear):
    """An ``nn.Linear`` whose weight is an embedding table (a language-model head tied to the input
    embeddings): the weight is fake-quantized as the table is, with ``embedding_bits`` and
    ``embedding_group_size`` (one scale per row, i.e. per output channel, or per group), so that the
    head computes with the very values of the quantized table and conversion stores them once."""

    def _weight_bits(self) -> int:
        """Bits of the shared table's values (``embedding_bits``)."""
        return self.shrink_qat.embedding_bits

    def _group_size(self) -> int | None:
        """Elements per scale of the shared table's rows (``embedding_group_size``)."""
        return self.shrink_qat.embedding_group_size


class _FakeQuantConvMixin(_FakeQuantMixin):
    def _group_size(self) -> int | None:
        """Convolutions: one scale per output channel, also for int4."""
        return None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self._fake_input(input)
        return self._with_fake_weight(lambda w: self._conv_forward(x, w, self.bias))


class FakeQuantConv1d(_FakeQuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight (per output channel) and input."""


class FakeQuantConv2d(_FakeQuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight (per output channel) and input."""


class FakeQuantConv3d(_FakeQuantConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight (per output channel) and input."""


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
            return fake_quantize_rows(out)
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
            (per output channel, axis 1) and input."""

            weight_axis = 1

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                size_out = (*x.size()[:-1], self.nf)
                x = self._fake_input(x)
                flat = x.view(-1, x.size(-1))
                x = self._with_fake_weight(lambda w: torch.addmm(self.bias, flat, w))
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


def prepare_module(module: nn.Module, settings: LayerSettings, tied: bool = False) -> None:
    """Turn a supported float layer into its fake-quantized form, in place (see module docs).

    Args:
        module: A layer :func:`supported_float_class` accepts.
        settings: The settings its plugin shares with all its layers.
        tied: ``module`` is an ``nn.Linear`` whose weight is a prepared embedding's table
            (:class:`FakeQuantTiedLinear`).
    """
    problem = supported_float_class(module)
    if problem is not None:
        raise TypeError(problem)
    cls = type(module)
    _, plain = _fsdp_wrapper(cls)
    if tied and plain is not nn.Linear:
        raise TypeError(f"only an nn.Linear can share an embedding's table, not {plain.__name__}")
    target = FakeQuantTiedLinear if tied else (_SWAPS.get(plain) or _fake_quant_hf_conv1d())
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
