"""Differentially private fine-tuning (DP-SGD on Opacus), in the ``privacy`` extra.

Importing this package does not import Opacus: :class:`DifferentialPrivacy` imports it when it
is constructed, and raises an :class:`ImportError` naming ``pip install "lightning-shrink[privacy]"``
when it is missing.
"""

from lightning_shrink.privacy.callback import ACCOUNTANTS, GRAD_SAMPLE_MODES, DifferentialPrivacy

__all__ = ["ACCOUNTANTS", "GRAD_SAMPLE_MODES", "DifferentialPrivacy"]
