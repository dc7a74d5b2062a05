"""The configuration of :class:`~lightning_shrink.DifferentialPrivacy`: one validated, frozen object.

Nothing here imports Opacus, so a configuration can be built, compared and printed without the
``privacy`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_shrink.config import Step, check_bool, check_choice, check_number, check_step

__all__ = ["ACCOUNTANTS", "GRAD_SAMPLE_MODES", "LOSS_REDUCTIONS", "PrivacyConfig"]

#: Privacy accountants (Opacus names): privacy loss random variables, Rényi DP, Gaussian DP.
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "gdp")

#: How per-sample gradients are clipped. ``"hooks"``: Opacus' per-sample gradient hooks
#: (materializes every example's gradient). ``"ghost"``: ghost norms plus book-keeping in
#: one backward pass (:mod:`lightning_shrink.privacy.ghost`), never materializing per-sample
#: gradients of linear and embedding layers. ``"auto"`` picks ``"ghost"`` when every trainable
#: layer is supported by it and ``"hooks"`` otherwise.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "ghost", "hooks")

#: How the module's training loss reduces over the examples of a batch.
LOSS_REDUCTIONS: tuple[str, ...] = ("mean", "sum")

_OWNER = "DifferentialPrivacy"


@dataclass(frozen=True)
class PrivacyConfig:
    """What :class:`~lightning_shrink.DifferentialPrivacy` does, validated when it is created.

    Give either ``noise_multiplier``, or ``target_epsilon`` with the planned ``epochs`` or
    ``steps``. Every field is described on :class:`~lightning_shrink.DifferentialPrivacy`, which
    builds this object from its arguments and exposes it as ``callback.config``.

    Raises:
        TypeError: a field has the wrong type (``noise_multiplier="1"``, ``batch_first=1``).
        ValueError: a value is out of range, or the budget is specified inconsistently (both or
            neither of ``noise_multiplier`` and ``target_epsilon``; ``target_epsilon`` without
            exactly one of ``epochs`` and ``steps``; ``epochs`` or ``steps`` with
            ``noise_multiplier``).

    Example::

        config = PrivacyConfig(target_epsilon=8.0, epochs=3)
        config.accountant  # 'prv'
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    epochs: int | None = None
    steps: Step | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    poisson_sampling: bool = True
    loss_reduction: str = "mean"
    batch_first: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put(
            "noise_multiplier",
            check_number(_OWNER, "noise_multiplier", self.noise_multiplier, low=0.0, allow_none=True),
        )
        put(
            "target_epsilon",
            check_number(
                _OWNER, "target_epsilon", self.target_epsilon, low=0.0, low_inclusive=False, allow_none=True
            ),
        )
        put("epochs", check_number(_OWNER, "epochs", self.epochs, low=1, integer=True, allow_none=True))
        put("steps", check_step(_OWNER, "steps", self.steps, allow_zero=False, allow_none=True))
        put(
            "delta",
            check_number(
                _OWNER,
                "delta",
                self.delta,
                low=0.0,
                high=1.0,
                low_inclusive=False,
                high_inclusive=False,
                allow_none=True,
            ),
        )
        put(
            "max_grad_norm",
            check_number(_OWNER, "max_grad_norm", self.max_grad_norm, low=0.0, low_inclusive=False),
        )
        check_choice(_OWNER, "accountant", self.accountant, ACCOUNTANTS)
        check_choice(_OWNER, "grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        check_choice(_OWNER, "loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_bool(_OWNER, "poisson_sampling", self.poisson_sampling)
        check_bool(_OWNER, "batch_first", self.batch_first)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            which = "both were given" if self.noise_multiplier is not None else "neither was given"
            raise ValueError(
                f"{_OWNER}: give exactly one of `noise_multiplier` and `target_epsilon` ({which})"
            )
        if self.noise_multiplier is not None:
            if self.epochs is not None or self.steps is not None:
                raise ValueError(
                    f"{_OWNER}: `epochs` and `steps` plan the budget of a `target_epsilon`; they cannot be "
                    "combined with `noise_multiplier`"
                )
        elif (self.epochs is None) == (self.steps is None):
            raise ValueError(
                f"{_OWNER}: with `target_epsilon`, give exactly one of `epochs` and `steps` (the plan the "
                "noise is calibrated for)"
            )

    def describe(self) -> str:
        """The configuration as keyword arguments, for messages and ``repr``."""
        if self.noise_multiplier is not None:
            budget = f"noise_multiplier={self.noise_multiplier}"
        else:
            plan = f"epochs={self.epochs}" if self.epochs is not None else f"steps={self.steps}"
            budget = f"target_epsilon={self.target_epsilon}, {plan}"
        return (
            f"{budget}, delta={self.delta}, max_grad_norm={self.max_grad_norm}, "
            f"accountant={self.accountant!r}, grad_sample_mode={self.grad_sample_mode!r}, "
            f"batch_first={self.batch_first}"
        )
