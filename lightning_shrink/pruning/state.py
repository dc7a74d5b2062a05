"""What a pruning plugin writes into a checkpoint, and the check that a resumed run is the run the
checkpoint was written by.

The resume policy: a run resumed with ``ckpt_path=`` must prune what the checkpoint's run pruned, on
the same schedule. A difference in the arguments that decide the masks, in the schedule as resolved in
optimizer steps (``start_step``, ``end_step`` and ``frequency`` are compared so: ``0.5`` and ``50`` are
the same on a run of 100 steps, and a fraction of a run whose length changed is not), or in the
selected parameters is refused before the first step, naming what changed: resuming would follow a
schedule that the checkpoint's masks were not made for, and could end short of ``target_sparsity``.
``log_layer_sparsity`` and ``mask_gradients`` may change (they change what is logged and how clean the
optimizer state is kept, not what is pruned).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_shrink.pruning.config import OWNER

if TYPE_CHECKING:
    from lightning_shrink.pruning.config import PruningConfig
    from lightning_shrink.pruning.schedule import PruningSchedule
    from lightning_shrink.pruning.selection import PruneTarget

__all__ = ["STATE_VERSION", "TECHNIQUE", "check_resume", "is_pruning_state", "resume_record"]

#: Version of the checkpoint state (1: masks and schedule position only; 2: also what is compared on
#: resume).
STATE_VERSION = 2

#: The ``"technique"`` entry of the state, by which pruning states are recognised in a checkpoint.
TECHNIQUE = "GradualMagnitudePruning"

#: Arguments that may differ on resume, and the step arguments (compared as resolved in steps).
_NOT_COMPARED = ("log_layer_sparsity", "mask_gradients", "start_step", "end_step", "frequency")

_HOW_TO = (
    "Resume with the callback arguments and Trainer length of the original run; to prune further from "
    "the checkpoint's weights, load them into the model and start a new fit (their zeros are kept as the "
    "initial masks)."
)


def resume_record(
    config: PruningConfig, schedule: PruningSchedule, targets: Sequence[PruneTarget], total_steps: float
) -> dict[str, Any]:
    """The plain data a checkpoint records so that a resume can be compared with its run."""
    return {
        "technique": TECHNIQUE,
        "config": config.describe(),
        "schedule": {"start": schedule.start, "end": schedule.end, "frequency": schedule.frequency},
        "total_steps": total_steps if total_steps != float("inf") else None,
        "targets": {t.name: [t.final_sparsity, t.group] for t in targets},
    }


def is_pruning_state(value: Any) -> bool:
    """Whether ``value``, an entry of ``checkpoint["lightning_shrink"]``, was written by a pruning
    plugin (of any version)."""
    if not isinstance(value, Mapping):
        return False
    return value.get("technique") == TECHNIQUE or {"masks", "last_update_step", "update_count"} <= set(value)


def check_resume(name: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume from ``saved`` (a plugin's checkpoint state) with the run described by
    ``current`` (:func:`resume_record`) when they differ in what decides the masks.

    States of version 1 hold no arguments: their resolved schedule and masked parameters are compared.

    Raises:
        ValueError: naming the plugin and every difference.
    """
    changes: list[str] = []
    theirs, mine = saved.get("config"), current["config"]
    if isinstance(theirs, Mapping):
        for key, value in mine.items():
            if key in _NOT_COMPARED or key not in theirs or theirs[key] == value:
                continue
            changes.append(f"`{key}` was {theirs[key]!r}, is {value!r}")
    schedule = saved.get("schedule")
    if isinstance(schedule, Mapping):
        before = tuple(schedule.get(k) for k in ("start", "end", "frequency"))
        after = tuple(current["schedule"][k] for k in ("start", "end", "frequency"))
        if before != after:
            change = f"the schedule (start, end, frequency) resolved to {before} optimizer steps, now {after}"
            total_before, total_after = saved.get("total_steps"), current["total_steps"]
            if total_before is not None and total_before != total_after:
                change += (
                    f" (the run's length changed from {total_before:g} to {total_after:g} optimizer steps, "
                    "and fractions are of the run's length)"
                )
            changes.append(change)
    saved_targets = saved.get("targets", saved.get("masks"))
    if isinstance(saved_targets, Mapping) and not changes:
        before_names, after_names = set(saved_targets), set(current["targets"])
        if before_names != after_names:
            differ = sorted(before_names ^ after_names)
            changes.append(
                f"the selected parameters differ ({len(differ)}: {differ[:4]}"
                f"{' ...' if len(differ) > 4 else ''})"
            )
        elif "targets" in saved:
            moved = [n for n in sorted(after_names) if list(saved_targets[n]) != current["targets"][n]]
            if moved:
                changes.append(f"the final sparsity or threshold group of {moved[:4]} differ")
    if changes:
        raise ValueError(
            f"{OWNER} ({name!r}): the checkpoint was written by a run that pruned differently: "
            f"{'; '.join(changes)}. Resuming would follow a schedule that the checkpoint's masks were not "
            f"made for and could end short of the target without a word. {_HOW_TO}"
        )
