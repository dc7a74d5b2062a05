"""Built-in, configuration-free quantization plugin (registered as ``"int8"``).

Converts fake-quantized layers to int8 layers (``shrink_convert``), encodes them for export
(``shrink_export``, ``tryfirst`` so that the pruning codec, ``trylast``, sparse-encodes the int8
tensors afterwards), checks them on load (``shrink_load``, ``trylast``: after sparse decoding) and
rebuilds the int8 layers of a loaded model (``shrink_load_model``).

Export metadata, under ``metadata["quantization"]``::

    {"format_version": 1,
     "layers": {"<qualified name>": {"class": "Int8Linear", "config": {...}}, ...}}

Each layer's tensors are ``<name>.weight`` (int8), ``<name>.weight_scale`` (float32) and, when
present, ``<name>.bias``, ``<name>.input_scale``, ``<name>.input_zero_point``. The weight of a
4-bit layer (``config["weight_bits"] == 4``) is stored packed, two values per byte: a uint8 tensor
of ``ceil(numel / 2)`` bytes, element ``2i`` in the low nibble and ``2i + 1`` in the high one, each
as its two's complement; the layer entry's ``"int4_shape"`` gives the unpacked shape.

A language-model head tied to its input embedding shares the embedding's ``weight`` and
``weight_scale`` tensors; :func:`lightning_shrink.export` writes them once and records the head's
names as aliases of the embedding's, and :func:`lightning_shrink.load` makes them one tensor again.

A damaged section (an unknown layer class, a missing or malformed entry, a missing tensor) is a
``ValueError`` naming the layer.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.quantization.fake_layers import is_prepared
from lightning_shrink.quantization.int8_layers import INT8_CLASSES, convert_modules, is_converted
from lightning_shrink.types import ReportRow

if TYPE_CHECKING:
    import lightning.pytorch as pl

METADATA_KEY = "quantization"
FORMAT_VERSION = 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two int4 values (int8 tensor, each in ``[-8, 7]``) per uint8, flattened; see module docs."""
    flat = values.reshape(-1).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The int8 tensor of ``shape`` that :func:`pack_int4` packed."""
    numel = 1
    for d in shape:
        numel *= d
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed int4 tensor of {packed.numel()} {packed.dtype} values does not hold shape {shape}"
        )
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].to(torch.int16)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8).reshape(shape)


def _layer_tensor_names(layer: Mapping[str, Any]) -> list[str]:
    """The tensors an int8 layer's state holds, from its class and config."""
    config = layer["config"]
    names = ["weight", "weight_scale"]
    if layer["class"] in ("Int8Linear", "Int8Conv"):
        if config.get("bias", True):
            names.append("bias")
        if config.get("activations") == "static":
            names += ["input_scale", "input_zero_point"]
    return names


@hookimpl
def shrink_convert(model: nn.Module) -> None:
    """Replace every fake-quantized layer by its int8 layer (a tied head shares its table's)."""
    for name, module in convert_modules(model).items():
        _set_submodule(model, name, module)


@hookimpl(tryfirst=True)
def shrink_export(
    model: nn.Module, tensors: MutableMapping[str, torch.Tensor], metadata: MutableMapping[str, Any]
) -> None:
    """Write prepared and converted layers as int8 values and scales (int4 packed, tied tables once)."""
    converted = convert_modules(model)
    layers: dict[str, Any] = {}
    packed: dict[int, torch.Tensor] = {}  # by the int8 weight: a shared table is packed once
    for name, module in model.named_modules():
        if not name:
            continue
        if name in converted:
            int8 = converted[name]
            for key in [*module._parameters, *module._buffers]:
                tensors.pop(f"{name}.{key}", None)
            for key, value in int8.state_dict().items():
                tensors[f"{name}.{key}"] = value
        elif is_converted(module):
            int8 = module
        else:
            continue
        layers[name] = {"class": type(int8).__name__, "config": int8.config()}
        if int8.weight_bits == 4:
            layers[name]["int4_shape"] = list(int8.weight.shape)
            if id(int8.weight) not in packed:
                packed[id(int8.weight)] = pack_int4(int8.weight)
            tensors[f"{name}.weight"] = packed[id(int8.weight)]
    if layers:
        metadata[METADATA_KEY] = {"format_version": FORMAT_VERSION, "layers": layers}


def _damaged(name: str, problem: str) -> ValueError:
    return ValueError(
        f"export: quantized layer {name!r}: {problem}; the file is damaged or was written by another tool"
    )


def _layers(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The export's quantized layers, each entry checked (see the module docs)."""
    section = metadata.get(METADATA_KEY)
    if not section:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(f"export: `{METADATA_KEY}` in shrink_config.json must be an object, got {section!r}")
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"export written with quantization format version {section.get('format_version')!r}; this "
            f"lightning-shrink reads version {FORMAT_VERSION}"
        )
    layers = section.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(
            f"export: `{METADATA_KEY}.layers` in shrink_config.json must map layer names to entries, "
            f"got {layers!r}"
        )
    for name, layer in layers.items():
        if not isinstance(layer, Mapping):
            raise _damaged(name, f"its entry must be an object, got {layer!r}")
        if layer.get("class") not in INT8_CLASSES:
            raise _damaged(
                name, f"unknown quantized class {layer.get('class')!r} (known: {sorted(INT8_CLASSES)})"
            )
        if not isinstance(layer.get("config"), Mapping):
            raise _damaged(name, f"its `config` must be an object, got {layer.get('config')!r}")
        shape = layer.get("int4_shape")
        if "int4_shape" in layer and not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _damaged(name, f"`int4_shape` must be a list of non-negative ints, got {shape!r}")
    return dict(layers)


@hookimpl(trylast=True)
def shrink_load(tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Unpack int4 weights and check every int8 layer's tensors, after sparse decoding."""
    aliases = metadata.get("aliases", {})
    for name, layer in _layers(metadata).items():
        for tensor in _layer_tensor_names(layer):
            key = f"{name}.{tensor}"
            if key not in tensors and key not in aliases:  # an alias is its source's tensor
                raise _damaged(name, f"the tensor {key!r} is missing")
        weight = tensors.get(f"{name}.weight")
        if weight is None:
            continue
        if "int4_shape" in layer:
            try:
                weight = tensors[f"{name}.weight"] = unpack_int4(weight, layer["int4_shape"])
            except ValueError as exc:
                raise _damaged(name, str(exc)) from exc
        if weight.dtype != torch.int8:
            raise _damaged(name, f"it needs an int8 '{name}.weight', got {weight.dtype}")


@hookimpl
def shrink_load_model(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Put the int8 layers back into the rebuilt float architecture."""
    for name, layer in _layers(metadata).items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(
                f"export: quantized layer {name!r} does not exist in the rebuilt {type(model).__name__}"
            ) from exc
        try:
            int8 = INT8_CLASSES[layer["class"]].from_config(dict(layer["config"]))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _damaged(
                name, f"its config {dict(layer['config'])} does not build a {layer['class']}: {exc}"
            ) from exc
        _set_submodule(model, name, int8)


@hookimpl
def shrink_report_rows(trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
    """Report int8 layers, and a bare model's fake-quantized layers under their owners' names."""
    rows: list[ReportRow] = []
    if trainer is None:  # with a Trainer, each QuantizationAwareTraining reports its own layers
        owners: dict[str, list[nn.Module]] = {}
        for m in model.modules():
            if is_prepared(m):
                owners.setdefault(m.shrink_qat.owner, []).append(m)
        for owner, prepared in owners.items():
            bits = sorted({m.shrink_qat.weight_bits for m in prepared})
            rows.append(ReportRow(owner, "fake-quantized layers", len(prepared)))
            rows.append(ReportRow(owner, "weight bits", bits[0] if len(bits) == 1 else bits))
    converted = [m for m in model.modules() if is_converted(m)]
    if converted:
        rows.append(ReportRow("quantization", "int8 layers", len(converted)))
    return rows or None
