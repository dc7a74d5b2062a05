"""The plugin's checkpoint state, and the check that a resumed run distils as the saved run did.

A checkpoint's entry (``checkpoint["lightning_shrink"][<plugin name>]``) holds plain data: the
learned projections' tensors and a description of the run (temperature, alpha at the checkpoint's
step, weights, layer maps, the student's attribute path, the projections' optimizer settings and
the teacher's identity). A resume whose description differs is refused, naming every difference:
distilling with another temperature, alpha, layer map or teacher from a checkpoint's optimizer
state would continue a run that is not the one the checkpoint's metrics describe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_shrink.distillation.config import DistillationConfig

__all__ = ["VERSION", "describe_run", "run_changes"]

#: Version of the entry's layout: 1 held the projections only; 2 adds ``step`` and ``run``.
VERSION = 2

_LABELS = {
    "temperature": "`temperature`",
    "alpha": "`alpha` at the checkpoint's step",
    "kl_weight": "`kl_weight`",
    "hidden_mse_weight": "`hidden_mse_weight`",
    "hidden_cosine_weight": "`hidden_cosine_weight`",
    "attention_weight": "`attention_weight`",
    "layer_map": "`layer_map`",
    "attention_layer_map": "`attention_layer_map`",
    "student": "the student (attribute path in the LightningModule)",
    "teacher_dtype": "`teacher_dtype`",
    "projection_lr": "`projection_lr`",
    "projection_weight_decay": "`projection_weight_decay`",
}

_TEACHER_LABELS = {
    "class": "the teacher's class",
    "parameters": "the teacher's parameter count",
}


def describe_run(
    config: DistillationConfig, student_name: str, teacher: Mapping[str, Any], step: int
) -> dict[str, Any]:
    """The run as plain data, with ``alpha`` evaluated at optimizer step ``step``."""
    return {
        "temperature": config.temperature,
        "alpha": config.alpha_at(step),
        "kl_weight": config.kl_weight,
        "hidden_mse_weight": config.hidden_mse_weight,
        "hidden_cosine_weight": config.hidden_cosine_weight,
        "attention_weight": config.attention_weight,
        "layer_map": [list(pair) for pair in config.layer_map],
        "attention_layer_map": [list(pair) for pair in config.attention_layer_map],
        "student": student_name,
        "teacher_dtype": None if config.teacher_dtype is None else str(config.teacher_dtype),
        "projection_lr": config.projection_lr,
        "projection_weight_decay": config.projection_weight_decay,
        "teacher": dict(teacher),
    }


def _show(key: str, value: Any) -> str:
    if key in ("layer_map", "attention_layer_map"):
        return repr(dict(map(tuple, value)))
    return repr(value)


def run_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a saved run description and the current one, one phrase per item
    (``"`temperature` 2.0 -> 3.0"``); keys missing from ``saved`` are not compared."""
    changes = []
    for key, label in _LABELS.items():
        if key in saved and saved[key] != current[key]:
            changes.append(f"{label} {_show(key, saved[key])} -> {_show(key, current[key])}")
    old, new = saved.get("teacher") or {}, current["teacher"]
    for key, label in _TEACHER_LABELS.items():
        if key in old and old[key] != new[key]:
            changes.append(f"{label} {old[key]!r} -> {new[key]!r}")
    if "fingerprint" in old and all(old.get(k) == new[k] for k in _TEACHER_LABELS):
        before, after = old["fingerprint"], new["fingerprint"]
        if len(before) != len(after):
            changed = len(after)
        else:
            pairs = zip(before, after, strict=True)
            changed = sum(not math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-7) for a, b in pairs)
        if changed:
            changes.append(f"the teacher's weights ({changed} of {len(after)} parameter tensors differ)")
    return changes
