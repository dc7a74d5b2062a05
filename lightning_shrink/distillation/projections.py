"""The learned projections from a student layer's width to the teacher's: plugin-owned tensors.

They are not submodules of the LightningModule: the plugin returns them from
``shrink_optimizer_param_groups`` (the bridge adds them to the first optimizer, extends its
learning-rate schedulers and averages their gradients across DDP ranks), saves them in its
checkpoint state and copies restored values into them in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from lightning_shrink.distillation.config import OWNER, LayerKey
from lightning_shrink.types import ParamGroup

__all__ = ["Projection", "Projections", "projection_key"]


def projection_key(student_layer: LayerKey) -> str:
    """The projection's name for a student layer: ``"layer_2"``, ``"layer_net__2"`` for ``"net.2"``."""
    return "layer_" + str(student_layer).replace(".", "__")


class Projection(nn.Module):
    """The learned linear map from a student layer's width to the teacher's (``y = x W^T + b``).

    A training aid that exists only for distillation, initialized like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Projections(nn.ModuleDict):
    """The projections of one distillation plugin, by :func:`projection_key`.

    Args:
        widths: ``{key: (student width, teacher width)}``, one entry per student layer whose width
            differs from the teacher layer it is compared with.
    """

    def __init__(self, widths: Mapping[str, tuple[int, int]]) -> None:
        super().__init__({key: Projection(s, t) for key, (s, t) in widths.items()})

    @property
    def widths(self) -> dict[str, tuple[int, int]]:
        """``{key: (in_features, out_features)}``."""
        return {key: (p.in_features, p.out_features) for key, p in self.items()}

    def param_groups(self, lr: float | None, weight_decay: float | None) -> list[ParamGroup]:
        """One optimizer parameter group with every projection tensor; ``lr`` and ``weight_decay``
        when given, else the optimizer's defaults."""
        group: ParamGroup = {"params": list(self.parameters())}
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        return [group]

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of every tensor on the CPU, by ``"<key>.weight"`` / ``"<key>.bias"``."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.named_parameters()}

    def load(self, saved: Mapping[str, torch.Tensor], where: str) -> None:
        """Copy ``saved`` (as written by :meth:`state`) into the tensors, in place (the optimizer
        keeps optimizing the same tensors).

        Raises:
            ValueError: the saved tensors are not those of these projections (other layers or widths).
        """
        current = dict(self.named_parameters())
        if set(saved) != set(current) or any(tuple(saved[k].shape) != tuple(current[k].shape) for k in saved):
            raise ValueError(
                f"{OWNER} ({where}): the checkpoint's learned projections "
                f"{ {k: tuple(v.shape) for k, v in saved.items()} } do not match this run's "
                f"{ {k: tuple(v.shape) for k, v in current.items()} }; use the same `layer_map` and models"
            )
        with torch.no_grad():
            for name, p in current.items():
                p.copy_(saved[name].to(p.device, p.dtype))

    def broadcast_from_rank_zero(self) -> None:
        """Give every data-parallel rank rank 0's values (ranks may have initialized them differently)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        backend = dist.get_backend()
        with torch.no_grad():
            for p in self.parameters():
                buffer = p.detach() if backend != "gloo" else p.detach().cpu()
                dist.broadcast(buffer, src=0)
                if buffer.data_ptr() != p.data_ptr():
                    p.copy_(buffer)

    def parameter_count(self) -> int:
        """The number of learned values."""
        return sum(p.numel() for p in self.parameters())
