"""Converting and exporting LoRA models: merged (one compressed weight per layer, the adapters folded
in) or base + adapters (compressed base weights, float adapters), and rebuilding the latter on
:func:`~lightning_shrink.load` from the ``LoraConfig`` fields the export records, without running
code from the directory."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lightning_shrink.adapters import lora_layers, require_peft
from lightning_shrink.quantization.fake_layers import is_prepared

__all__ = [
    "RECORDED_FIELDS",
    "merge_adapters",
    "peft_builder",
    "peft_section",
    "resolve_merge",
    "restore_lora",
]

#: The ``LoraConfig`` fields a base + adapters export records (every other field must keep peft's
#: default, or the export is refused).
RECORDED_FIELDS: tuple[str, ...] = (
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)

#: Fields that describe where a config came from or how it initializes adapters, not what the
#: adapters compute (the exported weights are loaded over any initialization).
_BOOKKEEPING = {
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "runtime_config",
}

#: The section of ``shrink_config.json`` a base + adapters export writes.
SECTION = "peft"
SECTION_VERSION = 1


def _modes(model: nn.Module) -> set[str]:
    """The ``adapters`` modes of the QuantizationAwareTraining that prepared LoRA base layers."""
    modes = set()
    for layer in lora_layers(model).values():
        base = layer.get_base_layer()
        if is_prepared(base):
            modes.add(getattr(base.shrink_qat.config, "adapters", "base"))
    return modes


def resolve_merge(model: nn.Module, merge_adapters: bool | None, owner: str) -> bool | None:
    """Whether ``owner`` (``"convert"``, ``"export"``) merges the LoRA adapters of ``model``
    (``None``: the model has none).

    ``merge_adapters=None`` merges unless the base layers were fake-quantized with
    ``adapters="base"``. An explicit choice that deploys other weights than the fake-quantized
    training simulated is refused.

    Raises:
        TypeError: ``merge_adapters`` is not a bool or ``None``.
        ValueError: ``merge_adapters`` contradicts the ``adapters`` mode of quantization-aware
            training.
    """
    if merge_adapters is not None and not isinstance(merge_adapters, bool):
        raise TypeError(f"{owner}: `merge_adapters` must be a bool or None, got {merge_adapters!r}")
    if not lora_layers(model):
        return None
    modes = _modes(model)
    merge = merge_adapters if merge_adapters is not None else "base" not in modes
    wrong = "base" if merge else "merged"
    if wrong in modes:
        deploy = "merged int8 weights fq(W + s·B·A)" if merge else "int8 base weights + float adapters"
        trained = "the base weight alone" if wrong == "base" else "the merged weight"
        raise ValueError(
            f"{owner}: merge_adapters={merge} deploys {deploy}, but QuantizationAwareTraining("
            f"adapters={wrong!r}) fake-quantized {trained}: the exported model would compute with weights "
            f"training never saw. Pass merge_adapters={not merge}, or train with adapters="
            f"{'merged' if merge else 'base'!r}"
        )
    return merge


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base weight, in place, and return the model
    without peft layers (a ``PeftModel`` returns its base model, as ``merge_and_unload`` does; a
    ``modules_to_save`` wrapper becomes its active copy). Pruned positions stay zero (see
    :class:`~lightning_shrink.adapters.lora_layer.ShrinkLoraLinear`); a fake-quantized base layer
    keeps its class, so :func:`~lightning_shrink.convert` quantizes the merged weight."""
    peft = require_peft("merging LoRA adapters")
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if name and isinstance(module, peft.PeftModel):
            _set_submodule(model, name, module.merge_and_unload())
    for name, module in list(model.named_modules()):
        try:
            current = model.get_submodule(name)
        except AttributeError:  # inside a module replaced above
            continue
        if current is not module:
            continue
        if isinstance(module, BaseTunerLayer):
            module.merge()
            _set_submodule(model, name, module.get_base_layer())
        elif isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
            active = module.active_adapters
            _set_submodule(
                model, name, module.modules_to_save[active[0]] if active else module.original_module
            )
    return model


def _json_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "value") and isinstance(value.value, str):  # an enum such as TaskType
        return value.value
    return value


def peft_section(model: nn.Module) -> dict[str, Any]:
    """The ``peft`` section of a base + adapters export of ``model``: the LoRA layers whose adapter
    is masked by a pruned base weight (``masked_layers``, restored by :func:`restore_lora`) and, for a
    ``PeftModel``, what :func:`peft_builder` needs to rebuild it around its base model
    (``adapter_name``, ``lora_config``; any other model, such as a LightningModule holding LoRA
    layers, is loaded with ``model=``).

    Raises:
        ValueError: several adapters, a config that is not a ``LoraConfig``, or a ``LoraConfig`` field
            this export cannot record (named).
    """
    peft = require_peft("exporting LoRA adapters")
    from lightning_shrink.adapters.lora_layer import masks_delta

    masked = sorted(name for name, layer in lora_layers(model).items() if masks_delta(layer))
    section: dict[str, Any] = {"version": SECTION_VERSION, "masked_layers": masked}
    if not isinstance(model, peft.PeftModel):
        return section
    configs = dict(model.peft_config)
    if len(configs) != 1:
        raise ValueError(
            f"export: the PeftModel holds the adapters {sorted(configs)}; a base + adapters export holds "
            "one. Delete the others (model.delete_adapter) or export with merge_adapters=True"
        )
    ((adapter, config),) = configs.items()
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"export: adapter {adapter!r} is a {type(config).__name__}, not a LoraConfig")
    default = peft.LoraConfig()
    for f in dataclasses.fields(config):
        if f.name in RECORDED_FIELDS or f.name in _BOOKKEEPING:
            continue
        if getattr(config, f.name) != getattr(default, f.name):
            raise ValueError(
                f"export: LoraConfig.{f.name}={getattr(config, f.name)!r} is not supported by a base + "
                "adapters export (it records plain LoRA only); export with merge_adapters=True"
            )
    fields = {name: _json_value(getattr(config, name)) for name in RECORDED_FIELDS}
    return {**section, "adapter_name": adapter, "lora_config": fields}


# ---------------------------------------------------------------------------- load


def _strings(value: Any, allow_str: bool = True) -> bool:
    return (allow_str and isinstance(value, str)) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checks(task_types: set[str]) -> dict[str, tuple[Callable[[Any], bool], str]]:
    return {
        "task_type": (lambda v: v is None or v in task_types, f"None or one of {sorted(task_types)}"),
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
        "lora_alpha": (lambda v: _number(v) and v > 0, "a positive number"),
        "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (lambda v: v is None or _strings(v), "None, a string or a list of strings"),
        "exclude_modules": (lambda v: v is None or _strings(v), "None, a string or a list of strings"),
        "fan_in_fan_out": (lambda v: isinstance(v, bool), "a bool"),
        "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
        "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
        "modules_to_save": (lambda v: v is None or _strings(v, allow_str=False), "None or a list of strings"),
        "layers_to_transform": (
            lambda v: (
                v is None
                or (isinstance(v, int) and not isinstance(v, bool))
                or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
            ),
            "None, an int or a list of ints",
        ),
        "layers_pattern": (lambda v: v is None or _strings(v), "None, a string or a list of strings"),
        "rank_pattern": (
            lambda v: (
                isinstance(v, dict)
                and all(
                    isinstance(k, str) and isinstance(r, int) and not isinstance(r, bool) and r >= 1
                    for k, r in v.items()
                )
            ),
            "an object of ints >= 1",
        ),
        "alpha_pattern": (
            lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(a) for k, a in v.items()),
            "an object of numbers",
        ),
    }


def _checked_section(section: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(section, Mapping) or section.get("version") != SECTION_VERSION:
        raise ValueError(
            f"load: the `{SECTION}` section of {where} must be an object of version {SECTION_VERSION}, got "
            f"{section!r}"
        )
    masked = section.get("masked_layers")
    if not _strings(masked, allow_str=False):
        raise ValueError(
            f"load: `{SECTION}.masked_layers` in {where} must be a list of names, got {masked!r}"
        )
    return section


def restore_lora(model: nn.Module, section: Any, where: str) -> None:
    """Give the LoRA layers an export names in ``masked_layers`` their masked adapter again (the
    delta is zero where the loaded base weight is).

    Raises:
        ValueError: a name that is not a peft LoRA ``Linear`` of ``model``.
    """
    section = _checked_section(section, where)
    if not section["masked_layers"]:
        return
    require_peft(f"loading the LoRA export {where}")
    from peft.tuners.lora import Linear

    from lightning_shrink.adapters.lora_layer import adopt

    for name in section["masked_layers"]:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, Linear):
            raise ValueError(
                f"load: `{SECTION}.masked_layers` in {where} names {name!r}, which is not a peft LoRA Linear "
                f"of the {type(model).__name__} loaded"
            )
        adopt(layer, pruned=True)


def _validated(section: Any, where: str) -> tuple[str, dict[str, Any]]:
    peft = require_peft(f"loading the LoRA export {where}")
    section = _checked_section(section, where)
    adapter = section.get("adapter_name")
    if not (isinstance(adapter, str) and adapter.isidentifier()):
        raise ValueError(f"load: `{SECTION}.adapter_name` in {where} must be an identifier, got {adapter!r}")
    fields = section.get("lora_config")
    if not isinstance(fields, Mapping):
        raise ValueError(f"load: `{SECTION}.lora_config` in {where} must be an object, got {fields!r}")
    unknown = sorted(set(fields) - set(RECORDED_FIELDS))
    if unknown:
        raise ValueError(
            f"load: `{SECTION}.lora_config` in {where} sets {unknown}, which a lightning-shrink export never "
            f"records (known: {list(RECORDED_FIELDS)})"
        )
    checks = _checks({t.value for t in peft.TaskType})
    for name, value in fields.items():
        ok, expected = checks[name]
        if not ok(value):
            raise ValueError(
                f"load: `{SECTION}.lora_config.{name}` in {where} must be {expected}, got {value!r}"
            )
    return adapter, dict(fields)


def peft_builder(build: Callable[[], nn.Module], section: Any, where: str) -> Callable[[], nn.Module]:
    """Wrap the builder of an export's base model so that it returns the ``PeftModel`` the export
    recorded: ``peft.get_peft_model(base, LoraConfig(**fields), adapter_name)``, the fields validated
    first (only the :data:`RECORDED_FIELDS`, each of its type and range).

    Raises:
        ImportError: peft is not installed (names the extra).
        ValueError: the section is damaged or records an unknown field or value.
    """
    adapter, fields = _validated(section, where)
    peft = require_peft(f"loading the LoRA export {where}")

    def rebuild() -> nn.Module:
        config = peft.LoraConfig(**fields, init_lora_weights=False)
        return peft.get_peft_model(build(), config, adapter_name=adapter)

    return rebuild
