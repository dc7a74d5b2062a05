"""The :class:`DifferentialPrivacy` technique callback: a validated DP-SGD configuration."""

from __future__ import annotations

import warnings
from typing import Any

from lightning_shrink.config import Step
from lightning_shrink.lightning.technique import TechniqueCallback
from lightning_shrink.privacy.config import PrivacyConfig

__all__ = ["DifferentialPrivacy"]

_INSTALL_HINT = 'pip install "lightning-shrink[privacy]"'


def _require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"DifferentialPrivacy needs Opacus, which is not installed: {_INSTALL_HINT}"
        ) from exc


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

    Anything that would make the guarantee false fails before the first update, with the reason:
    manual optimization, an optimizer that cannot be wrapped, layers whose per-sample gradients
    cannot be computed or that mix examples (batch norm, static or per-tensor fake quantization), a
    training dataloader that cannot be Poisson-sampled, gradient accumulation, AMP with a gradient
    scaler, strategies other than single-device and DDP, a resumed checkpoint whose steps are not
    all in the account or that was trained with another privacy configuration, and, at every step,
    a layer whose batch dimension does not hold exactly the batch's examples.

    Args:
        noise_multiplier: Noise standard deviation relative to ``max_grad_norm``. Exclusive with
            ``target_epsilon``. ``0`` is allowed (for checks) and spends an infinite epsilon.
        target_epsilon: Privacy budget to spend over the planned ``epochs`` or ``steps``.
        epochs: Planned number of epochs (with ``target_epsilon``); one epoch is
            ``1 / q`` Poisson-sampled steps.
        steps: Planned number of optimizer steps (with ``target_epsilon``): an ``int``, or a
            ``float`` fraction of the run's optimizer steps (``1.0``: the whole run, as
            ``trainer.estimated_stepping_batches`` counts it).
        delta: The ``delta`` of ``(epsilon, delta)``-DP; must be below ``1 / N`` (``N`` training
            examples, checked at fit start). ``None`` uses ``1 / (10 N)``.
        max_grad_norm: Per-sample gradient clipping norm (> 0).
        accountant: ``"prv"`` (default; Opacus' privacy-loss-random-variable accountant,
            tightest), ``"rdp"`` (Rényi DP) or ``"gdp"`` (Gaussian DP, asymptotic, can
            underestimate epsilon).
        grad_sample_mode: ``"auto"``, ``"ghost"`` or ``"hooks"``
            (:data:`~lightning_shrink.privacy.GRAD_SAMPLE_MODES`).
        poisson_sampling: Replace the training dataloader's sampling by Poisson sampling (what the
            accountants assume). With ``False`` the dataloader's sampling is kept and the reported
            epsilon is not a formal guarantee (a warning and a report row say so).
        loss_reduction: How the module's loss reduces over the batch, ``"mean"`` (default) or
            ``"sum"``; scales per-sample gradients before clipping and the noisy sum after.
        batch_first: ``True`` when the layers see the examples in the first dimension of their
            inputs (``(B, T, D)``), ``False`` for time-major models (``(T, B, D)``, the default of
            ``nn.RNN`` and ``nn.Transformer``): an input with two or more leading dimensions then
            has its examples in the second, one with a single leading dimension (a classifier head on
            ``(B, D)``) in the first. Either way every layer is checked against the batch's number of
            examples at every step.
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
        steps: Step | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        accountant: str = "prv",
        grad_sample_mode: str = "auto",
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        _require_opacus()
        #: The validated configuration.
        self.config = PrivacyConfig(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            epochs=epochs,
            steps=steps,
            delta=delta,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            grad_sample_mode=grad_sample_mode,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            batch_first=batch_first,
        )
        if accountant == "gdp":
            warnings.warn(
                "DifferentialPrivacy: the 'gdp' accountant is asymptotic and can underestimate epsilon; "
                "prefer 'prv' or 'rdp' for a reported guarantee",
                UserWarning,
                stacklevel=2,
            )

    def make_plugin(self) -> Any:
        """The DP-SGD plugin (imports Opacus)."""
        from lightning_shrink.privacy.plugin import PrivacyPlugin

        return PrivacyPlugin(self.config)

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far (0 before the first step)."""
        return self.plugin.epsilon

    def __repr__(self) -> str:
        return f"DifferentialPrivacy({self.config.describe()})"
