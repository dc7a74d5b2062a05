"""Mask computation: the units each pattern prunes, ranked by their weights' scores (magnitudes by
default), and exact thresholds, also over sharded (FSDP2 / DTensor) parameters.

Every selection here is *exact*: a group whose scheduled sparsity is ``s`` over ``total`` weights
prunes exactly ``round(s * total)`` of them (whole rows for ``"rows"``: the largest number of
lowest-scoring rows whose size does not exceed that count). Ties at the threshold are broken by
position (parameter order, then rank, then flat index), so the result is the same on one process, on
replicated DDP ranks and over FSDP2 shards.

Scores are non-negative float32 importances (``|w|`` unless :func:`compute_masks` is given others);
weights that are already pruned are pruned first (masks never grow back while sparsity rises) and,
for N:M, weights that the pattern forbids to prune rank last. The threshold is found by a radix
selection over int32 codes that order like the scores: for unstructured masks the float32 bits of a
score without its sign bit (a non-negative float's bits order like its value), for N:M the IEEE-754
bit patterns of keys that may be ``-1`` (pruned) or ``+inf`` (forbidden), mapped to integers. Two
passes over the weights, each summed over the shards by one fixed-size all-reduce of a 65,536-bin
histogram: the first counts the codes' high 16 bits; the second writes every mask whose high bits
are above (kept) or below (pruned) the threshold's, and gathers the few *candidates* that share
them, whose low 16 bits give the exact threshold and the ties without reading the weights again
(when more than :data:`CANDIDATES` share them, a third pass finds them again). Codes are computed a
batch of about :data:`CHUNK` at a time (small parameters share a batch), so the memory a selection
needs beyond the new boolean masks is a few chunks and the histograms, whatever the model's size;
nothing is concatenated and nothing is sorted.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lightning_shrink.pruning.distributed import Comm

__all__ = ["Pattern", "check_divides", "compute_masks", "magnitude", "parse_pattern"]

PRUNED = -1.0
FORBIDDEN = float("inf")

#: Elements of one chunk of keys (the transient memory of a selection is a few such chunks).
CHUNK = 1 << 20
#: Most candidates (units whose code shares the threshold's high 16 bits) a selection keeps, 12 bytes
#: each, between its second pass and the threshold; with more, a third pass finds them again.
CANDIDATES = 1 << 20
_BINS = 1 << 16
_HIGH = 1 if sys.byteorder == "little" else 0  # the int16 half of a float32 holding its sign and exponent

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


class _Scratch:
    """Reusable buffers of one selection (a few chunks), grown on demand."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(max(n, CHUNK), dtype=dtype, device=self.device)
        return buf[:n]


class _Keys:
    """The keys of one (local) parameter's prunable units of weight 1 (``"unstructured"``: every
    weight, in flat storage order; ``"nm"``: every weight of the ``(out, in)`` view, row-major, with
    the ones that are not among the ``M - N`` lowest of their group forbidden), computed on demand a
    piece at a time as int32 codes that order like the keys (equal keys, equal codes).

    Unstructured codes are the float32 bits of the scores (``|w|``), which order like their values as
    they are non-negative; the pruned weights are told apart by :attr:`keep` (:attr:`masked`). N:M
    codes map the keys of any sign (pruned ``-1``, forbidden ``+inf``) with :func:`_ordered`."""

    def __init__(
        self,
        source: torch.Tensor,
        keep: torch.Tensor,
        transposed: bool,
        pattern: Pattern,
        is_score: bool,
        has_pruned: bool,
    ):
        self.source, self.transposed, self.pattern, self.is_score = source, transposed, pattern, is_score
        self.numel, self.device = source.numel(), keep.device
        self.unstructured = pattern.kind == "unstructured"
        #: Whether the codes of pruned units must be masked out with :attr:`keep` (flat).
        self.masked = self.unstructured and has_pruned
        if self.unstructured:
            self._flat, self.keep = source.reshape(-1), keep.reshape(-1)
            self.piece = CHUNK
        else:
            self._mat, self._kmat = _matrix(source, transposed), _matrix(keep, transposed)
            self.piece = max(1, CHUNK // max(1, self._mat.shape[1])) * self._mat.shape[1]

    def current(self) -> torch.Tensor:
        """The current keep-mask, flat in unit order (a copy)."""
        return self.keep.clone() if self.unstructured else self._kmat.reshape(-1).clone()

    def pieces(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of consecutive pieces of at most :attr:`piece` units (whole rows for
        N:M)."""
        for a in range(0, self.numel, self.piece):
            yield a, min(self.piece, self.numel - a)

    def _high_halves(self, a: int, n: int, scratch: _Scratch) -> torch.Tensor:
        """The high 16 bits of the float32 scores of units ``a:a + n`` (unstructured only)."""
        x = self._flat[a : a + n]
        if x.dtype == torch.bfloat16:  # bfloat16 is the high half of float32
            return x.view(torch.int16)
        if x.dtype != torch.float32:
            x = scratch.get("float", n, torch.float32).copy_(x)
        return x.view(torch.int16)[_HIGH::2]

    def digits(self, a: int, out: torch.Tensor, scratch: _Scratch) -> None:
        """Write the high 16 bits of the codes of units ``a:`` into the int16 ``out`` (unstructured
        only; pruned units get ``0``: the caller moves them to a bin of their own)."""
        torch.bitwise_and(self._high_halves(a, out.numel(), scratch), 0x7FFF, out=out)
        if self.masked:
            out.mul_(self.keep[a : a + out.numel()])

    def codes(self, a: int, out: torch.Tensor, scratch: _Scratch) -> None:
        """Write the codes of units ``a:`` into the int32 ``out`` (one piece or less)."""
        n = out.numel()
        if self.unstructured:
            x = self._flat[a : a + n]
            if x.dtype != torch.float32:
                x = out.view(torch.float32).copy_(x)
            torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=out)
            return
        cols, m, drop = self._mat.shape[1], self.pattern.m, self.pattern.m - self.pattern.n
        rows = slice(a // cols, (a + n) // cols)
        x = self._mat[rows]
        score = x.to(torch.float32, copy=True) if self.is_score else magnitude(x)
        keys = score.masked_fill_(~self._kmat[rows], PRUNED).reshape(x.shape[0], -1, m)
        order = torch.argsort(keys, dim=-1, stable=True)
        candidate = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, order[..., :drop], True)
        out.copy_(_ordered(keys.masked_fill_(~candidate, FORBIDDEN).reshape(-1)))


_Piece = tuple[int, int, int, int]  # (unit, offset in the unit, offset in the batch, length)


def _batches(
    units: Sequence[_Keys], scratch: _Scratch, digits: bool = False
) -> Iterator[tuple[torch.Tensor, list[_Piece]]]:
    """The codes (or with ``digits``, :meth:`_Keys.digits`) of all units, in order, packed into
    batches of about :data:`CHUNK` (small parameters share a batch): ``(values, pieces)``; a batch is
    only valid until the next one is asked for."""
    size = max([CHUNK, *(u.piece for u in units)])
    buf = scratch.get("digits", size, torch.int16) if digits else scratch.get("codes", size, torch.int32)
    pieces: list[_Piece] = []
    used = 0
    for i, unit in enumerate(units):
        for a, n in unit.pieces():
            if used + n > size:
                yield buf[:used], pieces
                pieces, used = [], 0
            (unit.digits if digits else unit.codes)(a, buf[used : used + n], scratch)
            pieces.append((i, a, used, n))
            used += n
    if pieces:
        yield buf[:used], pieces


def _row_keys(score: torch.Tensor, keep: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, int]:
    """The keys of the rows of one (local) parameter (the root-mean-square of their scores, ``-1`` for
    pruned rows) and the size of a row."""
    mat, kmat = _matrix(score, transposed), _matrix(keep, transposed)
    rms = mat.float().pow(2).mean(dim=1).sqrt()
    return rms.masked_fill_(~kmat.any(dim=1), PRUNED), mat.shape[1]


def _ordered(keys: torch.Tensor) -> torch.Tensor:
    """int32 codes of float32 keys of any sign that order like the keys' values (``-0.0`` as
    ``+0.0``): the bits of non-negative keys, the negated bits without the sign of negative ones."""
    bits = keys.view(torch.int32)
    sign = bits >> 31  # -1 for negative keys, else 0
    return (bits & 0x7FFFFFFF).bitwise_xor_(sign).sub_(sign)


def _bin_of(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th smallest (1-based) element, and the count before that bin."""
    cum = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device)))
    return b, int(cum[b - 1]) if b else 0


def _high_histogram(units: Sequence[_Keys], pruned: int, scratch: _Scratch) -> tuple[torch.Tensor, int]:
    """Counts of the high 16 bits of the units' codes, and the offset of code ``high`` bits' bin
    (``high + offset``). Unstructured: bin 0 holds the ``pruned`` units, bin ``1 + h`` the others
    whose high bits are ``h``."""
    counts = torch.zeros(_BINS, dtype=torch.int64, device=scratch.device)
    if units[0].unstructured:
        for digits, _ in _batches(units, scratch, digits=True):
            counts[1 : 1 + _BINS // 2] += torch.bincount(digits, minlength=_BINS // 2)
        counts[1] -= pruned  # their digits were 0
        counts[0] = pruned
        return counts, 1
    for codes, _ in _batches(units, scratch):
        digit = torch.bitwise_right_shift(codes, 16, out=scratch.get("digit", codes.numel(), torch.int32))
        counts += torch.bincount(digit.add_(_BINS // 2), minlength=_BINS)
    return counts, _BINS // 2


def _select_equal(
    units: Sequence[_Keys], k: int, pruned: int, already: int, comm: Comm, device: torch.device
) -> list[torch.Tensor]:
    """Keep-masks of units of weight 1 (flat, in unit order) that prune exactly ``k`` of them: the
    smallest keys, ties by (parameter, rank, position). ``pruned`` units are pruned now on this
    process, ``already`` on all."""
    if k == already:  # the pruned units are the ``k`` smallest: nothing changes
        return [unit.current() for unit in units]
    scratch = _Scratch(device)
    # Pass 1: a histogram of the codes' high 16 bits, summed over the shards.
    counts, offset = _high_histogram(units, pruned, scratch)
    high, before = _bin_of(comm.all_reduce(counts), k)
    high -= offset
    lo, hi = high << 16, (high << 16) | 0xFFFF
    # Pass 2: the units above the high bits' range are kept, those below it pruned; those in it
    # (the candidates) are counted by their low 16 bits and gathered, up to CANDIDATES of them.
    keeps = [torch.empty(u.numel, dtype=torch.bool, device=u.device) for u in units]
    low_counts = torch.zeros(_BINS, dtype=torch.int64, device=device)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = []
    stored = 0
    for codes, pieces in _batches(units, scratch):
        flag = torch.ge(codes, lo, out=scratch.get("flag", codes.numel(), torch.bool))
        for i, a, at, n in pieces:
            keep, candidate = keeps[i][a : a + n], flag[at : at + n]
            torch.gt(codes[at : at + n], hi, out=keep)
            candidate ^= keep
            if units[i].masked:
                keep &= units[i].keep[a : a + n]
                candidate &= units[i].keep[a : a + n]
        idx = flag.nonzero().squeeze(1)
        if not idx.numel():
            continue
        low = codes.index_select(0, idx).bitwise_and_(0xFFFF)
        low_counts += torch.bincount(low, minlength=_BINS)
        stored += idx.numel()
        if found is not None and stored <= CANDIDATES:
            # The unit of each candidate and its position there, from the batch's pieces.
            starts = torch.tensor([at for _, _, at, _ in pieces], device=idx.device)
            which = torch.searchsorted(starts, idx, right=True) - 1
            unit = torch.tensor([i for i, _, _, _ in pieces], device=idx.device)[which]
            shift = torch.tensor([a - at for _, a, at, _ in pieces], device=idx.device)[which]
            found.append((unit, idx + shift, low))
        else:
            found = None
    low_counts = comm.all_reduce(low_counts)
    low, below = _bin_of(low_counts, k - before)
    v = lo | low
    # Every unit of code < v is pruned, and the first ``k - before - below`` of those equal to v.
    ties_to_prune = k - before - below
    if found is not None:  # the candidates above v are kept; the ties in order, by unit
        none = torch.empty(0, dtype=torch.int64, device=device)
        unit, pos, lows = (torch.cat(t) for t in zip(*found, strict=True)) if found else (none, none, none)
        above, equal = lows > low, lows == low
        for i, keep in enumerate(keeps):
            keep[pos[above & (unit == i)]] = True
        tied = [pos[equal & (unit == i)] for i in range(len(units))]
        ties = [t.numel() for t in tied]
    else:  # too many candidates to keep: a third pass finds them again
        tied, ties = None, [0] * len(units)
        for codes, pieces in _batches(units, scratch):
            for i, a, at, n in pieces:
                keep, equal = keeps[i][a : a + n], codes[at : at + n] == v
                torch.gt(codes[at : at + n], v, out=keep)
                if units[i].masked:
                    keep &= units[i].keep[a : a + n]
                    equal &= units[i].keep[a : a + n]
                ties[i] += int(torch.count_nonzero(equal))
    if ties_to_prune == int(low_counts[low]):
        return keeps
    tie_counts = comm.all_gather(torch.tensor(ties, dtype=torch.int64, device=device)).cpu()  # (world, T)
    to_prune = ties_to_prune
    for i, unit in enumerate(units):
        for r in range(comm.world):
            take = min(int(tie_counts[r, i]), to_prune)
            if r == comm.rank and take < int(tie_counts[r, i]):
                if tied is not None:
                    keeps[i][tied[i][take:]] = True
                else:
                    _keep_ties_after(unit, keeps[i], v, take, scratch)
            to_prune -= take
    return keeps


def _keep_ties_after(unit: _Keys, keep: torch.Tensor, v: int, take: int, scratch: _Scratch) -> None:
    """Keep the units of ``unit`` whose code is ``v``, but for the first ``take`` of them."""
    seen = 0
    for a, n in unit.pieces():
        codes = scratch.get("codes", n, torch.int32)
        unit.codes(a, codes, scratch)
        equal = codes == v
        if unit.masked:
            equal &= unit.keep[a : a + n]
        idx = equal.nonzero().squeeze(1)
        if seen + idx.numel() > take:
            keep[a + idx[max(0, take - seen) :]] = True
        seen += idx.numel()


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
    kept = [int(torch.count_nonzero(k)) for k in keeps]
    local = sum(k.numel() for k in keeps) - sum(kept)
    already = int(comm.all_reduce(torch.tensor([local], dtype=torch.int64)))
    k = max(round(sparsity * total), already)
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
        _Keys(x, keep, t, pattern, scores is not None, n < keep.numel())
        for x, keep, t, n in zip(sources, keeps, transposed, kept, strict=True)
    ]
    new = _select_equal(units, k, local, already, comm, device)
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
