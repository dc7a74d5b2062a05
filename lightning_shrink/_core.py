"""The essential built-in plugin: report rows that describe any model.

Counts parameters once even when they are shared (tied embeddings and LM heads in transformers
models), so the reported density is never inflated by double counting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.types import ReportRow

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn


def unique_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with each shared tensor listed once (under its first name)."""
    return list(model.named_parameters(remove_duplicate=True))


@hookimpl(trylast=True)
def shrink_report_rows(trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow]:
    params = unique_parameters(model)
    total = sum(p.numel() for _, p in params)
    with torch.no_grad():
        nonzero = sum(int(torch.count_nonzero(p.detach()).item()) for _, p in params)
    size = sum(p.numel() * p.element_size() for _, p in params)
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    return [
        ReportRow("model", "parameters", total),
        ReportRow("model", "nonzero parameters", nonzero),
        ReportRow("model", "density", nonzero / total if total else 0.0),
        ReportRow("model", "in-memory size (MB)", round(size / 1e6, 3)),
    ]
