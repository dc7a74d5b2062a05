"""shrink-gradnorm: log gradient norms, and freeze chosen layers for the first steps.

Configuration (entry-point plugins are created without arguments):

``SHRINK_GRADNORM_FREEZE``
    Comma-separated parameter-name prefixes to freeze, e.g. ``"model.bert.embeddings"``.
``SHRINK_GRADNORM_FREEZE_STEPS``
    For how many optimizer steps to freeze them (default 0: no freezing).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_shrink import ReportRow, hookimpl

__all__ = ["GradNormPlugin"]


class GradNormPlugin:
    """Measures the global gradient norm before every real optimizer step."""

    name = "gradnorm"

    def __init__(self) -> None:
        prefixes = os.environ.get("SHRINK_GRADNORM_FREEZE", "")
        self.freeze_prefixes = tuple(p.strip() for p in prefixes.split(",") if p.strip())
        steps = os.environ.get("SHRINK_GRADNORM_FREEZE_STEPS", "0")
        try:
            self.freeze_steps = int(steps)
        except ValueError:
            raise ValueError(f"SHRINK_GRADNORM_FREEZE_STEPS must be an integer, got {steps!r}") from None
        if self.freeze_steps < 0:
            raise ValueError(f"SHRINK_GRADNORM_FREEZE_STEPS must be >= 0, got {self.freeze_steps}")
        self.steps = 0
        self.last_norm = 0.0
        self.max_norm = 0.0

    @hookimpl
    def shrink_configure_model(self, pl_module: Any, stage: str) -> None:
        """Check that every prefix to freeze names parameters of the model (built by now)."""
        if stage != "fit" or not self.freeze_prefixes:
            return
        names = [n for n, _ in pl_module.named_parameters()]
        for prefix in self.freeze_prefixes:
            if not any(n.startswith(prefix) for n in names):
                raise ValueError(f"SHRINK_GRADNORM_FREEZE: no parameter of the model starts with {prefix!r}")

    # Runs after other plugins changed the gradients (privacy noise, masks): it logs what the
    # optimizer really receives.
    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, pl_module: Any) -> None:
        """Zero the frozen gradients during the first steps, then measure the global norm."""
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if self.steps < self.freeze_steps:
            for name, p in pl_module.named_parameters():
                if p.grad is not None and name.startswith(self.freeze_prefixes):
                    p.grad.zero_()
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if grads
            else 0.0
        )
        self.last_norm = float(norm)
        self.max_norm = max(self.max_norm, self.last_norm)
        self.steps += 1

    @hookimpl
    def shrink_metrics(self) -> dict[str, float]:
        """Log the last and the largest gradient norm."""
        return {"gradnorm/total": self.last_norm, "gradnorm/max": self.max_norm}

    @hookimpl
    def shrink_save_state(self, state: dict[str, Any]) -> None:
        """Keep the step count and the largest norm in the checkpoint."""
        state["gradnorm"] = {"steps": self.steps, "max_norm": self.max_norm}

    @hookimpl
    def shrink_load_state(self, state: dict[str, Any]) -> None:
        """Restore them on resume (defaults for checkpoints without them)."""
        mine = state.get("gradnorm", {})
        self.steps = mine.get("steps", 0)
        self.max_norm = mine.get("max_norm", 0.0)

    @hookimpl
    def shrink_report_rows(self) -> list[ReportRow]:
        """Report the largest gradient norm seen."""
        return [ReportRow("gradnorm", "largest gradient norm", self.max_norm)]
