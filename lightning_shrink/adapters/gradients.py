"""Gradients of frozen LoRA base weights, for the pruning criteria that score weights from their
gradients (``movement``, ``soft_movement``, ``taylor``).

A LoRA layer computes with the effective weight ``W_eff = W + M ⊙ s·B·A`` (``M`` the pruning mask of
its base weight ``W``): that is the weight the merged model holds and the one pruning removes entries
of. Its gradient ``dL/dW_eff`` is the gradient ``W`` would get if it were trainable (the output
gradient times the layer's input, in every forward form of
:class:`~lightning_shrink.adapters.lora_layer.ShrinkLoraLinear`: the low-rank path, the masked dense
delta and the fake-quantized merged weight, whose straight-through gradient is the same).

:class:`BaseGradients` therefore lets autograd compute it: for the fit it sets ``requires_grad`` on
the pruned base weights *after* the optimizers are built and DDP wrapped the model, so the optimizers
never update them and DDP does not reduce them; autograd accumulates their gradients over
micro-batches exactly as for a trainable weight. Once per optimizer step, after the criterion read
them, the gradients are dropped (before gradient clipping and the optimizer step, which never see
them). Under DDP they are averaged over the ranks before the criterion's per-step statistics read
them, as DDP averages trainable weights' gradients. The criteria score ``W_eff`` (not ``W``) with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from lightning_shrink.adapters import effective_weight, lora_base_layers
from lightning_shrink.lightning.param_groups import average_gradients

__all__ = ["BaseGradients"]


class BaseGradients:
    """The frozen LoRA base weights among a pruning plugin's parameters, and their gradients.

    Args:
        model: The module the parameter names are relative to (the LightningModule).
        names: The pruned parameters' qualified names.
        params: The pruned parameters, in the order of ``names``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        layers = lora_base_layers(model, names)
        #: Index (into ``names``) of each LoRA base weight -> its LoRA layer's qualified name.
        self.layers: dict[int, str] = {i: layers[n] for i, n in enumerate(names) if n in layers}
        self._model = model
        self._params = list(params)
        self._enabled: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.layers)

    def first_layer(self) -> str:
        """The qualified name of the first LoRA layer (for messages)."""
        return next(iter(self.layers.values()))

    def effective(self) -> list[Callable[[], torch.Tensor] | None]:
        """Per parameter: a function returning the effective weight ``W + M ⊙ s·B·A`` of a LoRA base
        weight (no gradient), or ``None`` for a plain weight."""
        return [
            partial(effective_weight, self._model.get_submodule(self.layers[i])) if i in self.layers else None
            for i in range(len(self._params))
        ]

    def enable(self) -> None:
        """Let autograd compute the frozen base weights' gradients for this fit."""
        self._enabled = [self._params[i] for i in self.layers if not self._params[i].requires_grad]
        for p in self._enabled:
            p.requires_grad_(True)

    def average(self) -> None:
        """Average the base weights' gradients over the data-parallel ranks (a missing gradient counts
        as zero), as DDP does for trainable weights."""
        average_gradients(self._enabled)

    def release(self) -> None:
        """Drop the base weights' gradients (read by the criterion; never seen by the optimizer)."""
        for p in self._enabled:
            p.grad = None

    def restore(self) -> None:
        """Freeze the base weights again (end of the fit)."""
        for p in self._enabled:
            p.grad = None
            p.requires_grad_(False)
        self._enabled = []
