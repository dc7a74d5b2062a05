"""The Hugging Face-native format: a transformers directory whose quantized layers are stored in the
compressed-tensors layout, so that ``transformers.AutoModelFor<Task>.from_pretrained`` (with
``compressed-tensors`` installed, and without lightning-shrink) loads them.

What is written (``config.json``'s ``quantization_config``, ``"quant_method": "compressed-tensors"``):

* int8 ``Linear`` weights: ``"format": "int-quantized"``, symmetric, one scale per output channel
  (``<layer>.weight`` int8, ``<layer>.weight_scale`` ``(out, 1)``);
* int4 ``Linear`` weights: ``"format": "pack-quantized"``, per channel or per group
  (``weight_packed`` int32, eight values per element, ``weight_scale``, ``weight_shape``);
* embedding tables: ``"format": "int-quantized"``, int8 with one scale per row, or int4 per row or
  per group stored one value per byte (``num_bits: 4`` in an int8 tensor). Packed int4
  (``pack-quantized``) tables do not load in transformers: compressed-tensors'
  ``compress_model`` (run by transformers' ``CompressedTensorsHfQuantizer`` before the weights
  load) replaces the table's ``weight`` by ``weight_packed``, and ``PreTrainedModel._init_weights``
  (transformers/modeling_utils.py) then initializes every ``nn.Embedding`` with
  ``init.normal_(module.weight)``, which fails (``'Embedding' object has no attribute 'weight'``;
  its ``nn.Linear`` branch checks that ``weight`` exists). An int4 table is therefore twice as
  large here as in the native format, and the default ``format=None`` keeps the native format for
  it (:func:`hf_unsupported` with ``default=True``);
* activations as quantization-aware training simulated them: affine, per tensor, **7-bit**
  (``num_bits: 7, symmetric: false, strategy: "tensor"``), dynamic, or static with the observed
  ``input_scale`` / ``input_zero_point`` (shifted to the signed range ``[-64, 63]`` that
  compressed-tensors uses). compressed-tensors' simulation of this scheme computes what
  :func:`lightning_shrink.convert`'s int8 layers compute.

Each layer is a target of its group by its exact name (``"re:^<name>$"``), so a partial selection
stays partial. Pruned weights keep their zeros (int8 zero is exact) but are stored dense:
compressed-tensors 0.20 removed its sparsity compressors (``sparsity_config`` is written empty).
A language-model head tied to a quantized embedding is written untied (``tie_word_embeddings:
false``, the int8 table twice), as compressed-tensors quantizes each module's own weight.

``shrink_config.json`` (``"format": "lightning-shrink-hf"``) marks the directory as a complete
export (written last) and records the transformers class; :func:`lightning_shrink.load` rebuilds
the int8 layers from ``quantization_config``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_shrink.export.layout import TRANSFORMERS_CONFIG_NAME, WEIGHTS_NAME

__all__ = [
    "ACTIVATION_BITS",
    "HF_FORMAT",
    "HF_FORMAT_VERSION",
    "find_transformers_model",
    "hf_unsupported",
    "write_hf",
]

HF_FORMAT = "lightning-shrink-hf"
HF_FORMAT_VERSION = 1
#: Bits of the activations in ``quantization_config`` (the 7-bit range the int8 kernels use).
ACTIVATION_BITS = 7
_ZP_SHIFT = 2 ** (ACTIVATION_BITS - 1)  # our zero points are unsigned [0, 127], compressed-tensors' signed
_GENERATION_CONFIG_NAME = "generation_config.json"


def _missing_extra(exc: ImportError) -> ImportError:
    return ImportError(
        f"the Hugging Face-native export needs compressed-tensors ({exc}): "
        'pip install "lightning-shrink[hf]"; or export(..., format="native")'
    )


def find_transformers_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, model)`` of the transformers ``PreTrainedModel`` that ``model`` is or holds
    (``prefix`` is its qualified name inside ``model``, ``""`` for ``model`` itself); ``None`` when
    there is none.

    Raises:
        ValueError: ``model`` holds several transformers models side by side.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if isinstance(model, PreTrainedModel):
        return "", model
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(f"{p}.") for p, _ in found):
            found.append((name, module))
    if len(found) > 1:
        raise ValueError(
            f"export: {type(model).__name__} holds several transformers models "
            f"({', '.join(repr(n) for n, _ in found)}); export the one to serve, "
            'export(module.<name>, directory), or write the whole module with format="native"'
        )
    return found[0] if found else None


def hf_unsupported(model: nn.Module, default: bool = False) -> str | None:
    """Why ``model`` (a transformers model) has no Hugging Face-native form, or ``None`` if it has.

    The class must be one of the installed transformers package (``from_pretrained`` resolves it by
    name); quantized layers must be ``nn.Linear`` (int8 or int4) or ``nn.Embedding`` (int8 or int4)
    in the architecture (transformers' ``Conv1D`` and convolutions have no compressed-tensors form
    that transformers loads).

    With ``default=True`` (the choice of ``export(format=None)``), an int4 embedding table is also a
    reason: the Hugging Face-native form stores it one value per byte (packed int4 tables do not
    load in transformers), twice the size of the native format's packed table.
    """
    import transformers

    from lightning_shrink.quantization.int8_layers import Int8Embedding, Int8Linear

    cls = type(model)
    if getattr(transformers, cls.__name__, None) is not cls:
        return f"{cls.__module__}.{cls.__qualname__} is not a class of the transformers package"
    layers = _int8_layers(model)
    with torch.device("meta"):
        fresh = cls(copy.deepcopy(model.config))
    shrunk = _shrunk_layer(model, fresh)
    if shrunk is not None:
        return (
            f"the layer {shrunk!r} is smaller than in a {cls.__name__} built from its config (pruned heads "
            "or neurons were removed), and config.json describes one size for every layer"
        )
    if not layers:
        return None
    for name, layer in layers.items():
        try:
            original = fresh.get_submodule(name)
        except AttributeError:
            return f"the quantized layer {name!r} is not part of a fresh {cls.__name__}"
        if isinstance(layer, Int8Linear) and type(original) is nn.Linear:
            continue
        if isinstance(layer, Int8Embedding) and type(original) is nn.Embedding:
            if layer.weight_bits == 4 and default:
                return (
                    f"the int4 embedding {name!r} would be stored one value per byte in the Hugging "
                    "Face-native format (transformers cannot load packed int4 embedding tables), twice "
                    'its size in the native format; format="hf" writes it so'
                )
            continue
        return (
            f"the quantized layer {name!r} is a {type(original).__name__} in {cls.__name__}, and "
            "compressed-tensors stores quantized nn.Linear and nn.Embedding layers only"
        )
    return None


def _shrunk_layer(model: nn.Module, fresh: nn.Module) -> str | None:
    """The first layer whose input or output size differs from the same layer of ``fresh``."""
    sizes = {
        name: (getattr(m, "in_features", None), getattr(m, "out_features", None))
        for name, m in fresh.named_modules()
        if hasattr(m, "in_features") or hasattr(m, "nf")
    }
    for name, m in model.named_modules():
        if name in sizes and hasattr(m, "in_features") and (m.in_features, m.out_features) != sizes[name]:
            return name
    fresh_shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key, value in model.state_dict().items():
        if key in fresh_shapes and key.endswith("bias") and tuple(value.shape) != fresh_shapes[key]:
            return key.rsplit(".", 1)[0]
    return None


def _target(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def _weights_args(bits: int, group_size: int | None) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "dynamic": False,
    }


def _activation_args(activations: str) -> dict[str, Any]:
    return {
        "num_bits": ACTIVATION_BITS,
        "type": "int",
        "symmetric": False,
        "strategy": "tensor",
        "dynamic": activations == "dynamic",
    }


def _int8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` in its int8 form: prepared layers converted, converted ones as they are."""
    from lightning_shrink.quantization.int8_layers import convert_modules, is_converted

    converted = convert_modules(model)
    return {
        name: converted.get(name, module)
        for name, module in model.named_modules()
        if name and (name in converted or is_converted(module))
    }


def _encode_layer(name: str, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    """Put ``layer``'s compressed-tensors tensors into ``tensors``; return its group key and scheme."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lightning_shrink.quantization.int8_layers import Int8Embedding, Int8Linear

    if isinstance(layer, Int8Embedding):
        # int8 and int4 alike as int-quantized (one value per byte): packed tables do not load in
        # transformers (see the module's docstring).
        bits = layer.weight_bits
        tensors[f"{name}.weight"] = layer.weight.clone()
        tensors[f"{name}.weight_scale"] = layer.weight_scale.reshape(layer.num_embeddings, -1).float().clone()
        scheme = {"weights": _weights_args(bits, layer.group_size), "format": "int-quantized"}
        return ("embedding", bits, layer.group_size, None), scheme
    if not isinstance(layer, Int8Linear):
        raise ValueError(
            f"export: the quantized layer {name!r} ({type(layer).__name__}) has no compressed-tensors form "
            '(it stores Linear and Embedding weights only); export(..., format="native")'
        )
    bits, group = layer.weight_bits, layer.group_size
    scale = layer.weight_scale.reshape(layer.out_features, -1).float().clone()
    if bits == 8:
        tensors[f"{name}.weight"] = layer.weight.clone()
        fmt = "int-quantized"
    else:
        tensors[f"{name}.weight_packed"] = pack_to_int32(layer.weight.contiguous(), 4)
        tensors[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        fmt = "pack-quantized"
    tensors[f"{name}.weight_scale"] = scale
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().float().clone()
    scheme: dict[str, Any] = {"weights": _weights_args(bits, group), "format": fmt}
    if layer.activations is not None:
        scheme["input_activations"] = _activation_args(layer.activations)
    if layer.activations == "static":
        tensors[f"{name}.input_scale"] = layer.input_scale.reshape(1).float().clone()
        zero_point = layer.input_zero_point.reshape(1).to(torch.int32) - _ZP_SHIFT
        tensors[f"{name}.input_zero_point"] = zero_point.to(torch.int8)
    return ("linear", bits, group, layer.activations), scheme


def _quantization_config(groups: Mapping[tuple, tuple[dict, list[str]]]) -> dict[str, Any]:
    import compressed_tensors

    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {"targets": [_target(n) for n in names], **scheme}
    formats = {g["format"] for g in config_groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "version": compressed_tensors.__version__,
    }


def hf_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, bool]:
    """The tensors of ``model`` (a transformers model) in the compressed-tensors layout, its
    ``quantization_config`` (``None`` when nothing is quantized), and whether tied weights had to
    be untied."""
    layers = _int8_layers(model)
    if layers:
        try:
            import compressed_tensors  # noqa: F401
        except ImportError as exc:
            raise _missing_extra(exc) from exc
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    owned: set[str] = set()
    for name, layer in layers.items():
        original = model.get_submodule(name)
        owned.update(f"{name}.{k}" for k in [*original._parameters, *original._buffers])
        key, scheme = _encode_layer(name, layer, tensors)
        groups.setdefault(key, (scheme, []))[1].append(name)
    # A quantized table shared by a tied head is written for both modules (untied).
    weights = [id(layer.weight) for layer in layers.values()]
    untied = len(weights) != len(set(weights))
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, value in state.items():
        if key in owned or key in tensors:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and ident in seen:
            if untied:
                tensors[key] = value.clone()
            continue  # a float tied weight: transformers reties it from config.json
        seen.add(ident)
        tensors[key] = value.contiguous().cpu()
    return tensors, (_quantization_config(groups) if groups else None), untied


def write_hf(model: nn.Module, directory: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model`` (a transformers ``PreTrainedModel``) into the empty ``directory``: weights,
    ``config.json`` with its ``quantization_config``, the generation config and ``tokenizer``'s files.

    Returns:
        The ``shrink_config.json`` content for the caller to write last.
    """
    from safetensors.torch import save_file

    tensors, quantization, untied = hf_tensors(model)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("auto_map", None)
    config["architectures"] = [type(model).__name__]
    if untied:
        config["tie_word_embeddings"] = False
    if quantization is not None:
        config["quantization_config"] = quantization
    else:
        config.pop("quantization_config", None)
    (directory / TRANSFORMERS_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {
        "format": HF_FORMAT,
        "format_version": HF_FORMAT_VERSION,
        "architecture": {"kind": "transformers", "class": type(model).__name__},
        "layout": "compressed-tensors" if quantization is not None else "dense",
    }
