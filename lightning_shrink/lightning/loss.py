"""How the plugins' loss terms reach the loss: the bridge's one seam, or the module's own call.

Lightning 2.6 gives callbacks no way to change the loss (the result of ``on_before_backward`` is
ignored), and the terms must be added inside ``training_step`` so that under DDP and FSDP their
gradients are synchronized with the task loss. Two ways, one result:

* **the seam** (default): while a fit runs, the bridge shadows the LightningModule's
  ``training_step`` with a wrapper held in the instance's ``__dict__`` (the class is untouched) that
  calls the original and adds the terms. It is the only attribute lightning-shrink ever writes into a
  user's object, and it is removed at teardown and on exceptions, leaving the module as it was.
* **no patching**: a module that inherits :class:`ShrinkLossMixin` is never patched; its
  ``training_step`` returns ``self.shrink_loss(loss, batch, batch_idx)``. Forgetting the call is an
  error at the first batch, never a run without distillation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_shrink.lightning.bridge import ShrinkCallback

__all__ = ["ShrinkLossMixin"]


class ShrinkLossMixin:
    """Mix into a LightningModule to add the plugins' loss terms yourself instead of letting the
    bridge wrap ``training_step``.

    Example::

        class Student(ShrinkLossMixin, pl.LightningModule):
            def training_step(self, batch, batch_idx):
                loss = self.model(**batch).loss
                return self.shrink_loss(loss, batch, batch_idx)

    Outside a Trainer with lightning-shrink callbacks ``shrink_loss`` returns ``loss`` unchanged.
    """

    def shrink_loss(self, loss: torch.Tensor, batch: Any, batch_idx: int) -> torch.Tensor:
        """``loss`` weighted and with every plugin's extra terms added (``shrink_loss_weight``,
        ``shrink_training_loss``)."""
        from lightning_shrink.lightning.bridge import ShrinkCallback

        try:
            trainer = self.trainer  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        bridge: ShrinkCallback | None = ShrinkCallback.find(trainer) if trainer is not None else None
        if bridge is None or not bridge.is_fitting:
            return loss
        return bridge.add_loss_terms(loss, batch, batch_idx, from_mixin=True)
