"""The privacy account of a run: what the noisy steps spent, and how many more the budget allows.

The account is a history of ``(noise_multiplier, sample_rate, steps)`` entries, oldest first, the
form Opacus' accountants compose; epsilon is Opacus' accountant evaluated on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_shrink.config import resolve_step
from lightning_shrink.privacy.errors import PrivacyError

if TYPE_CHECKING:
    from lightning_shrink.privacy.config import PrivacyConfig

__all__ = ["PrivacyAccount", "calibrate_noise", "plan_budget"]

_PREFIX = "DifferentialPrivacy"


class PrivacyAccount:
    """The history of noisy steps, and epsilon for it under one accountant.

    Args:
        accountant: An Opacus accountant name (``"prv"``, ``"rdp"``, ``"gdp"``).
        history: Entries ``[noise_multiplier, sample_rate, steps]`` to start from (a checkpoint's).
    """

    def __init__(self, accountant: str, history: Sequence[Sequence[float]] = ()) -> None:
        self.accountant = accountant
        self.history: list[list[float]] = [list(e) for e in history]
        self._cache: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        """Noisy steps in the history."""
        return int(sum(entry[2] for entry in self.history))

    def epsilon(
        self, delta: float, extra_steps: int = 0, noise: float | None = None, rate: float | None = None
    ) -> float:
        """Epsilon at ``delta`` after the history plus ``extra_steps`` steps at ``noise`` and ``rate``."""
        history = [tuple(e) for e in self.history]
        if extra_steps:
            if noise is None or rate is None:
                raise ValueError(
                    "extra steps need the noise multiplier and the sample rate they are taken at"
                )
            if history and history[-1][:2] == (noise, rate):
                history[-1] = (*history[-1][:2], history[-1][2] + extra_steps)
            else:
                history.append((noise, rate, extra_steps))
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf
        key = (delta, *history)
        if key not in self._cache:
            accountant = create_accountant(self.accountant)
            accountant.history = list(history)
            self._cache[key] = float(accountant.get_epsilon(delta=delta))
        return self._cache[key]

    def record(self, noise: float, rate: float) -> None:
        """Account one noisy step."""
        if self.history and tuple(self.history[-1][:2]) == (noise, rate):
            self.history[-1][2] += 1
        else:
            self.history.append([noise, rate, 1])

    def max_extra_steps(self, target: float, delta: float, noise: float, rate: float) -> int:
        """The largest number of further steps that keeps epsilon <= ``target``."""
        if self.epsilon(delta, 1, noise, rate) > target:
            return 0
        lo, hi = 1, 2
        while self.epsilon(delta, hi, noise, rate) <= target:
            lo, hi = hi, hi * 2
            if hi > 10**9:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(delta, mid, noise, rate) <= target:
                lo = mid
            else:
                hi = mid
        return lo


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier with which ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    Raises:
        PrivacyError: Opacus finds no such noise multiplier.
    """
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise PrivacyError(
            f"{_PREFIX}: cannot calibrate noise for target_epsilon={target_epsilon} over {steps} steps: {exc}"
        ) from exc


def plan_budget(
    config: PrivacyConfig,
    account: PrivacyAccount,
    delta: float | None,
    sample_rate: float,
    dataset_size: int,
    total_steps: float,
) -> tuple[float, float | None, int | None]:
    """``(delta, noise_multiplier, max_steps)`` of a fit that starts from ``account``.

    ``delta`` defaults to ``1 / (10 N)``. With a ``target_epsilon`` the noise multiplier is
    calibrated for the planned ``epochs`` or ``steps`` (a fraction of ``total_steps``, the run's
    optimizer steps) and ``max_steps`` is the step count the budget allows; without one both are
    ``None`` (the configured noise applies, no budget stop).

    Raises:
        PrivacyError: ``delta >= 1 / N``, no noise reaches the target, or the target is already spent.
    """
    n = dataset_size
    if delta is None:
        delta = 1.0 / (10 * n)
    elif delta >= 1.0 / n:
        raise PrivacyError(
            f"{_PREFIX}: `delta`={delta} must be below 1/N = {1.0 / n:.3g} (N = {n} training examples): a "
            "larger delta allows releasing an example outright"
        )
    if config.target_epsilon is None:
        if config.noise_multiplier == 0:
            rank_zero_warn(
                f"{_PREFIX}: noise_multiplier=0 adds no noise: the run is clipped but NOT private (epsilon "
                "is infinite)"
            )
        return delta, None, None
    if config.steps is not None:
        planned = resolve_step(_PREFIX, "steps", config.steps, total_steps, minimum=1)
    else:
        assert config.epochs is not None
        planned = round(config.epochs / sample_rate)
    noise = calibrate_noise(config.target_epsilon, delta, sample_rate, planned, config.accountant)
    remaining = account.max_extra_steps(config.target_epsilon, delta, noise, sample_rate)
    if remaining == 0:
        raise PrivacyError(
            f"{_PREFIX}: target_epsilon={config.target_epsilon} is already spent (epsilon="
            f"{account.epsilon(delta):.4g} after {account.steps} step(s)); no further step is allowed"
        )
    return delta, noise, account.steps + remaining
