"""Mask computation: the units each pattern prunes, ranked by their weights' scores (magnitudes by
default), and exact thresholds, also over sharded (FSDP2 / DTensor) parameters.

Every selection here is *exact*: a group whose scheduled sparsity is ``s`` over ``total`` weights
prunes exactly ``round(s * total)`` of them (whole rows for ``"rows"``: the largest number of
lowest-scoring rows whose size does not exceed that count). Ties at the threshold are broken by
position (parameter order, then flat index), so the result is the same on one process, on
replicated DDP ranks and over FSDP2 shards.

Scores are non-negative float32 importances (``|w|`` unless :func:`compute_masks` is given others);
``-1`` marks weights that are already pruned (they are pruned first: masks never grow back while
sparsity rises) and ``+inf`` weights that a pattern forbids to prune. On one process (or replicated
DDP ranks) the threshold is ``torch.kthvalue`` of the concatenated scores. On sharded parameters it is
found by bisection over the IEEE-754 bit patterns of the scores (which order non-negative floats like
their values), with an all-reduce of counts per step (at most 33 steps): exact, not sampled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_shrink.pruning.distributed import Comm

__all__ = ["Pattern", "check_divides", "compute_masks", "magnitude", "parse_pattern"]

PRUNED = -1.0
FORBIDDEN = float("inf")
_INF_BITS = 0x7F800000

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed mask pattern: ``kind`` is ``"unstructured"``, ``"nm"``, ``"rows"``, or ``"heads"`` /
    ``"neurons"`` (whole groups, see :mod:`lightning_shrink.pruning.structured`); for ``"nm"``, ``n``
    weights are kept in every group of ``m`` consecutive weights along the input dimension."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern implies (``1 - n/m`` for N:M), else ``None``."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_pattern(pattern: str, owner: str = "GradualMagnitudePruning") -> Pattern:
    """Parse ``"unstructured"``, ``"rows"``, ``"heads"``, ``"neurons"`` or ``"N:M"``.

    Raises:
        TypeError: ``pattern`` is not a string.
        ValueError: it is none of the three, or ``N:M`` does not have ``1 <= N < M``; the message starts
            with ``owner``.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{owner}: `pattern` must be a string, got {pattern!r}")
    if pattern in ("unstructured", "rows", "heads", "neurons"):
        return Pattern(pattern)
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(
            f"{owner}: `pattern` must be 'unstructured', 'rows', 'heads', 'neurons' or 'N:M' such as '2:4', "
            f"got {pattern!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"{owner}: `pattern={pattern!r}`: N:M keeps N weights in every M, so 1 <= N < M is required "
            f"(got N={n}, M={m})"
        )
    return Pattern("nm", n, m)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The importance of each weight for magnitude pruning: ``|w|`` in float32."""
    return weight.detach().abs().float()


def _bits_to_float(i: int) -> float:
    """Inverse of the ordering used by the bisection: ``-1`` is the pruned marker, lower is -inf."""
    if i < -1:
        return float("-inf")
    if i == -1:
        return PRUNED
    return float(torch.tensor([i], dtype=torch.int32).view(torch.float32))


def _matrix(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``(out, in)`` view: rows are output units, the input dimension is last."""
    if transposed:
        return t.t()
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def _units(
    score: torch.Tensor, keep: torch.Tensor, transposed: bool, pattern: Pattern, owned: bool
) -> tuple[torch.Tensor, int]:
    """Keys of the prunable units of one (local) parameter, from its weights' scores, and the size of
    a unit. ``owned``: the scores are a temporary that may be overwritten (no second copy)."""
    fill = torch.Tensor.masked_fill_ if owned else torch.Tensor.masked_fill
    if pattern.kind == "unstructured":
        return fill(score.reshape(-1), ~keep.reshape(-1), PRUNED), 1
    mat, kmat = _matrix(score, transposed), _matrix(keep, transposed)
    if pattern.kind == "rows":
        rms = mat.pow(2).mean(dim=1).sqrt()
        keys = rms.masked_fill_(~kmat.any(dim=1), PRUNED)
        return keys, mat.shape[1]
    m, drop = pattern.m, pattern.m - pattern.n
    keys = fill(mat, ~kmat, PRUNED).reshape(mat.shape[0], -1, m)
    order = torch.argsort(keys, dim=-1, stable=True)
    candidate = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, order[..., :drop], True)
    return keys.masked_fill_(~candidate, FORBIDDEN).reshape(-1), 1


def _to_mask(pruned_units: torch.Tensor, w: torch.Tensor, transposed: bool, pattern: Pattern) -> torch.Tensor:
    if pattern.kind == "unstructured":
        return (~pruned_units).reshape(w.shape)
    rows, cols = _matrix(w, transposed).shape
    if pattern.kind == "rows":
        keep = (~pruned_units).unsqueeze(1).expand(rows, cols)
    else:
        keep = (~pruned_units).reshape(rows, cols)
    return keep.t().contiguous() if transposed else keep.reshape(w.shape).contiguous()


def _select_equal(keys: Sequence[torch.Tensor], k: int, comm: Comm) -> list[torch.Tensor]:
    """Prune exactly ``k`` units of weight 1 (smallest keys; ties by position)."""
    if k <= 0:
        return [torch.zeros_like(x, dtype=torch.bool) for x in keys]
    if comm.world == 1:
        v = float(torch.kthvalue(torch.cat([x.reshape(-1) for x in keys]), k).values)
    else:
        lo, hi = -2, _INF_BITS
        while hi - lo > 1:
            mid = (lo + hi) // 2
            threshold = _bits_to_float(mid)
            count = torch.tensor([sum(int(torch.count_nonzero(x <= threshold)) for x in keys)])
            if int(comm.all_reduce(count)) >= k:
                hi = mid
            else:
                lo = mid
        v = _bits_to_float(hi)
    pruned = [x <= v for x in keys]
    counts = torch.tensor([int(torch.count_nonzero(p)) for p in pruned], dtype=torch.int64)
    excess = int(comm.all_reduce(counts.sum().reshape(1))) - k
    if excess > 0:
        # Several units score exactly ``v``: keep the last ``excess`` of them in (parameter,
        # rank, position) order, so that exactly ``k`` are pruned wherever the tensors live.
        ties = [x == v for x in keys]
        tie_counts = comm.all_gather(torch.tensor([int(torch.count_nonzero(t)) for t in ties]))  # (world, T)
        to_prune = int(tie_counts.sum()) - excess
        for i, tie in enumerate(ties):
            for r in range(comm.world):
                take = min(int(tie_counts[r, i]), to_prune)
                if r == comm.rank:
                    idx = tie.reshape(-1).nonzero().squeeze(1)[take:]
                    pruned[i].view(-1)[idx] = False
                to_prune -= take
    return pruned


def _select_weighted(
    keys: Sequence[torch.Tensor], sizes: Sequence[int], k: int, comm: Comm
) -> list[torch.Tensor]:
    """Prune the largest prefix of units (ascending key, ties by position) whose total size is at
    most ``k``."""
    gathered = comm.all_gather_object([x.tolist() for x in keys])  # [rank][target] -> keys
    flat_keys: list[float] = []
    flat_sizes: list[int] = []
    owner: list[tuple[int, int, int]] = []  # (target, rank, local index)
    for i, size in enumerate(sizes):
        for r in range(comm.world):
            for j, key in enumerate(gathered[r][i]):
                flat_keys.append(key)
                flat_sizes.append(size)
                owner.append((i, r, j))
    pruned = [torch.zeros_like(x, dtype=torch.bool) for x in keys]
    if not flat_keys or k <= 0:
        return pruned
    order = torch.argsort(torch.tensor(flat_keys, dtype=torch.float64), stable=True)
    cum = torch.cumsum(torch.tensor(flat_sizes, dtype=torch.int64)[order], 0)
    n = int((cum <= k).sum())
    for u in order[:n].tolist():
        i, r, j = owner[u]
        if r == comm.rank:
            pruned[i][j] = True
    return pruned


def compute_masks(
    weights: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    transposed: Sequence[bool],
    totals: Sequence[int],
    sparsity: float,
    pattern: Pattern,
    comm: Comm,
    scores: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """New keep-masks for one threshold group: the one place where masks are computed.

    Args:
        weights: The group's local weight tensors (shards when sharded).
        keeps: Their current keep-masks (``False`` = pruned); pruned weights stay pruned as long as
            the group's sparsity does not fall below its current sparsity.
        transposed: Per weight, whether it is stored ``(in, out)``.
        totals: Per weight, its global number of elements.
        sparsity: The group's scheduled sparsity.
        pattern: The mask pattern.
        comm: Collectives over the shards (no-op when not sharded).
        scores: The importance of each weight, non-negative float32 tensors shaped like ``weights``
            (lower is pruned first; rows are ranked by the root-mean-square of their scores). ``None``:
            :func:`magnitude`, ``|w|``.

    Returns:
        Boolean keep-masks shaped like ``weights``.
    """
    total = sum(totals)
    kept = sum(int(torch.count_nonzero(k)) for k in keeps)
    already = comm.all_reduce(torch.tensor([sum(k.numel() for k in keeps) - kept], dtype=torch.int64))
    k = max(round(sparsity * total), int(already))
    if pattern.kind == "nm":
        k = min(k, total * (pattern.m - pattern.n) // pattern.m)
    k = min(k, total)
    if scores is None:  # one magnitude tensor at a time, overwritten into its keys
        units = [
            _units(magnitude(w), k, t, pattern, True)
            for w, k, t in zip(weights, keeps, transposed, strict=True)
        ]
    else:
        units = [_units(s, k, t, pattern, False) for s, k, t in zip(scores, keeps, transposed, strict=True)]
    if pattern.kind == "rows":
        pruned = _select_weighted([u for u, _ in units], [s for _, s in units], k, comm)
    else:
        pruned = _select_equal([u for u, _ in units], k, comm)
    return [_to_mask(p, w, t, pattern) for p, w, t in zip(pruned, weights, transposed, strict=True)]


def check_divides(shape: torch.Size, transposed: bool, pattern: Pattern, name: str) -> None:
    """Raise ``ValueError`` when ``pattern`` cannot tile a weight of ``shape``."""
    if pattern.kind != "nm":
        return
    if len(shape) < 2:
        raise ValueError(
            f"GradualMagnitudePruning: `pattern='{pattern}'` needs a weight with an input dimension; "
            f"{name!r} has shape {tuple(shape)}"
        )
    width = shape[0] if transposed else math.prod(shape[1:])
    if width % pattern.m:
        raise ValueError(
            f"GradualMagnitudePruning: `pattern='{pattern}'` groups {pattern.m} consecutive weights along "
            f"the input dimension, but {name!r} (shape {tuple(shape)}) has {width} inputs, not a multiple "
            f"of {pattern.m}"
        )
