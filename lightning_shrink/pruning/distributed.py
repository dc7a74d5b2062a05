"""Pruning across processes: the collectives of a sharded (FSDP2) selection, and identical masks on
replicated (DDP) ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lightning_shrink.pruning.masks import Pattern
    from lightning_shrink.pruning.selection import PruneTarget

__all__ = ["Comm", "broadcast_masks", "is_dtensor", "local_tensor", "replicated_world_size", "sharded_comm"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and is_dtensor(t) else t


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters)."""
    return type(t).__name__ == "DTensor"


class Comm:
    """The collectives a selection needs; a no-op on one process or for replicated parameters.

    Args:
        group: The process group of the shards.
        sharded: Whether the tensors of the selection are shards of larger tensors.
    """

    def __init__(self, group: Any = None, sharded: bool = False) -> None:
        self.sharded = sharded and dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if self.sharded else 1
        self.rank = dist.get_rank(group) if self.sharded else 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the shards, in place; returns ``t``."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Stack of every rank's ``t`` (same shape on all ranks), shape ``(world, *t.shape)``."""
        if self.world == 1:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def sharded_comm(targets: Sequence[PruneTarget], params: Sequence[torch.Tensor], pattern: Pattern) -> Comm:
    """The :class:`Comm` of parameters sharded by FSDP2 (``fully_shard``: ``Shard(0)`` on a 1-D mesh).

    Raises:
        ValueError: a parameter is not sharded while others are, is sharded otherwise, or is a sharded
            transformers ``Conv1D`` under a pattern that groups along its (sharded) input dimension.
    """
    from torch.distributed.tensor import Shard

    mesh = None
    for t, p in zip(targets, params, strict=True):
        if not is_dtensor(p):
            raise ValueError(f"GradualMagnitudePruning: {t.name!r} is not sharded while others are (FSDP2)")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"GradualMagnitudePruning supports parameters sharded on dim 0 over a 1-D mesh (FSDP2 "
                f"fully_shard); {t.name!r} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
            )
        if t.transposed and pattern.kind != "unstructured":
            raise ValueError(
                f"GradualMagnitudePruning: `pattern='{pattern}'` on the sharded transformers Conv1D "
                f"{t.name!r}: its input dimension is the sharded one; use pattern='unstructured' or shard "
                "differently"
            )
        mesh = p.device_mesh if mesh is None else mesh
    assert mesh is not None
    return Comm(group=mesh.get_group(), sharded=True)


def replicated_world_size() -> int:
    """The number of processes holding replicas of the model (DDP), ``1`` without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_masks(keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's boolean masks on every rank (bitwise identical masks on replicated DDP ranks, even when
    their weights or seeds differ), broadcast in place one mask at a time (no concatenated copy)."""
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    out = []
    for k in keeps:
        buf = k.contiguous().to(device)
        dist.broadcast(buf.view(torch.uint8), src=0)
        out.append(buf.to(k.device))
    return out
