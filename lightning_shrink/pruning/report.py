"""What a pruning plugin reports: whether each threshold group reached its target, the fit-end
warning when one did not, and the rows of the compression report (measured from the weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_shrink.pruning.config import OWNER, PruningConfig
from lightning_shrink.pruning.distributed import local_tensor
from lightning_shrink.pruning.schedule import PruningSchedule
from lightning_shrink.pruning.selection import PruneTarget, group_indices
from lightning_shrink.types import ReportRow

__all__ = ["report_rows", "shortfall", "shortfall_warning"]


def shortfall(
    targets: Sequence[PruneTarget],
    params: Sequence[torch.Tensor],
    pruned: Sequence[int],
    config: PruningConfig,
) -> list[str]:
    """The threshold groups whose masks fall short of their final sparsity, described; empty when every
    group reached it as exactly as its pattern allows (whole rows: at most one row short of the count).

    Args:
        targets: The pruned parameters' targets.
        params: The parameters (global sizes).
        pruned: Per parameter, its number of pruned weights (over all shards).
        config: The configuration (its ``pattern``).
    """
    short = []
    for group, indices in group_indices(targets).items():
        final = targets[indices[0]].final_sparsity
        total = sum(params[i].numel() for i in indices)
        unit = 1
        if config.pattern.kind == "rows":
            unit = max(
                params[i].numel() // params[i].shape[1 if targets[i].transposed else 0] for i in indices
            )
        count = sum(pruned[i] for i in indices)
        if count <= round(final * total) - unit:
            what = f"{len(indices)} layers under the global threshold" if group == "__global__" else group
            short.append(f"{what} at {count / total:.4f} (target {final:g})")
    return short


def shortfall_warning(
    name: str, step: int, short: Sequence[str], schedule: PruningSchedule, last_update_step: int | None
) -> str:
    """The fit-end message of a plugin whose groups in ``short`` (:func:`shortfall`) fell short."""
    final = schedule.final_step
    if last_update_step is None or last_update_step < final:
        why = (
            f"the schedule's last mask update is at step {final}, after the run's end: end pruning earlier "
            "(`end_step`) or train longer"
        )
    else:
        why = f"the `schedule` callable's value at step {final} is below the target"
    more = " ..." if len(short) > 3 else ""
    return (
        f"{OWNER} ({name!r}): the run ended at optimizer step {step} short of its target sparsity: "
        f"{'; '.join(short[:3])}{more} ({why})"
    )


def report_rows(
    name: str,
    config: PruningConfig,
    targets: Sequence[PruneTarget],
    params: Sequence[torch.Tensor],
    model: nn.Module,
    reached: bool | None,
) -> list[ReportRow] | None:
    """Rows of plugin ``name`` for the compression report: the sparsity measured from ``model``'s weights
    (each tensor once, so tied weights are not counted twice), overall and per pruned layer; the target,
    the pattern, the number of pruned layers and (when known) whether the target was ``reached``."""
    by_id = {id(p): t for t, p in zip(targets, params, strict=True)}
    rows: list[ReportRow] = []
    zeros = total = 0
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if id(p) not in by_id:
                continue
            w = local_tensor(p)
            z = w.numel() - int(torch.count_nonzero(w))
            zeros += z
            total += w.numel()
            rows.append(ReportRow(name, "sparsity", z / w.numel() if w.numel() else 0.0, param_name))
    if not rows:
        return None
    head = [
        ReportRow(name, "sparsity", zeros / total, "pruned layers"),
        ReportRow(name, "target sparsity", config.target_sparsity, "pruned layers"),
        ReportRow(name, "pattern", str(config.pattern), "pruned layers"),
        ReportRow(name, "pruned layers", len(rows), ""),
    ]
    if reached is not None:
        head.append(ReportRow(name, "target reached", reached, "pruned layers"))
    return head + rows
