"""The reference the privacy tests compare against: per-example gradients by ``torch.func``.

``vmap`` over a batch's examples of ``grad`` of each example's own loss (the model called on that
example alone), then Opacus' clipping rule. Nothing of lightning-shrink or Opacus is involved.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


def per_example_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each example's gradient norm under cross-entropy, and the sum of the clipped gradients."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in per_example.values()], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: torch.einsum("b,b...->...", factor, g) for k, g in per_example.items()}
