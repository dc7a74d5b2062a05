"""Reading a Hugging Face-native export (:mod:`lightning_shrink.export.hf`) back into the int8
layers of :func:`lightning_shrink.convert`, without compressed-tensors and without running code."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_shrink.export.architecture import _transformers_builder
from lightning_shrink.export.hf import _ZP_SHIFT, ACTIVATION_BITS, HF_FORMAT_VERSION
from lightning_shrink.export.layout import TRANSFORMERS_CONFIG_NAME, WEIGHTS_NAME

__all__ = ["load_hf"]


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"load: the Hugging Face-native export in {str(path)!r}: {problem}")


def _unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` inverse: eight 4-bit values per int32 along rows, low
    bits first, each stored as ``value + 8``."""
    rows, cols = shape
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != rows:
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not hold {shape}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    values = nibbles.reshape(rows, -1)[:, :cols]
    if values.shape[1] != cols:
        raise ValueError(f"packed weight {tuple(packed.shape)} holds fewer than {cols} columns")
    return (values - 8).to(torch.int8)


def _layer_spec(path: Path, group_name: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """The int8-layer settings a config group describes (only what our layers compute)."""
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise _damaged(path, f"config group {group_name!r} has no `weights` object")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    group_size = weights.get("group_size") if strategy == "group" else None
    if (
        weights.get("type") != "int"
        or not weights.get("symmetric", True)
        or bits not in (8, 4)
        or strategy not in ("channel", "group")
        or weights.get("dynamic")
        or (strategy == "group" and not isinstance(group_size, int))
    ):
        raise _damaged(
            path,
            f"config group {group_name!r} has weights {dict(weights)}, which lightning-shrink's int8 "
            "layers do not compute (symmetric int8/int4 per channel or group); load it with transformers",
        )
    fmt = group.get("format")
    if fmt not in ("int-quantized", "pack-quantized") or (fmt == "pack-quantized" and bits != 4):
        raise _damaged(
            path,
            f"config group {group_name!r} has format {fmt!r}; lightning-shrink reads int-quantized "
            "(one value per byte) and pack-quantized int4; load it with transformers",
        )
    activations = None
    act = group.get("input_activations")
    if act is not None:
        if not (
            isinstance(act, Mapping)
            and act.get("type") == "int"
            and act.get("num_bits") == ACTIVATION_BITS
            and act.get("symmetric") is False
            and act.get("strategy") == "tensor"
        ):
            raise _damaged(
                path,
                f"config group {group_name!r} has input activations {act}, which lightning-shrink's int8 "
                f"layers do not compute (affine {ACTIVATION_BITS}-bit per tensor); load it with transformers",
            )
        activations = "dynamic" if act.get("dynamic") else "static"
    if group.get("output_activations") is not None:
        raise _damaged(
            path, f"config group {group_name!r} quantizes output activations, which is not supported"
        )
    return {
        "bits": bits,
        "group_size": group_size,
        "activations": activations,
        "packed": fmt == "pack-quantized",
    }


def _targets(path: Path, group_name: str, group: Mapping[str, Any]) -> list[re.Pattern[str]]:
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) and t.startswith("re:") for t in targets):
        raise _damaged(
            path, f"config group {group_name!r} must list its layers as 're:' patterns, got {targets!r}"
        )
    try:
        return [re.compile(t[3:]) for t in targets]
    except re.error as exc:
        raise _damaged(path, f"config group {group_name!r} has an invalid target pattern: {exc}") from exc


def _build_layers(
    path: Path, model: nn.Module, quantization: Mapping[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    from lightning_shrink.quantization.hooks import _set_submodule
    from lightning_shrink.quantization.int8_layers import Int8Embedding, Int8Linear

    groups = quantization.get("config_groups")
    if not isinstance(groups, Mapping):
        raise _damaged(path, "`quantization_config.config_groups` must be an object")
    if quantization.get("ignore"):
        raise _damaged(path, "`quantization_config.ignore` is not supported (layers are listed by name)")
    modules = dict(model.named_modules())
    done: set[str] = set()
    for group_name, group in groups.items():
        if not isinstance(group, Mapping):
            raise _damaged(path, f"config group {group_name!r} must be an object")
        spec = _layer_spec(path, group_name, group)
        patterns = _targets(path, group_name, group)
        for name, module in modules.items():
            if not name or name in done or not any(p.fullmatch(name) for p in patterns):
                continue
            done.add(name)
            if isinstance(module, nn.Embedding) and not spec["packed"] and spec["activations"] is None:
                layer: nn.Module = Int8Embedding(
                    module.num_embeddings,
                    module.embedding_dim,
                    module.padding_idx,
                    spec["bits"],
                    spec["group_size"],
                )
            elif isinstance(module, nn.Linear):
                layer = Int8Linear(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    spec["activations"],
                    spec["bits"],
                    spec["group_size"],
                )
            else:
                raise _damaged(
                    path, f"layer {name!r} ({type(module).__name__}) cannot hold config group {group_name!r}"
                )
            _decode(path, name, layer, spec, tensors)
            _set_submodule(model, name, layer)
        if not any(n in done for n in modules if any(p.fullmatch(n) for p in patterns)):
            raise _damaged(path, f"config group {group_name!r} matches no layer of {type(model).__name__}")


def _decode(
    path: Path, name: str, layer: nn.Module, spec: Mapping[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Turn the layer's compressed-tensors tensors in ``tensors`` into its int8 state."""
    try:
        if spec["packed"]:
            shape = tensors.pop(f"{name}.weight_shape").tolist()
            tensors[f"{name}.weight"] = _unpack_int4(tensors.pop(f"{name}.weight_packed"), shape)
        scale = tensors[f"{name}.weight_scale"]
        tensors[f"{name}.weight_scale"] = scale.reshape(layer.weight_scale.shape).float()
        if spec["activations"] == "static":
            tensors[f"{name}.input_scale"] = tensors[f"{name}.input_scale"].reshape(()).float()
            zero_point = tensors[f"{name}.input_zero_point"].reshape(()).to(torch.int32) + _ZP_SHIFT
            tensors[f"{name}.input_zero_point"] = zero_point
    except (KeyError, RuntimeError, ValueError) as exc:
        raise _damaged(
            path, f"the tensors of quantized layer {name!r} are missing or malformed ({exc})"
        ) from exc
    if tensors.get(f"{name}.weight", torch.empty(0)).dtype != torch.int8:
        raise _damaged(path, f"quantized layer {name!r} needs an int8 weight")


def load_hf(
    path: Path, metadata: Mapping[str, Any], model: nn.Module | None, trust_remote_code: bool
) -> nn.Module:
    """The model of a Hugging Face-native export, with int8 layers where it is quantized (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if metadata.get("format_version") != HF_FORMAT_VERSION:
        raise _damaged(path, f"format version {metadata.get('format_version')!r} is not supported")
    config_path = path / TRANSFORMERS_CONFIG_NAME
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"{TRANSFORMERS_CONFIG_NAME} is missing or not valid JSON: {exc}") from exc
    quantization = raw.get("quantization_config") if isinstance(raw, dict) else None
    if quantization is not None and (
        not isinstance(quantization, Mapping) or quantization.get("quant_method") != "compressed-tensors"
    ):
        raise _damaged(path, "`quantization_config` is not a compressed-tensors configuration")
    if model is None:
        arch = metadata.get("architecture")
        if not isinstance(arch, Mapping):
            raise _damaged(path, "shrink_config.json has no `architecture` object")
        model = _transformers_builder(path, arch, trust_remote_code, drop=("quantization_config",))()
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, f"{WEIGHTS_NAME} is missing or not a readable safetensors file: {exc}") from exc
    if quantization is not None:
        _build_layers(path, model, quantization, tensors)
    # Tied float weights are written once: fill the other names from the tensor they share.
    expected = model.state_dict(keep_vars=True)
    by_tensor: dict[int, str] = {}
    for key, value in expected.items():
        if key in tensors:
            by_tensor.setdefault(id(value), key)
    for key, value in expected.items():
        if key not in tensors and id(value) in by_tensor:
            tensors[key] = tensors[by_tensor[id(value)]]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"load: the export in {str(path)!r} does not fit {type(model).__name__}: {exc}"
        ) from exc
    return model.eval()
