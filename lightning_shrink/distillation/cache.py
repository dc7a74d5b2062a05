"""The teacher-logit cache: reuse the teacher's logits for examples already seen.

Entries are keyed per example by a field of the batch (``cache_key="idx"``) or by a function of
the batch, never by the batch's position in the epoch, so a shuffled loader cannot be handed
another example's logits. Each entry also keeps a fingerprint of the example's inputs; an entry
whose key comes back with different inputs (non-unique keys, random augmentation) raises instead
of returning logits that belong to something else.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["TeacherLogitCache", "input_fingerprints"]

CacheKey = str | Callable[[Any], Any]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def input_fingerprints(args: Sequence[Any], kwargs: Mapping[str, Any], batch_size: int) -> torch.Tensor:
    """One float64 number per example summarizing every input tensor with ``batch_size`` rows.

    A position-weighted sum (so permuted tokens differ); the weights repeat every 97 positions and
    zeros contribute nothing, so zero-padding to a different length leaves it unchanged.
    """
    total = torch.zeros(batch_size, dtype=torch.float64)
    for t in _tensors(list(args)) + _tensors(dict(kwargs)):
        if t.dim() == 0 or t.shape[0] != batch_size or t.is_complex():
            continue
        flat = t.detach().reshape(batch_size, -1).to(torch.float64)
        weights = 1.0 + (torch.arange(flat.shape[1], device=flat.device) % 97).to(torch.float64) / 97.0
        total += (flat * weights).sum(1).cpu() + flat.sum(1).cpu() * 1e-3
    return total


class TeacherLogitCache:
    """Per-example teacher logits, kept on the CPU.

    Args:
        key: Name of a batch field holding one hashable key per example (a 1-D tensor or a list),
            or a function ``batch -> keys``.
    """

    def __init__(self, key: CacheKey) -> None:
        self.key = key
        self._entries: dict[Hashable, tuple[torch.Tensor, float]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        """The fraction of lookups (one per batch) that found every example cached."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def keys_for(self, batch: Any, batch_size: int) -> list[Hashable]:
        """The batch's per-example keys; raises if they cannot be read unambiguously."""
        if callable(self.key):
            keys = self.key(batch)
            where = "the `cache_key` function"
        else:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"KnowledgeDistillation: `cache_key={self.key!r}` names a batch field, but the batch is "
                    f"a {type(batch).__name__}, not a mapping; give a function batch -> keys instead"
                )
            if self.key not in batch:
                raise KeyError(
                    f"KnowledgeDistillation: `cache_key={self.key!r}` but the batch has no such field "
                    f"(fields: {sorted(map(str, batch))}); add a per-example key (e.g. the dataset index) to "
                    "every batch; the cache does not guess keys from batch positions"
                )
            keys = batch[self.key]
            where = f"batch[{self.key!r}]"
        if isinstance(keys, torch.Tensor):
            if keys.dim() != 1:
                raise ValueError(f"KnowledgeDistillation: {where} must be 1-D, got shape {tuple(keys.shape)}")
            keys = keys.tolist()
        keys = list(keys)
        if len(keys) != batch_size:
            raise ValueError(
                f"KnowledgeDistillation: {where} has {len(keys)} keys but the student's logits have "
                f"{batch_size} examples"
            )
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"KnowledgeDistillation: {where} repeats a key within one batch; keys must be unique"
            )
        return keys

    def lookup(self, keys: Sequence[Hashable], fingerprints: torch.Tensor) -> torch.Tensor | None:
        """The stacked logits if every key is cached, else ``None``. Raises when a cached key comes
        back with different inputs."""
        found = []
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._check(key, entry[1], float(fingerprints[i]))
            found.append(entry[0])
        self.hits += 1
        shapes = {tuple(t.shape) for t in found}
        if len(shapes) != 1:
            return None
        return torch.stack(found)

    def store(self, keys: Sequence[Hashable], logits: torch.Tensor, fingerprints: torch.Tensor) -> None:
        """Cache ``logits[i]`` under ``keys[i]``."""
        cpu = logits.detach().to("cpu", copy=True)
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                self._check(key, entry[1], float(fingerprints[i]))
            self._entries[key] = (cpu[i], float(fingerprints[i]))

    @staticmethod
    def _check(key: Hashable, cached: float, now: float) -> None:
        if abs(cached - now) > 1e-9 * max(1.0, abs(cached), abs(now)):
            raise ValueError(
                f"KnowledgeDistillation: cache key {key!r} was cached for different inputs than the example "
                "that now carries it (keys must identify examples uniquely, and inputs must not change "
                "between epochs, e.g. by random augmentation); the cache refuses to guess"
            )
