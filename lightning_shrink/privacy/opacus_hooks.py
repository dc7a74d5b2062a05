"""The ``"hooks"`` engine: Opacus' per-sample gradient hooks, which materialize ``p.grad_sample``.

Two changes to Opacus' ``GradSampleHooks``, both through methods it provides for overriding:

* each layer's batch dimension is taken from its input by
  :func:`lightning_shrink.privacy.layers.batch_dim` (Opacus uses one dimension for every layer, so a
  time-major encoder followed by a classifier head on ``(B, D)`` could not be clipped);
* a layer fake-quantized by quantization-aware training is computed with the rule of its float
  layer (``nn.Linear``, ``nn.Embedding``, convolutions) on the input its weight multiplies
  (:func:`lightning_shrink.privacy.layers.weight_input`), so functorch never runs the layer with
  a stale copy of its quantization settings.

Every step, every parameter must have exactly as many per-sample gradients as the batch has
examples, else the step is refused naming the layer.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.functorch import prepare_layer
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

from lightning_shrink.privacy.errors import PrivacyError, batch_mismatch_message, no_backward_message
from lightning_shrink.privacy.layers import batch_dim, is_fake_quantized, weight_input

__all__ = ["FLOAT_RULES", "HooksEngine"]

#: The float layer whose Opacus rule computes a fake-quantized layer's per-sample gradients.
FLOAT_RULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# The owner shown for a parameter no hooked layer holds (Opacus then computes no per-sample gradient).
_UNHOOKED = ("<not in a hooked layer>", nn.Identity())


class _LayoutAwareHooks(GradSampleHooks):
    """Opacus' ``GradSampleHooks`` with a batch dimension per layer and float rules for QAT layers."""

    def __init__(self, module: nn.Module, *, batch_first: bool, loss_reduction: str) -> None:
        self.layout_batch_first = batch_first
        #: Per hooked layer, the shape of its last input and the batch dimension used for it.
        self.inputs: dict[nn.Module, tuple[tuple[int, ...], int]] = {}
        super().__init__(module, batch_first=batch_first, loss_reduction=loss_reduction, strict=True)

    def _get_module_type(self, module: nn.Module) -> Any:
        if is_fake_quantized(module):
            for float_type in FLOAT_RULES:
                if isinstance(module, float_type):
                    return float_type
        return type(module)

    def add_hooks(
        self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False
    ) -> None:
        super().add_hooks(
            loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch
        )
        if batch_first:
            return
        # Layers computed by functorch re-insert the batch dimension of the per-example call where
        # the layer had it: prepare both variants and pick one per call (rearrange_grad_samples).
        for module in self.iterate_submodules(self._module):
            own = getattr(module, "ft_compute_sample_grad", None)
            if own is not None:
                prepare_layer(module, batch_first=True)
                module._shrink_ft_variants = {False: own, True: module.ft_compute_sample_grad}

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for module in self._module.modules():
            if "_shrink_ft_variants" in module.__dict__:
                del module.__dict__["_shrink_ft_variants"]

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, _forward_output: Any) -> None:
        before = len(getattr(module, "activations", ()))
        super().capture_activations_hook(module, forward_input, _forward_output)
        activations = getattr(module, "activations", [])
        if len(activations) > before and is_fake_quantized(module):
            first, *rest = activations[-1]
            activations[-1] = [weight_input(module, first), *rest]

    def rearrange_grad_samples(
        self, *, module: nn.Module, backprops: torch.Tensor, loss_reduction: str, batch_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        activations = getattr(module, "activations", None)
        if activations:
            x = activations[-1][0]
            dim = batch_dim(module, x, self.layout_batch_first)
            self.inputs[module] = (tuple(x.shape), dim)
            batch_first = dim == 0
            variants = module.__dict__.get("_shrink_ft_variants")
            if variants is not None:
                module.ft_compute_sample_grad = variants[batch_first]
        return super().rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction=loss_reduction, batch_first=batch_first
        )


class HooksEngine:
    """Opacus' per-sample gradient hooks on ``model``'s trainable layers.

    Args:
        model: The model (the LightningModule).
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the batch's examples.
        batch_first: Whether layer inputs have their examples first (see
            :func:`lightning_shrink.privacy.layers.batch_dim`).
    """

    name = "hooks"

    def __init__(self, model: nn.Module, loss_reduction: str, batch_first: bool = True) -> None:
        try:
            self.hooks = _LayoutAwareHooks(model, batch_first=batch_first, loss_reduction=loss_reduction)
        except NotImplementedError as exc:
            raise PrivacyError(
                f"DifferentialPrivacy: Opacus cannot compute per-sample gradients: {exc}"
            ) from exc
        self.batch_first = batch_first
        names = {m: n for n, m in model.named_modules()}
        #: Parameter id -> (name, layer) of the hooked layer that computes its per-sample gradient.
        self.owners: dict[int, tuple[str, nn.Module]] = {}
        for module in self.hooks.iterate_submodules(model):
            for p in module.parameters():
                self.owners.setdefault(id(p), (names.get(module, "<root>") or "<root>", module))

    def _owner(self, p: torch.Tensor) -> tuple[str, nn.Module]:
        return self.owners.get(id(p), _UNHOOKED)

    def clip_and_accumulate(
        self, optimizer: DPOptimizer, examples: int, discard: bool = False
    ) -> torch.Tensor:
        """Check every per-sample gradient against the batch's ``examples``, then clip and sum them
        into ``p.summed_grad`` (Opacus' ``clip_and_accumulate``); returns the per-example norms.

        An empty batch, or with ``discard`` the stand-in for one, gives zero sums (the step is noise
        only) and no norms.
        """
        params = list(optimizer.params)
        samples = {id(p): getattr(p, "grad_sample", None) for p in params}
        if all(g is None for g in samples.values()):
            if examples and not discard:
                raise PrivacyError(no_backward_message(examples))
        else:
            missing = sorted({self._owner(p)[0] for p in params if samples[id(p)] is None})
            if missing:
                raise PrivacyError(
                    f"DifferentialPrivacy(grad_sample_mode='hooks'): parameters of {missing} got no "
                    "per-sample gradient in this step (used outside the layer Opacus hooks, e.g. through a "
                    "functional call on `.weight`, or not used at all): their gradient cannot be clipped, "
                    "the step is refused"
                )
            for p in params:
                name, module = self._owner(p)
                g = samples[id(p)]
                if isinstance(g, list):
                    raise PrivacyError(
                        f"DifferentialPrivacy(grad_sample_mode='hooks'): layer {name!r} accumulated {len(g)} "
                        "backward passes in one step; one Poisson batch is one backward pass"
                    )
                if len(g) != examples:
                    shape, dim = self.hooks.inputs.get(module, ((len(g),), 0))
                    raise PrivacyError(
                        batch_mismatch_message("hooks", name, module, shape, dim, examples, self.batch_first)
                    )
        if examples == 0 or discard:
            for p in params:
                p.summed_grad = torch.zeros_like(p)
            return torch.zeros(0)
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], 1)
        optimizer.clip_and_accumulate()
        return norms.norm(2, dim=1)

    def reset(self) -> None:
        """Nothing to forget: Opacus' optimizer clears ``grad_sample`` in ``zero_grad``."""

    def close(self) -> None:
        """Remove Opacus' hooks; the model is as before."""
        self.hooks.cleanup()
