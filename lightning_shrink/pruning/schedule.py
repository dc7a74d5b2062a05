"""Sparsity schedules of gradual magnitude pruning, in optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SCHEDULES", "PruningSchedule"]

#: Names of the built-in schedules.
SCHEDULES: tuple[str, ...] = ("cubic", "linear", "constant")


@dataclass(frozen=True)
class PruningSchedule:
    """When the masks are updated and to which sparsity, resolved in optimizer steps.

    Masks are updated after optimizer step ``t`` (``t = 0`` is before the first step) for
    ``t = start + k * frequency`` while ``t < end``, and at ``t = end`` (the ``"constant"``
    schedule updates once, at ``start``). At an update step the sparsity of a layer group whose
    final sparsity is ``final`` is

    * ``"cubic"`` (Zhu & Gupta, 2017):
      ``s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3``
    * ``"linear"``: ``s_t = initial + (final - initial) * (t - start) / (end - start)``
    * ``"constant"``: ``s_t = final``
    * a callable: ``fn(t)``, scaled by ``final / target`` for groups with a sparsity override.

    Args:
        kind: ``"cubic"``, ``"linear"``, ``"constant"`` or a callable ``step -> sparsity``.
        initial: Sparsity at ``start``.
        target: Final sparsity of the layers without override.
        start: First update step.
        end: Last update step (the target is reached here).
        frequency: Optimizer steps between updates.
    """

    kind: str | Callable[[int], float]
    initial: float
    target: float
    start: int
    end: int
    frequency: int

    @property
    def final_step(self) -> int:
        """The step of the last mask update, at which every group reaches its final sparsity
        (``start`` for ``"constant"``, else ``end``)."""
        return self.start if self.kind == "constant" else self.end

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are updated once ``step`` optimizer steps have completed."""
        if step < self.start:
            return False
        if self.kind == "constant":
            return step == self.start
        if step > self.end:
            return False
        return step == self.end or (step - self.start) % self.frequency == 0

    def sparsity(self, step: int, final: float | None = None) -> float:
        """The scheduled sparsity after ``step`` optimizer steps, for a group whose final
        sparsity is ``final`` (default: ``target``). ``0.0`` before ``start``."""
        final = self.target if final is None else final
        if step < self.start:
            return 0.0
        if callable(self.kind):
            value = self.kind(step)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
                raise ValueError(
                    f"`schedule` callable returned {value!r} for step {step}; expected a float in [0, 1)"
                )
            if final == self.target:
                return float(value)
            return float(value) * final / self.target if self.target > 0 else 0.0
        initial = min(self.initial, final)
        if self.kind == "constant" or step >= self.end:
            return final
        progress = (step - self.start) / (self.end - self.start)
        if self.kind == "linear":
            return initial + (final - initial) * progress
        return final + (initial - final) * (1.0 - progress) ** 3
