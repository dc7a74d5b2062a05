"""The global-threshold selection as it was before the radix selection (``torch.kthvalue`` of the
concatenated keys on one process, a bisection over the keys' bit patterns with one all-reduce per step
over shards): the reference the selection tests and benchmarks/bench_memory.py compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_shrink.pruning.distributed import Comm
from lightning_shrink.pruning.masks import FORBIDDEN, PRUNED, Pattern, _matrix, _select_weighted, magnitude

__all__ = ["legacy_compute_masks"]

_INF_BITS = 0x7F800000


def _bits_to_float(i: int) -> float:
    """Inverse of the ordering used by the bisection: ``-1`` is the pruned marker, lower is -inf."""
    if i < -1:
        return float("-inf")
    if i == -1:
        return PRUNED
    return float(torch.tensor([i], dtype=torch.int32).view(torch.float32))


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


def legacy_compute_masks(
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
