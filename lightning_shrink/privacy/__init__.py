"""Differentially private fine-tuning (DP-SGD on Opacus), in the ``privacy`` extra.

Importing this package does not import Opacus: :class:`DifferentialPrivacy` imports it when it
is constructed, and raises an :class:`ImportError` naming ``pip install "lightning-shrink[privacy]"``
when it is missing.

Modules: ``config`` (the validated configuration), ``callback`` (the callback), ``plugin`` (the
hooks), ``checks`` (refusals at fit start), ``data`` (Poisson sampling, empty batches, batch sizes),
``layers`` (batch dimensions, fake-quantized inputs), ``ghost`` and ``opacus_hooks`` (the two
per-sample engines), ``optimizer`` (the DP optimizer), ``accounting`` (epsilon and the budget),
``errors``.
"""

from lightning_shrink.privacy.callback import DifferentialPrivacy
from lightning_shrink.privacy.config import ACCOUNTANTS, GRAD_SAMPLE_MODES, LOSS_REDUCTIONS, PrivacyConfig
from lightning_shrink.privacy.errors import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "LOSS_REDUCTIONS",
    "DifferentialPrivacy",
    "PrivacyConfig",
    "PrivacyError",
]
