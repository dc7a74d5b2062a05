"""Mask computation: the units each pattern prunes, ranked by their weights' scores (magnitudes by
default), and exact thresholds, also over sharded (FSDP2 / DTensor) parameters.

Every selection here is *exact*: a group whose scheduled sparsity is ``s`` over ``total`` weights
prunes exactly ``round(s * total)`` of them (whole rows for ``"rows"``: the largest number of
lowest-scoring rows whose size does not exceed that count). Ties at the threshold are broken by
position (parameter order, then rank, then flat index), so the result is the same on one process, on
replicated DDP ranks and over FSDP2 shards.

Scores are non-negative float32 importances (``|w|`` unless :func:`compute_masks` is given others);
``-1`` marks weights that are already pruned (they are pruned first: masks never grow back while
sparsity rises) and ``+inf`` weights that a pattern forbids to prune. The threshold is found by a radix
selection over the IEEE-754 bit patterns of the keys, mapped to integers that order like the floats:
two passes of a 65,536-bin histogram (the high, then the low 16 bits), each summed over the shards by
one fixed-size all-reduce. Keys are computed a chunk at a time, again at every pass, so the memory a
selection needs beyond the new boolean masks is a few chunks and the histograms, whatever the model's
size; nothing is concatenated and nothing is sorted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lightning_shrink.pruning.distributed import Comm

__all__ = ["Pattern", "check_divides", "compute_masks", "magnitude", "parse_pattern"]

PRUNED = -1.0
FORBIDDEN = float("inf")

#: Elements of one chunk of keys (the transient memory of a selection is a few such chunks).
CHUNK = 1 << 20
_BINS = 1 << 16

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


def _matrix(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``(out, in)`` view: rows are output units, the input dimension is last."""
    if transposed:
        return t.t()
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


class _Keys:
    """The keys of one (local) parameter's prunable units of weight 1 (``"unstructured"``: every
    weight, in flat storage order; ``"nm"``: every weight of the ``(out, in)`` view, row-major, with
    the ones that are not among the ``M - N`` lowest of their group forbidden), computed on demand a
    chunk at a time and never kept."""

    def __init__(
        self, source: torch.Tensor, keep: torch.Tensor, transposed: bool, pattern: Pattern, is_score: bool
    ):
        self.source, self.keep, self.transposed, self.pattern, self.is_score = (
            source,
            keep,
            transposed,
            pattern,
            is_score,
        )
        self.numel = source.numel()

    def _score(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32, copy=True) if self.is_score else magnitude(t)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, keys)`` of consecutive chunks, in unit order."""
        if self.pattern.kind == "unstructured":
            flat, kflat = self.source.reshape(-1), self.keep.reshape(-1)
            for a in range(0, self.numel, CHUNK):
                b = min(a + CHUNK, self.numel)
                yield a, self._score(flat[a:b]).masked_fill_(~kflat[a:b], PRUNED)
            return
        mat, kmat = _matrix(self.source, self.transposed), _matrix(self.keep, self.transposed)
        m, drop = self.pattern.m, self.pattern.m - self.pattern.n
        rows = max(1, CHUNK // max(1, mat.shape[1]))
        for a in range(0, mat.shape[0], rows):
            b = min(a + rows, mat.shape[0])
            keys = self._score(mat[a:b]).masked_fill_(~kmat[a:b], PRUNED).reshape(b - a, -1, m)
            order = torch.argsort(keys, dim=-1, stable=True)
            candidate = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, order[..., :drop], True)
            yield a * mat.shape[1], keys.masked_fill_(~candidate, FORBIDDEN).reshape(-1)


def _row_keys(score: torch.Tensor, keep: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, int]:
    """The keys of the rows of one (local) parameter (the root-mean-square of their scores, ``-1`` for
    pruned rows) and the size of a row."""
    mat, kmat = _matrix(score, transposed), _matrix(keep, transposed)
    rms = mat.float().pow(2).mean(dim=1).sqrt()
    return rms.masked_fill_(~kmat.any(dim=1), PRUNED), mat.shape[1]


def _ordered(keys: torch.Tensor) -> torch.Tensor:
    """int32 codes of float32 keys that order like the keys' values (``-0.0`` as ``+0.0``). The map is
    its own inverse."""
    bits = (keys + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _from_ordered(code: int) -> float:
    bits = torch.tensor([code], dtype=torch.int32)
    return float((bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32))


def _histogram(keys: Sequence[_Keys], prefix: int | None, device: torch.device) -> torch.Tensor:
    """Counts of the high 16 bits of the keys' codes (``prefix=None``), or of the low 16 bits of the
    codes whose high 16 bits are ``prefix``."""
    counts = torch.zeros(_BINS + 1, dtype=torch.int64, device=device)
    for unit in keys:
        for _, chunk in unit.chunks():
            code = _ordered(chunk)
            high = (code >> 16) + (_BINS // 2)
            digit = high if prefix is None else torch.where(high == prefix, code & 0xFFFF, _BINS)
            counts += torch.bincount(digit.reshape(-1), minlength=_BINS + 1)
    return counts[:_BINS]


def _bin_of(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th smallest (1-based) element, and the count before that bin."""
    cum = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)))
    return b, int(cum[b - 1]) if b else 0


def _select_equal(keys: Sequence[_Keys], k: int, comm: Comm, device: torch.device) -> list[torch.Tensor]:
    """Keep-masks of units of weight 1 (flat, in unit order) that prune exactly ``k`` of them: the
    smallest keys, ties by (parameter, rank, position)."""
    if k <= 0:
        return [torch.ones(x.numel, dtype=torch.bool, device=x.keep.device) for x in keys]
    high, before = _bin_of(comm.all_reduce(_histogram(keys, None, device)), k)
    low_counts = comm.all_reduce(_histogram(keys, high, device))
    low, below = _bin_of(low_counts, k - before)
    v = _from_ordered(((high - _BINS // 2) << 16) | low)
    # Every unit of key < v is pruned, and the first ``k - smaller`` of those equal to v.
    ties_to_prune = k - before - below
    keeps, ties = [], []
    for unit in keys:
        keep = torch.empty(unit.numel, dtype=torch.bool, device=unit.keep.device)
        tied = 0
        for a, chunk in unit.chunks():
            torch.gt(chunk, v, out=keep[a : a + chunk.numel()])
            tied += int(torch.count_nonzero(chunk == v))
        keeps.append(keep)
        ties.append(tied)
    if ties_to_prune == int(low_counts[low]):
        return keeps
    tie_counts = comm.all_gather(torch.tensor(ties, dtype=torch.int64, device=device)).cpu()  # (world, T)
    to_prune = ties_to_prune
    for i, unit in enumerate(keys):
        for r in range(comm.world):
            take = min(int(tie_counts[r, i]), to_prune)
            if r == comm.rank and take < int(tie_counts[r, i]):
                _keep_ties_after(unit, keeps[i], v, take)
            to_prune -= take
    return keeps


def _keep_ties_after(unit: _Keys, keep: torch.Tensor, v: float, take: int) -> None:
    """Keep the units of ``unit`` whose key is ``v``, but for the first ``take`` of them."""
    seen = 0
    for a, chunk in unit.chunks():
        idx = (chunk == v).nonzero().squeeze(1)
        n = idx.numel()
        if seen + n > take:
            keep[a + idx[max(0, take - seen) :]] = True
        seen += n


def _to_mask(kept_units: torch.Tensor, w: torch.Tensor, transposed: bool, pattern: Pattern) -> torch.Tensor:
    """The keep-mask shaped like ``w`` from the keep-mask of its units."""
    if pattern.kind == "unstructured":
        return kept_units.reshape(w.shape)
    rows, cols = _matrix(w, transposed).shape
    if pattern.kind == "rows":
        keep = kept_units.unsqueeze(1).expand(rows, cols)
    else:
        keep = kept_units.reshape(rows, cols)
    return keep.t().contiguous() if transposed else keep.reshape(w.shape).contiguous()


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
    sources = weights if scores is None else scores
    if pattern.kind == "rows":
        rows = [
            _row_keys(magnitude(x) if scores is None else x, keep, t)
            for x, keep, t in zip(sources, keeps, transposed, strict=True)
        ]
        pruned = _select_weighted([u for u, _ in rows], [size for _, size in rows], k, comm)
        return [_to_mask(~p, w, t, pattern) for p, w, t in zip(pruned, weights, transposed, strict=True)]
    device = weights[0].device if weights else torch.device("cpu")
    units = [
        _Keys(x, keep, t, pattern, scores is not None)
        for x, keep, t in zip(sources, keeps, transposed, strict=True)
    ]
    new = _select_equal(units, k, comm, device)
    return [_to_mask(m, w, t, pattern) for m, w, t in zip(new, weights, transposed, strict=True)]


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
