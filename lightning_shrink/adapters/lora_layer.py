"""A LoRA layer whose adapter respects the base weight's pruning mask and, under quantization-aware
training with ``adapters="merged"``, computes with the fake-quantized *merged* weight.

:class:`ShrinkLoraLinear` is ``peft.tuners.lora.Linear`` with two changes, made by changing the
class of the existing layer in place (as quantization prepares its layers), so parameters, names,
hooks and ``state_dict`` keys stay peft's:

* ``get_delta_weight`` multiplies ``s·B·A`` by the base weight's mask, so ``merge()``,
  ``unmerge()`` and ``merge_and_unload()`` keep pruned positions at zero;
* ``forward`` computes ``base(x) + dropout(x) @ (M ⊙ s·B·A)ᵀ`` while the base weight has pruned
  positions (the masked delta is formed densely: a matrix of the base weight's size per step), and
  ``fq(W + M ⊙ s·B·A)`` when the base layer is fake-quantized with ``adapters="merged"``; otherwise
  it is peft's own forward (the low-rank path).

The mask is read from the base weight's zeros (the pruning masks are multiplied into it, and an
already-sparse model's zeros are its initial masks, as pruning itself takes them); it is cached until
the weight changes.

Under FSDP2 (``fully_shard``) the base weight is sharded between forwards, and whole during the
forward of the unit that holds it (FSDP2 gathers it): the mask and the merged weight are computed
from that gathered weight at every forward (never cached: the gathered storage is refilled in
place), so training is the same function as in one process. Outside a forward (``merge()``,
``get_delta_weight``) a sharded base weight is refused: gather the full state dict into an unsharded
model first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from torch import nn

from lightning_shrink.quantization.fake_layers import is_prepared, recompute_in_backward
from lightning_shrink.quantization.fake_quant import fake_quantize_weight

__all__ = ["ShrinkLoraLinear", "adopt", "dense_adapter_path", "masks_delta"]

_PRUNED = "_shrink_pruned_base"
_CACHE = "_shrink_mask_cache"
_SHARDED = "_shrink_sharded_base"


class ShrinkLoraLinear(LoraLinear):
    """``peft.tuners.lora.Linear`` whose adapter delta is masked like its base weight, and whose
    merged weight is fake-quantized when its base layer is (see the module docs)."""

    def _mask(self) -> torch.Tensor | None:
        """The base weight's keep-mask (``None``: nothing pruned, or pruning does not act here)."""
        if not self.__dict__.get(_PRUNED):
            return None
        weight = self.get_base_layer().weight
        if _is_dtensor(weight):
            raise RuntimeError(
                "ShrinkLoraLinear: the base weight is sharded (FSDP2) outside a forward pass; its adapter "
                "delta is masked by the whole weight, which FSDP2 gathers only during forward. Merge or "
                "export from an unsharded model holding the full state dict (e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)"
            )
        sharded = self.__dict__.get(_SHARDED, False)
        key = (weight.data_ptr(), weight._version, weight.device)
        cached = self.__dict__.get(_CACHE)
        if not sharded and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            keep = weight != 0
            mask = None if bool(keep.all()) else keep
        if not sharded:
            self.__dict__[_CACHE] = (key, mask)
        return mask

    def _merged_quantization(self) -> bool:
        base = self.get_base_layer()
        return is_prepared(base) and getattr(base.shrink_qat.config, "adapters", "base") == "merged"

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s·B·A`` of ``adapter``, zero where the base weight is pruned."""
        delta = super().get_delta_weight(adapter)
        mask = self._mask()
        # ``where`` keeps only the bool mask for backward (``delta * mask.float()`` would save a float
        # copy of it: 4 bytes per weight per layer until backward).
        return delta if mask is None else torch.where(mask, delta, delta.new_zeros(()))

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        merged_quant = self._merged_quantization()
        if (
            self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or not self._active()
            or (self._mask() is None and not merged_quant)
        ):
            return super().forward(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:  # peft's own forward does not pass these to the base layer either
            kwargs.pop(key, None)
        if merged_quant:
            return self._merged_forward(x)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self._active():
            xa = self.lora_dropout[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype))
            delta = self._recomputed(
                self.get_delta_weight(adapter),
                lambda adapter=adapter: self.get_delta_weight(adapter),
                lambda d, xa=xa: F.linear(xa, d),
            )
            result = result + delta.to(result.dtype)
        return result

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors the (merged) delta is made from."""
        names = self._active()
        return (
            self.get_base_layer().weight,
            *(m[a].weight for a in names for m in (self.lora_A, self.lora_B)),
        )

    def _recomputed(
        self,
        value: torch.Tensor,
        recompute: Callable[[], torch.Tensor],
        compute: Callable[[torch.Tensor], torch.Tensor],
        what: str = "masked adapter delta",
    ) -> torch.Tensor:
        """``compute(value)`` with ``value`` (a weight-sized delta or merged weight, named ``what``) made
        again by ``recompute`` in backward instead of kept from forward (see
        :func:`~lightning_shrink.quantization.fake_layers.recompute_in_backward`): under FSDP2 a copy per
        layer kept from forward to backward would cancel the resharding."""
        if not (torch.is_grad_enabled() and value.requires_grad):
            return compute(value)
        return recompute_in_backward(type(self).__name__, value, recompute, self._inputs(), compute, what)

    def _merged_weight(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """``W + Σ M ⊙ s·B·A``, fake-quantized when the base layer's fake quantization is on."""
        base = self.get_base_layer()
        weight = base.weight + sum(d.to(base.weight.dtype) for d in deltas.values())
        if base.shrink_qat.fake_quant_enabled:
            weight = fake_quantize_weight(weight, base.weight_axis, base._weight_bits(), base._group_size())
        return weight

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ fq(W + Σ M ⊙ s·B·A)ᵀ`` (what the merged int8 model computes), plus the adapters'
        dropout: ``(dropout(x) - x) @ (M ⊙ s·B·A)ᵀ``, zero in eval mode."""
        base = self.get_base_layer()
        active = self._active()
        deltas = {a: self.get_delta_weight(a) for a in active}
        xq = base._fake_input(x)
        result = self._recomputed(
            self._merged_weight(deltas),
            lambda: self._merged_weight({a: self.get_delta_weight(a) for a in active}),
            lambda w: F.linear(xq, w, base.bias),
            "merged weight",
        )
        if self.training:
            for adapter, delta in deltas.items():
                dropout = self.lora_dropout[adapter]
                if isinstance(dropout, nn.Identity):
                    continue
                xa = self._cast_input_dtype(x, delta.dtype)
                xd = dropout(xa) - xa
                result = result + self._recomputed(
                    delta,
                    lambda adapter=adapter: self.get_delta_weight(adapter),
                    lambda d, xd=xd: F.linear(xd, d),
                ).to(result.dtype)
        return result


def adopt(module: nn.Module, *, pruned: bool | None = None, owner: str = "adopt") -> ShrinkLoraLinear:
    """Make the ``peft.tuners.lora.Linear`` ``module`` a :class:`ShrinkLoraLinear`, in place;
    ``pruned=True`` masks its adapter with its base weight's zeros.

    A base weight sharded by FSDP2 (a ``DTensor``) is supported when FSDP2 gathers it for the forward
    of the unit holding the LoRA layer (``fully_shard`` on a block around the layer, or on a module
    above it, as usual): the layer then reads the whole weight, uncached, at every forward.

    Raises:
        TypeError: ``module`` is not a peft LoRA ``Linear``.
    """
    if not isinstance(module, LoraLinear):
        raise TypeError(f"{owner}: {type(module).__name__} is not a peft.tuners.lora.Linear")
    weight = getattr(module.get_base_layer(), "weight", None)
    if not isinstance(module, ShrinkLoraLinear):
        module.__class__ = ShrinkLoraLinear
    if _is_dtensor(weight):
        module.__dict__[_SHARDED] = True
        module.__dict__.pop(_CACHE, None)
    if pruned is not None:
        module.__dict__[_PRUNED] = pruned
        module.__dict__.pop(_CACHE, None)
    return module


def _is_dtensor(weight: Any) -> bool:
    return type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor"


def masks_delta(module: nn.Module) -> bool:
    """Whether the LoRA layer ``module`` masks its adapter delta with its base weight's zeros."""
    return isinstance(module, ShrinkLoraLinear) and bool(module.__dict__.get(_PRUNED))


def dense_adapter_path(module: nn.Module) -> bool:
    """Whether ``module`` computes its adapter as a dense delta outside ``lora_A``/``lora_B``'s own
    forward (a pruned base weight, or merged fake quantization): per-layer per-example gradient
    engines do not see that computation."""
    return isinstance(module, ShrinkLoraLinear) and (
        bool(module.__dict__.get(_PRUNED)) or module._merged_quantization()
    )
