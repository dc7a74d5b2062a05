"""Built-in plugin ``"pruning"``: a compact encoding of sparse tensors for export.

:func:`lightning_shrink.export` calls :func:`shrink_export` with the model's tensors. Every tensor
that is at least half zeros is replaced, when that is smaller, by two tensors::

    <name>.__pruning_bitmask__   uint8, one bit per element (1 = non-zero), most significant bit first
    <name>.__pruning_values__    the non-zero values in row-major order, in the tensor's own dtype

and ``metadata["pruning"]`` records each encoded tensor's shape and dtype. The hook runs last
(``trylast``), after quantization has turned weights into int8 values (whose zeros stay zeros), so
a pruned and quantized weight is stored as a bitmask plus its int8 non-zeros. :func:`shrink_load`
runs first (``tryfirst``) and restores the exact tensor before other plugins decode. A damaged encoding
(a dtype that is not a torch dtype, a shape, bitmask or number of values that do not fit together, a
piece without its metadata or metadata without its pieces) is a ``ValueError`` naming the tensor.

Structured pruning (:mod:`lightning_shrink.pruning.shrink`): :func:`shrink_convert` physically removes
heads and neurons whose weights are all zero (before quantization converts the smaller layers);
:func:`shrink_export` records each shrunk layer's number of groups and parameter shapes in
``metadata["structure"]``, and :func:`shrink_load_model` shrinks the rebuilt model to them (first,
before quantization restores its int8 layers), checking every number and shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.pruning import shrink as _shrink

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MASK_SUFFIX",
    "METADATA_KEY",
    "VALUES_SUFFIX",
    "decode",
    "encode",
    "shrink_convert",
    "shrink_export",
    "shrink_load",
    "shrink_load_model",
]

METADATA_KEY = "pruning"
MASK_SUFFIX = ".__pruning_bitmask__"
VALUES_SUFFIX = ".__pruning_values__"
FORMAT = "bitmask-v1"
#: Tensors with a smaller fraction of zeros are left as they are.
MIN_ZERO_FRACTION = 0.5

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def encode(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bitmask, values)`` of ``tensor``: the packed non-zero mask and the non-zero values."""
    flat = tensor.detach().reshape(-1)
    nonzero = flat != 0
    pad = (-flat.numel()) % 8
    bits = torch.cat([nonzero, nonzero.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    packed = (bits * _BITS.to(bits.device)).sum(dim=1, dtype=torch.uint8)
    return packed.contiguous(), flat[nonzero].contiguous()


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor that :func:`encode` encoded."""
    numel = math.prod(shape)
    bits = (bitmask.unsqueeze(1) & _BITS.to(bitmask.device)).ne(0).reshape(-1)[:numel]
    out = torch.zeros(numel, dtype=dtype, device=values.device)
    out[bits] = values.to(dtype)
    return out.reshape(shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@hookimpl(tryfirst=True)
def shrink_convert(model: nn.Module) -> None:
    """Remove heads and neurons whose weights are all zero (before quantization converts the layers)."""
    _shrink.shrink_zero_groups(model)


@hookimpl(tryfirst=True)
def shrink_load_model(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Shrink the rebuilt model to the recorded heads and neurons (before int8 layers are restored)."""
    if _shrink.METADATA_KEY in metadata:
        _shrink.apply_structure(model, metadata[_shrink.METADATA_KEY])


@hookimpl(trylast=True)
def shrink_export(
    model: nn.Module, tensors: MutableMapping[str, torch.Tensor], metadata: MutableMapping[str, Any]
) -> None:
    """Record physically shrunk layers; store tensors that are at least half zeros as a bitmask and
    their non-zeros (after quantization encoded its tensors)."""
    structure = _shrink.structure_of(model)
    if structure is not None:
        metadata[_shrink.METADATA_KEY] = structure
    encoded: dict[str, dict[str, Any]] = {}
    for name in list(tensors):
        tensor = tensors[name]
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.dtype == torch.bool
            or tensor.is_complex()
            or tensor.numel() < 16
            or name.endswith((MASK_SUFFIX, VALUES_SUFFIX))
        ):
            continue
        nnz = int(torch.count_nonzero(tensor))
        if tensor.numel() - nnz < MIN_ZERO_FRACTION * tensor.numel():
            continue
        dense_bytes = tensor.numel() * tensor.element_size()
        sparse_bytes = (tensor.numel() + 7) // 8 + nnz * tensor.element_size()
        if sparse_bytes >= dense_bytes:
            continue
        bitmask, values = encode(tensor)
        del tensors[name]
        tensors[name + MASK_SUFFIX] = bitmask
        tensors[name + VALUES_SUFFIX] = values
        encoded[name] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype), "nonzero": nnz}
    if encoded:
        metadata[METADATA_KEY] = {"format": FORMAT, "tensors": encoded}


def _damaged(name: str, problem: str) -> ValueError:
    return ValueError(f"sparse tensor {name!r} of the export: {problem} (the export is damaged)")


def _decode_checked(
    name: str, bitmask: torch.Tensor, values: torch.Tensor, spec: Mapping[str, Any]
) -> torch.Tensor:
    """:func:`decode`, after checking that the pieces and the metadata fit together."""
    shape, dtype_name = spec.get("shape"), spec.get("dtype")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _damaged(name, f"its shape {shape!r} is not a list of non-negative ints")
    # Only attributes of torch that are dtypes: the metadata is read from disk.
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise _damaged(name, f"its dtype {dtype_name!r} is not a torch dtype")
    numel = math.prod(shape)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
        raise _damaged(
            name,
            f"its bitmask is {bitmask.dtype} of shape {tuple(bitmask.shape)}, not uint8 of shape "
            f"({(numel + 7) // 8},) for shape {shape}",
        )
    bits = (bitmask.unsqueeze(1) & _BITS.to(bitmask.device)).ne(0).reshape(-1)
    if bool(bits[numel:].any()):
        raise _damaged(name, "its bitmask has bits set past the tensor's end")
    nonzero = int(bits[:numel].sum())
    if values.dtype != dtype or values.dim() != 1 or values.numel() != nonzero:
        raise _damaged(
            name,
            f"it has {values.numel()} {values.dtype} values of shape {tuple(values.shape)} for {nonzero} set "
            f"bits of a {dtype} tensor",
        )
    if spec.get("nonzero", nonzero) != nonzero:
        raise _damaged(name, f"the metadata counts {spec.get('nonzero')!r} non-zeros, its bitmask {nonzero}")
    return decode(bitmask, values, shape, dtype)


def _listed(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The encoded tensors that ``metadata`` lists, by name."""
    info = metadata.get(METADATA_KEY)
    if not info:
        return {}
    if not isinstance(info, Mapping) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, Mapping) else info
        raise ValueError(f"unknown sparse encoding {found!r} in metadata[{METADATA_KEY!r}]")
    listed = info.get("tensors")
    if not isinstance(listed, Mapping):
        raise ValueError(
            f"metadata[{METADATA_KEY!r}]['tensors'] must map tensor names to their shape and dtype, got "
            f"{type(listed).__name__} (the export is damaged)"
        )
    return listed


@hookimpl(tryfirst=True)
def shrink_load(tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Decode the bitmask-encoded tensors, checking every piece against the metadata (before other
    plugins decode)."""
    listed = _listed(metadata)
    for key in tensors:
        base = key.removesuffix(MASK_SUFFIX).removesuffix(VALUES_SUFFIX)
        if base != key and base not in listed:
            raise _damaged(
                base, f"{key!r} is part of an encoding that metadata[{METADATA_KEY!r}] does not list"
            )
    for name, spec in listed.items():
        if not isinstance(spec, Mapping):
            raise _damaged(name, f"its metadata entry is {spec!r}, not a mapping")
        if name in tensors:
            raise _damaged(name, "it is stored both dense and encoded")
        if name + MASK_SUFFIX not in tensors or name + VALUES_SUFFIX not in tensors:
            raise _damaged(name, "it is listed in the metadata but its bitmask or values are missing")
        bitmask = tensors.pop(name + MASK_SUFFIX)
        values = tensors.pop(name + VALUES_SUFFIX)
        tensors[name] = _decode_checked(name, bitmask, values, spec)
