"""The bridge into Lightning: one Callback per Trainer, the technique base classes, the loss seam and
every access to Lightning's internals (:mod:`lightning_shrink.lightning.compat`)."""

from lightning_shrink.lightning.bridge import CHECKPOINT_KEY, ShrinkCallback
from lightning_shrink.lightning.loss import ShrinkLossMixin
from lightning_shrink.lightning.technique import TechniqueCallback, TechniquePlugin

__all__ = ["CHECKPOINT_KEY", "ShrinkCallback", "ShrinkLossMixin", "TechniqueCallback", "TechniquePlugin"]
