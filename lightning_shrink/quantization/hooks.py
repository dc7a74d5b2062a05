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
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.quantization.modules import INT8_CLASSES, convert_module, is_converted, is_prepared
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


@hookimpl
def shrink_convert(model: nn.Module) -> None:
    for name, module in [(n, m) for n, m in model.named_modules() if n and is_prepared(m)]:
        _set_submodule(model, name, convert_module(module))


@hookimpl(tryfirst=True)
def shrink_export(
    model: nn.Module, tensors: MutableMapping[str, torch.Tensor], metadata: MutableMapping[str, Any]
) -> None:
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if is_prepared(module):
            int8 = convert_module(module)
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
            tensors[f"{name}.weight"] = pack_int4(tensors[f"{name}.weight"])
    if layers:
        metadata[METADATA_KEY] = {"format_version": FORMAT_VERSION, "layers": layers}


def _layers(metadata: Mapping[str, Any]) -> dict[str, Any]:
    section = metadata.get(METADATA_KEY)
    if not section:
        return {}
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"export written with quantization format version {section.get('format_version')!r}; this "
            f"lightning-shrink reads version {FORMAT_VERSION}"
        )
    return section["layers"]


@hookimpl(trylast=True)
def shrink_load(tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    for name, layer in _layers(metadata).items():
        if layer["class"] not in INT8_CLASSES:
            raise ValueError(f"export: layer {name!r} has unknown quantized class {layer['class']!r}")
        weight, scale = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
        if weight is not None and "int4_shape" in layer:
            try:
                weight = tensors[f"{name}.weight"] = unpack_int4(weight, layer["int4_shape"])
            except ValueError as exc:
                raise ValueError(f"export: quantized layer {name!r}: {exc}") from exc
        if weight is None or scale is None or weight.dtype != torch.int8:
            raise ValueError(
                f"export: quantized layer {name!r} needs an int8 '{name}.weight' and a "
                f"'{name}.weight_scale' tensor; the file is damaged or was written by another tool"
            )


@hookimpl
def shrink_load_model(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    for name, layer in _layers(metadata).items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(
                f"export: quantized layer {name!r} does not exist in the rebuilt {type(model).__name__}"
            ) from exc
        _set_submodule(model, name, INT8_CLASSES[layer["class"]].from_config(layer["config"]))


@hookimpl
def shrink_report_rows(trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
    prepared = [m for m in model.modules() if is_prepared(m)]
    converted = [m for m in model.modules() if is_converted(m)]
    if not prepared and not converted:
        return None
    rows = []
    if prepared:
        bits = sorted({m.shrink_qat.weight_bits for m in prepared})
        rows.append(ReportRow("quantization", "fake-quantized layers", len(prepared)))
        rows.append(ReportRow("quantization", "weight bits", bits[0] if len(bits) == 1 else bits))
        tables = [m for m in prepared if isinstance(m, nn.Embedding)]
        if tables:
            rows.append(ReportRow("quantization", "embedding bits", tables[0].shrink_qat.embedding_bits))
    if converted:
        rows.append(ReportRow("quantization", "int8 layers", len(converted)))
    return rows
