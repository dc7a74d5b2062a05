"""LoRA (peft) awareness of the techniques: which parameters are adapters, which are the frozen base
weights under them, what is refused.

With a peft model (a ``PeftModel``, or LoRA layers injected with ``peft.inject_adapter_in_model``,
inside a LightningModule), pruning and quantization-aware training act on the *base* weights under
the adapters, never on ``lora_A`` / ``lora_B``; ``modules_to_save`` copies are left alone unless
``modules`` selects them, and the frozen ``original_module`` behind such a copy never is. Supported:
LoRA on ``Linear`` layers (``peft.tuners.lora.Linear``) without variants; every other peft layer
(DoRA, ``lora_bias``, LoRA on embeddings or convolutions, IA3, LoHa, ...) is refused at set-up with
a message naming it.

Nothing here imports peft: a model has peft layers only if peft was imported to build it, so the
lookups read ``sys.modules``. The parts that need peft (:mod:`lightning_shrink.adapters.lora_layer`,
:mod:`lightning_shrink.adapters.export`) import it, and say which extra to install when it is missing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

__all__ = [
    "PEFT_EXTRA",
    "AdapterRoles",
    "adapter_roles",
    "check_supported",
    "effective_weight",
    "has_lora",
    "lora_base_layers",
    "lora_layers",
    "mask_lora_deltas",
    "privacy_problems",
    "quantize_lora_merged",
    "require_peft",
    "unsupported_layers",
]

#: What to install for the features that need peft.
PEFT_EXTRA = 'pip install "lightning-shrink[peft]"'


def require_peft(feature: str) -> ModuleType:
    """Import peft for ``feature``, or raise an ``ImportError`` that names the extra to install."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"{feature} needs peft: {PEFT_EXTRA}") from exc
    return peft


def _loaded() -> bool:
    return "peft" in sys.modules


def _tuner_layer_class() -> type | None:
    if not _loaded():
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every peft tuner layer of ``model`` (LoRA or another method), by qualified name."""
    tuner = _tuner_layer_class()
    if tuner is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, tuner)}


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft tuner layers."""
    return bool(lora_layers(model))


def _method(module: nn.Module) -> str:
    """The peft method of a tuner layer, from the package that defines it (``"ia3"``, ``"loha"``)."""
    parts = type(module).__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["peft", "tuners"] else type(module).__module__


def _variant_names(module: nn.Module) -> list[str]:
    names = []
    for adapter, variant in getattr(module, "lora_variant", {}).items():
        kind = type(variant).__name__.replace("LinearVariant", "").replace("Variant", "")
        names.append(f"{kind or type(variant).__name__} (adapter {adapter!r})")
    return names


def unsupported_layers(model: nn.Module) -> list[str]:
    """What :func:`check_supported` refuses, one line per layer."""
    layers = lora_layers(model)
    if not layers:
        return []
    from peft.tuners.lora import Linear

    problems = []
    for name, module in layers.items():
        if not isinstance(module, Linear):
            method = _method(module)
            what = f"peft method {method!r}" if method != "lora" else "LoRA on a non-Linear layer"
            problems.append(f"{name} is a {type(module).__name__} ({what})")
            continue
        variants = _variant_names(module)
        if variants:
            problems.append(f"{name} uses the LoRA variant {', '.join(variants)}")
        if any(getattr(module, "lora_bias", {}).values()):
            problems.append(f"{name} has lora_bias=True")
        if getattr(module, "merged_adapters", None):
            problems.append(f"{name} has merged adapters {module.merged_adapters} (unmerge them first)")
    return problems


def check_supported(model: nn.Module, owner: str) -> None:
    """Refuse peft layers the techniques do not handle, naming the layer and the method.

    Raises:
        ValueError: a tuner layer that is not plain LoRA on a ``Linear`` (DoRA and other LoRA
            variants, ``lora_bias``, LoRA on embeddings or convolutions, other peft methods).
    """
    problems = unsupported_layers(model)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"{owner}: {shown}. lightning-shrink supports LoRA on Linear layers (peft LoraConfig without "
            "use_dora, lora_bias or other variants); other peft methods and variants are not supported"
        )


@dataclass
class AdapterRoles:
    """What the LoRA layers of a model make of its modules and parameters (all by ``id``).

    Attributes:
        adapters: The ``lora_A`` / ``lora_B`` modules of every adapter.
        base_weights: ``id(base_layer.weight)`` -> the LoRA layer's qualified name.
        base_layers: ``id(base_layer)`` -> the LoRA layer's qualified name.
        copies: The trainable ``modules_to_save`` copies (every module inside them).
        originals: The frozen ``original_module`` behind each copy (every module inside them).
    """

    adapters: set[int] = field(default_factory=set)
    base_weights: dict[int, str] = field(default_factory=dict)
    base_layers: dict[int, str] = field(default_factory=dict)
    copies: set[int] = field(default_factory=set)
    originals: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.adapters or self.copies)

    def unsupported(self, module: nn.Module, explicit: bool) -> str | None:
        """Why a selector skips ``module`` (``None``: it may be selected). ``explicit``: the user gave
        ``modules`` patterns, which may select ``modules_to_save`` copies."""
        if id(module) in self.adapters:
            return "it is a LoRA adapter matrix (lora_A/lora_B); compression acts on the base layer under it"
        if id(module) in self.originals:
            return "it is the frozen original of a peft modules_to_save copy, which the model does not run"
        if id(module) in self.copies and not explicit:
            return "it is a peft modules_to_save copy; name it in `modules` to select it"
        return None


def adapter_roles(model: nn.Module) -> AdapterRoles:
    """The :class:`AdapterRoles` of ``model`` (empty when it has no peft layer)."""
    roles = AdapterRoles()
    if not _loaded():
        return roles
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                for adapter in getattr(module, attr, {}).values() if hasattr(module, attr) else ():
                    if isinstance(adapter, nn.Module):
                        roles.adapters.update(id(m) for m in adapter.modules())
            base = module.get_base_layer()
            roles.base_layers[id(base)] = name
            weight = getattr(base, "weight", None)
            if isinstance(weight, nn.Parameter):
                roles.base_weights[id(weight)] = name
        elif isinstance(module, AuxiliaryTrainingWrapper):
            original = getattr(module, "original_module", None)
            if isinstance(original, nn.Module):
                roles.originals.update(id(m) for m in original.modules())
            copies = getattr(module, "modules_to_save", None)
            if isinstance(copies, nn.Module):
                roles.copies.update(id(m) for m in copies.modules())
    return roles


def lora_base_layers(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The parameters among ``names`` that are the base weight of a LoRA layer: parameter name -> the
    LoRA layer's qualified name (empty without peft layers)."""
    roles = adapter_roles(model)
    if not roles.base_weights:
        return {}
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: roles.base_weights[id(params[n])] for n in names if id(params[n]) in roles.base_weights}


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the LoRA ``layer`` computes with, ``W + Σ M ⊙ s·B·A`` over its active adapters
    (``M`` the base weight's pruning mask, where the layer masks its delta), without gradient: what
    ``merge()`` would write into the base weight."""
    base = layer.get_base_layer()
    weight = base.weight.detach()
    if layer.disable_adapters or layer.merged:
        return weight
    with torch.no_grad():
        deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
        return weight + sum(d.to(weight.dtype) for d in deltas) if deltas else weight


def mask_lora_deltas(
    model: nn.Module, pruned: list[str], owner: str = "GradualMagnitudePruning"
) -> list[str]:
    """Make every LoRA layer whose base weight is among the ``pruned`` parameter names mask its adapter
    delta with that weight's zeros (:class:`~lightning_shrink.adapters.lora_layer.ShrinkLoraLinear`),
    so that the merged weight stays sparse; returns the LoRA layers' names."""
    names = sorted(set(lora_base_layers(model, pruned).values()))
    if names:
        from lightning_shrink.adapters.lora_layer import adopt

        for name in names:
            adopt(model.get_submodule(name), pruned=True, owner=owner)
    return names


def quantize_lora_merged(
    model: nn.Module, prepared: Iterable[nn.Module], owner: str = "QuantizationAwareTraining"
) -> list[str]:
    """Make every LoRA layer whose base layer is among the ``prepared`` (fake-quantized) layers compute
    with the fake-quantized merged weight (``adapters="merged"``); returns the LoRA layers' names."""
    roles = adapter_roles(model)
    if not roles.base_layers:
        return []
    names = sorted({roles.base_layers[id(m)] for m in prepared if id(m) in roles.base_layers})
    if names:
        from lightning_shrink.adapters.lora_layer import adopt

        for name in names:
            adopt(model.get_submodule(name), owner=owner)
    return names


def privacy_problems(model: nn.Module) -> list[str]:
    """Why per-example clipping of a LoRA model's adapter gradients would be wrong (empty: it is
    right): unsupported peft layers, adapters computed as a dense delta outside ``lora_A``/``lora_B``
    (pruned base weights, merged fake quantization), a trainable parameter shared by several adapter
    modules (its per-example gradient would be split across layers)."""
    layers = lora_layers(model)
    if not layers:
        return []
    problems = [
        f"{line}: lightning-shrink supports LoRA on Linear layers only" for line in unsupported_layers(model)
    ]
    from lightning_shrink.adapters.lora_layer import dense_adapter_path

    dense = [name for name, layer in layers.items() if dense_adapter_path(layer)]
    if dense:
        problems.append(
            f"the LoRA layers {dense[:3]}{'...' if len(dense) > 3 else ''} compute their adapter as a "
            "dense delta (their base weight is pruned, or QuantizationAwareTraining(adapters='merged') "
            "fake-quantizes the merged weight), outside the lora_A/lora_B layers whose per-example "
            "gradients are computed; use QuantizationAwareTraining(adapters='base') and prune in a run "
            "without DifferentialPrivacy"
        )
    roles = adapter_roles(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in roles.adapters:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                owners.setdefault(id(param), []).append(f"{name}.{pname}")
    shared = [names for names in owners.values() if len(names) > 1]
    for names in shared[:3]:
        problems.append(
            f"the trainable adapter parameter {names[0]} is shared with {names[1:]}: its per-example "
            "gradient is the sum over the layers that use it, which per-layer clipping does not "
            "compute; give each adapter its own parameters"
        )
    return problems
