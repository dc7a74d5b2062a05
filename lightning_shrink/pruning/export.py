"""Built-in plugin ``"pruning"``: a compact encoding of sparse tensors for export.

:func:`lightning_shrink.export` calls :func:`shrink_export` with the model's tensors. Every tensor
that is at least half zeros is replaced, when that is smaller, by two tensors::

    <name>.__pruning_bitmask__   uint8, one bit per element (1 = non-zero), most significant bit first
    <name>.__pruning_values__    the non-zero values in row-major order, in the tensor's own dtype

and ``metadata["pruning"]`` records each encoded tensor's shape and dtype. The hook runs last
(``trylast``), after quantization has turned weights into int8 values (whose zeros stay zeros), so
a pruned and quantized weight is stored as a bitmask plus its int8 non-zeros. :func:`shrink_load`
runs first (``tryfirst``) and restores the exact tensor before other plugins decode.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_shrink.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MASK_SUFFIX", "METADATA_KEY", "VALUES_SUFFIX", "decode", "encode", "shrink_export", "shrink_load"]

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
    numel = 1
    for size in shape:
        numel *= size
    bits = (bitmask.unsqueeze(1) & _BITS.to(bitmask.device)).ne(0).reshape(-1)[:numel]
    out = torch.zeros(numel, dtype=dtype, device=values.device)
    out[bits] = values.to(dtype)
    return out.reshape(shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@hookimpl(trylast=True)
def shrink_export(
    model: nn.Module, tensors: MutableMapping[str, torch.Tensor], metadata: MutableMapping[str, Any]
) -> None:
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


@hookimpl(tryfirst=True)
def shrink_load(tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    info = metadata.get(METADATA_KEY)
    if not info:
        return
    if info.get("format") != FORMAT:
        raise ValueError(f"unknown sparse encoding {info.get('format')!r} in metadata[{METADATA_KEY!r}]")
    for name, spec in info["tensors"].items():
        try:
            bitmask = tensors.pop(name + MASK_SUFFIX)
            values = tensors.pop(name + VALUES_SUFFIX)
        except KeyError as exc:
            raise ValueError(f"sparse tensor {name!r} is listed in metadata but its data is missing") from exc
        tensors[name] = decode(bitmask, values, spec["shape"], getattr(torch, spec["dtype"]))
