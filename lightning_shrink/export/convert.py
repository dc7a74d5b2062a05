"""`convert`: a trained model in its compressed inference form (``shrink_convert``)."""

from __future__ import annotations

import copy

from torch import nn

from lightning_shrink.adapters.export import merge_adapters as merge_lora
from lightning_shrink.adapters.export import resolve_merge
from lightning_shrink.manager import ShrinkPluginManager, get_plugin_manager


def _signature(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def convert(
    model: nn.Module,
    inplace: bool = False,
    pluginmanager: ShrinkPluginManager | None = None,
    merge_adapters: bool | None = None,
) -> nn.Module:
    """Convert a trained model into its compressed inference form.

    Calls ``shrink_convert``: quantization replaces every fake-quantized layer by an int8 layer
    (see :mod:`lightning_shrink.quantization`). Conversion is never done by ``fit``.

    Args:
        model: The trained model (a LightningModule or any ``nn.Module`` inside it).
        inplace: Convert ``model`` itself; by default a deep copy is converted and ``model``
            stays trainable.
        pluginmanager: The manager whose plugins convert; default :func:`get_plugin_manager`.
        merge_adapters: For a model with peft LoRA adapters: fold them into the base weights
            before quantizing (``True``: one int8 weight per layer, no peft layers left) or keep them
            in float over int8 base layers (``False``). ``None`` follows how training fake-quantized
            them (``QuantizationAwareTraining(adapters=...)``: ``"merged"`` merges). See docs/peft.md.

    Returns:
        The converted model (``model`` itself when ``inplace``; merged, a ``PeftModel``'s base model).

    Raises:
        ValueError: If no plugin converted anything, e.g. the model was never prepared by
            ``QuantizationAwareTraining`` or is already converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: `model` must be a torch.nn.Module, got {type(model).__name__}")
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    target = model if inplace else copy.deepcopy(model)
    if resolve_merge(target, merge_adapters, "convert"):
        target = merge_lora(target)
    before = _signature(target)
    pm.hook.shrink_convert(model=target)
    if _signature(target) == before:
        plugins = sorted({impl.plugin_name for impl in pm.hook.shrink_convert.get_hookimpls()})
        raise ValueError(
            f"convert: nothing to convert in {type(model).__name__}: it has no layer prepared by a "
            f"lightning-shrink technique (was it trained with QuantizationAwareTraining? is it already "
            f"converted?); plugins that convert: {plugins}"
        )
    return target
