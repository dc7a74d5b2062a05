"""`convert`: a trained model in its compressed inference form (``shrink_convert``)."""

from __future__ import annotations

import copy

from torch import nn

from lightning_shrink.adapters.export import merge_adapters as merge_lora
from lightning_shrink.adapters.export import resolve_merge
from lightning_shrink.config import check_bool
from lightning_shrink.manager import ShrinkPluginManager, get_plugin_manager
from lightning_shrink.pruning.semi_structured import check_semi_structured_available, to_semi_structured


def _signature(model: nn.Module) -> list[tuple[str, type, list[tuple[str, type, tuple[int, ...]]]]]:
    """Module types and their tensors' types and shapes: what a conversion changes."""
    return [
        (
            name,
            type(m),
            [
                (k, type(t), tuple(t.shape))
                for k, t in [*m._parameters.items(), *m._buffers.items()]
                if t is not None
            ],
        )
        for name, m in model.named_modules()
    ]


def convert(
    model: nn.Module,
    inplace: bool = False,
    pluginmanager: ShrinkPluginManager | None = None,
    *,
    semi_structured: bool = False,
    merge_adapters: bool | None = None,
) -> nn.Module:
    """Convert a trained model into its compressed inference form.

    Calls ``shrink_convert``: structured pruning physically removes the attention heads and FFN
    neurons whose weights are all zero (smaller layers, per-layer sizes may differ; see
    :mod:`lightning_shrink.pruning.shrink`), then quantization replaces every fake-quantized layer by
    an int8 layer (see :mod:`lightning_shrink.quantization`). Conversion is never done by ``fit``.

    Args:
        model: The trained model (a LightningModule or any ``nn.Module`` inside it).
        inplace: Convert ``model`` itself; by default a deep copy is converted and ``model``
            stays trainable.
        pluginmanager: The manager whose plugins convert; default :func:`get_plugin_manager`.
        semi_structured: Also store the weight of every 2:4-sparse ``nn.Linear`` as a
            ``torch.sparse`` semi-structured tensor (CUDA only, frozen; pays at large batches, see
            :mod:`lightning_shrink.pruning.semi_structured`). Off by default: it is refused without a
            CUDA device.
        merge_adapters: For a model with peft LoRA adapters: fold them into the base weights
            before quantizing (``True``: one int8 weight per layer, no peft layers left) or keep them
            in float over int8 base layers (``False``). ``None`` follows how training fake-quantized
            them (``QuantizationAwareTraining(adapters=...)``: ``"merged"`` merges). See docs/peft.md.

    Returns:
        The converted model (``model`` itself when ``inplace``; merged, a ``PeftModel``'s base model).

    Raises:
        ValueError: If nothing was converted, e.g. the model was never prepared by
            ``QuantizationAwareTraining``, has no pruned heads or neurons, or is already converted;
            ``semi_structured=True`` without a CUDA device or without a layer it can convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: `model` must be a torch.nn.Module, got {type(model).__name__}")
    check_bool("convert", "semi_structured", semi_structured)
    if semi_structured:
        check_semi_structured_available()
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    target = model if inplace else copy.deepcopy(model)
    if resolve_merge(target, merge_adapters, "convert"):
        target = merge_lora(target)
    before = _signature(target)
    pm.hook.shrink_convert(model=target)
    if semi_structured:
        to_semi_structured(target)
    if _signature(target) == before:
        plugins = sorted({impl.plugin_name for impl in pm.hook.shrink_convert.get_hookimpls()})
        raise ValueError(
            f"convert: nothing to convert in {type(model).__name__}: it has no layer prepared by a "
            f"lightning-shrink technique (was it trained with QuantizationAwareTraining, or pruned with "
            f"pattern='heads' / 'neurons'? is it already converted?); plugins that convert: {plugins}"
        )
    return target
