"""Value types of the hook system: what hooks return and receive, beneath the hook specifications.

Nothing here imports Lightning, matplotlib or a technique, so that :mod:`lightning_shrink.hookspecs`,
every technique and third-party plugins can import these types without pulling in the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CommHook", "History", "ParamGroup", "ReportRow"]

#: A metric's values over training: ``name -> [(step, value), ...]`` in step order.
History = dict[str, list[tuple[int, float]]]

#: An optimizer parameter group, as ``torch.optim.Optimizer.add_param_group`` takes it: a dict with
#: ``"params"`` (a list of tensors) and optional hyperparameters (``"lr"``, ``"weight_decay"``...).
ParamGroup = dict[str, Any]

#: A DDP communication hook with its state, as ``DistributedDataParallel.register_comm_hook(state,
#: hook)`` takes them.
CommHook = tuple[Any, Callable[..., Any]]


@dataclass(frozen=True)
class ReportRow:
    """One line of the compression report.

    Args:
        technique: The registered name of the plugin that reports it, e.g. ``"pruning"`` or
            ``"pruning-2"`` for a second pruning callback in the same Trainer.
        metric: What is measured, e.g. ``"sparsity"`` or ``"epsilon"``.
        value: The measured value.
        target: What it is measured on (a layer's name), or ``""`` for the whole model.
    """

    technique: str
    metric: str
    value: Any
    target: str = ""
