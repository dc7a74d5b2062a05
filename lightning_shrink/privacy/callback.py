"""The :class:`DifferentialPrivacy` technique callback: a validated DP-SGD configuration."""

from __future__ import annotations

import math
from typing import Any

from lightning_shrink.lightning.technique import TechniqueCallback

__all__ = ["ACCOUNTANTS", "GRAD_SAMPLE_MODES", "DifferentialPrivacy"]

#: Privacy accountants (Opacus names): privacy loss random variables, Rényi DP, Gaussian DP.
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "gdp")

#: How per-sample gradients are clipped. ``"hooks"``: Opacus' per-sample gradient hooks
#: (materializes every example's gradient). ``"ghost"``: ghost norms plus book-keeping in
#: one backward pass (:mod:`lightning_shrink.privacy.ghost`), never materializing per-sample
#: gradients of linear and embedding layers. ``"auto"`` picks ``"ghost"`` when every trainable
#: layer is supported by it and ``"hooks"`` otherwise.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "ghost", "hooks")

_INSTALL_HINT = 'pip install "lightning-shrink[privacy]"'


def _require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"DifferentialPrivacy needs Opacus, which is not installed: {_INSTALL_HINT}"
        ) from exc


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"DifferentialPrivacy: `{name}` must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"DifferentialPrivacy: `{name}` must be {bound}, got {value!r}")
    return float(value)


class DifferentialPrivacy(TechniqueCallback):
    """Differentially private training (DP-SGD) of the LightningModule, built on Opacus.

    Takes over what DP-SGD needs without changes to the LightningModule: per-sample gradient
    clipping to ``max_grad_norm``, Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` added once per optimizer step, and Poisson sampling of the
    training data (each example joins each batch independently with probability ``q``, the expected
    batch size being the dataloader's batch size). A privacy accountant turns
    ``(noise_multiplier, q, steps)`` into the ``(epsilon, delta)`` spent, which is logged every step
    as ``privacy/epsilon`` and shown in the progress bar.

    Give either ``noise_multiplier``, or ``target_epsilon`` with the planned ``epochs`` or
    ``steps`` (the noise is then calibrated at fit start so that the plan spends exactly the
    target). With a ``target_epsilon`` the run stops, with a message, before a step would exceed it.

    Anything that would make the guarantee false fails before the first step, with the reason:
    manual optimization, an optimizer that cannot be wrapped, layers whose per-sample gradients
    cannot be computed or that mix examples (batch norm), a training dataloader that cannot be
    Poisson-sampled, gradient accumulation, AMP with a gradient scaler, strategies other than
    single-device and DDP.

    Args:
        noise_multiplier: Noise standard deviation relative to ``max_grad_norm``. Exclusive with
            ``target_epsilon``. ``0`` is allowed (for checks) and spends an infinite epsilon.
        target_epsilon: Privacy budget to spend over the planned ``epochs`` or ``steps``.
        epochs: Planned number of epochs (with ``target_epsilon``); one epoch is
            ``1 / q`` Poisson-sampled steps.
        steps: Planned number of optimizer steps (with ``target_epsilon``).
        delta: The ``delta`` of ``(epsilon, delta)``-DP; must be below ``1 / N`` (``N`` training
            examples, checked at fit start). ``None`` uses ``1 / (10 N)``.
        max_grad_norm: Per-sample gradient clipping norm (> 0).
        accountant: ``"prv"`` (default; Opacus' privacy-loss-random-variable accountant,
            tightest), ``"rdp"`` (Rényi DP) or ``"gdp"`` (Gaussian DP, asymptotic, can
            underestimate epsilon).
        grad_sample_mode: One of :data:`GRAD_SAMPLE_MODES`.
        poisson_sampling: Replace the training dataloader's sampling by Poisson sampling (what the
            accountants assume). With ``False`` the dataloader is left alone and the reported
            epsilon is not a formal guarantee (a warning says so).
        loss_reduction: How the module's loss reduces over the batch, ``"mean"`` (default) or
            ``"sum"``; scales per-sample gradients before clipping and the noisy sum after.
        name: The plugin's registered name, the namespace of its metrics, checkpoint state and report
            rows; ``None``: ``"privacy"``. One Trainer takes one ``DifferentialPrivacy``.

    Example::

        trainer = Trainer(callbacks=[DifferentialPrivacy(target_epsilon=8.0, epochs=3, max_grad_norm=1.0)])
    """

    plugin_name = "privacy"

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: str = "prv",
        grad_sample_mode: str = "auto",
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        _require_opacus()
        if (noise_multiplier is None) == (target_epsilon is None):
            which = "both were given" if noise_multiplier is not None else "neither was given"
            raise ValueError(
                f"DifferentialPrivacy: give exactly one of `noise_multiplier` and `target_epsilon` ({which})"
            )
        if noise_multiplier is not None:
            noise_multiplier = _positive("noise_multiplier", noise_multiplier, allow_zero=True)
            if epochs is not None or steps is not None:
                raise ValueError(
                    "DifferentialPrivacy: `epochs` and `steps` plan the budget of a `target_epsilon`; "
                    "they cannot be combined with `noise_multiplier`"
                )
        else:
            target_epsilon = _positive("target_epsilon", target_epsilon)
            if (epochs is None) == (steps is None):
                raise ValueError(
                    "DifferentialPrivacy: with `target_epsilon`, give exactly one of `epochs` and `steps` "
                    "(the plan the noise is calibrated for)"
                )
            for name, value in (("epochs", epochs), ("steps", steps)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"DifferentialPrivacy: `{name}` must be a positive int, got {value!r}")
        if delta is not None:
            delta = _positive("delta", delta)
            if delta >= 1:
                raise ValueError(f"DifferentialPrivacy: `delta` must be in (0, 1), got {delta!r}")
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"DifferentialPrivacy: `accountant` must be one of {ACCOUNTANTS}, got {accountant!r}"
            )
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"DifferentialPrivacy: `grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, "
                f"got {grad_sample_mode!r}"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"DifferentialPrivacy: `loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        if not isinstance(poisson_sampling, bool):
            raise ValueError(
                f"DifferentialPrivacy: `poisson_sampling` must be a bool, got {poisson_sampling!r}"
            )
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.epochs = epochs
        self.steps = steps
        self.delta = delta
        self.accountant = accountant
        self.grad_sample_mode = grad_sample_mode
        self.poisson_sampling = poisson_sampling
        self.loss_reduction = loss_reduction
        if accountant == "gdp":
            import warnings

            warnings.warn(
                "DifferentialPrivacy: the 'gdp' accountant is asymptotic and can underestimate epsilon; "
                "prefer 'prv' or 'rdp' for a reported guarantee",
                UserWarning,
                stacklevel=2,
            )

    def make_plugin(self) -> Any:
        from lightning_shrink.privacy.plugin import PrivacyPlugin

        return PrivacyPlugin(self)

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far (0 before the first step)."""
        return self.plugin.epsilon

    def __repr__(self) -> str:
        budget = (
            f"noise_multiplier={self.noise_multiplier}"
            if self.noise_multiplier is not None
            else f"target_epsilon={self.target_epsilon}, "
            + (f"epochs={self.epochs}" if self.epochs is not None else f"steps={self.steps}")
        )
        return (
            f"DifferentialPrivacy({budget}, delta={self.delta}, max_grad_norm={self.max_grad_norm}, "
            f"accountant={self.accountant!r}, grad_sample_mode={self.grad_sample_mode!r})"
        )
