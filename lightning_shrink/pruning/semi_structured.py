"""2:4 weights as torch's semi-structured sparse tensors on CUDA (``convert(model, semi_structured=True)``).

PyTorch's :func:`torch.sparse.to_sparse_semi_structured` stores a weight with at most 2 non-zeros in
every 4 consecutive inputs (what ``pattern="2:4"`` produces) as its non-zeros and 2-bit indices, and
``nn.Linear`` then runs on the sparse tensor cores of Ampere and later GPUs (cuSPARSELt or CUTLASS).
It is CUDA-only, needs float16, bfloat16, int8 or float32 weights whose shape is a multiple of the
kernel's tile (e.g. 32 x 64 for float16), and pays only when the matrix multiplications are large
(large batches or long sequences); at batch 1 the dense kernels are as fast or faster.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["check_semi_structured_available", "is_two_four", "to_semi_structured"]


def check_semi_structured_available() -> None:
    """Raise ``ValueError`` when no CUDA device is available (checked before anything is converted)."""
    if not torch.cuda.is_available():
        raise ValueError(
            "convert: `semi_structured=True` needs a CUDA device: torch's semi-structured sparse kernels "
            "(torch.sparse.to_sparse_semi_structured) run on NVIDIA GPUs only, and none is available here. "
            "On a CPU, convert without it (2:4 masks then only zero weights), or prune heads/neurons "
            "(pattern='heads' / 'neurons') for a speed-up on every device"
        )


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether ``weight`` ``(out, in)`` has at most 2 non-zeros in every 4 consecutive inputs."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(weight.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def _problem(weight: torch.Tensor) -> str | None:
    from torch.sparse import SparseSemiStructuredTensor

    if weight.device.type != "cuda":
        return f"it is on {weight.device}, not a CUDA device (move the model with .cuda() first)"
    constraints = SparseSemiStructuredTensor._DTYPE_SHAPE_CONSTRAINTS
    if weight.dtype not in constraints:
        return f"its dtype {weight.dtype} is not one of {sorted(str(d) for d in constraints)}"
    rows, cols = constraints[weight.dtype].sparse_min_rows, constraints[weight.dtype].sparse_min_cols
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return f"its shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols}) for {weight.dtype}"
    return None


def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace the weight of every 2:4-sparse ``nn.Linear`` of ``model`` by a semi-structured sparse
    tensor (a frozen ``Parameter``), in place; returns the converted layers' names.

    Raises:
        ValueError: no CUDA device, or no layer could be converted (the message says why for each 2:4
            layer, e.g. on the CPU, a dtype or a shape the kernels do not take, or no 2:4 layer at all).
    """
    from torch.sparse import to_sparse_semi_structured

    check_semi_structured_available()
    converted: list[str] = []
    refused: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not is_two_four(module.weight.detach()):
            continue
        problem = _problem(module.weight)
        if problem is not None:
            refused[name] = problem
            continue
        sparse = to_sparse_semi_structured(module.weight.detach())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    if not converted:
        why = "; ".join(f"{n}: {p}" for n, p in list(refused.items())[:3]) or (
            "it has no nn.Linear whose weight keeps at most 2 of every 4 inputs (train it with "
            "GradualMagnitudePruning(0.5, pattern='2:4'))"
        )
        raise ValueError(
            f"convert: `semi_structured=True` converted no layer of {type(model).__name__}: {why}"
        )
    if refused:
        warnings.warn(
            f"convert: {len(refused)} 2:4 layers stay dense: "
            + "; ".join(f"{n}: {p}" for n, p in list(refused.items())[:3]),
            stacklevel=3,
        )
    return converted
