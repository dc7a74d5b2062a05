"""The compression report: rows gathered from every plugin, printed as a table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_shrink.manager import ShrinkPluginManager

__all__ = ["CompressionReport", "ReportRow", "report"]


@dataclass(frozen=True)
class ReportRow:
    """One line of the compression report.

    Args:
        technique: Which plugin or part reports it, e.g. ``"pruning"``.
        metric: What is measured, e.g. ``"sparsity"`` or ``"epsilon"``.
        value: The measured value.
        target: What it is measured on (a layer's name), or ``""`` for the whole model.
    """

    technique: str
    metric: str
    value: Any
    target: str = ""


@dataclass
class CompressionReport:
    """The rows of every plugin, in the order the plugins returned them."""

    rows: list[ReportRow]

    def select(self, technique: str | None = None, metric: str | None = None) -> list[ReportRow]:
        """Rows matching ``technique`` and ``metric`` (``None`` matches all)."""
        return [
            r
            for r in self.rows
            if (technique is None or r.technique == technique) and (metric is None or r.metric == metric)
        ]

    def to_table(self) -> str:
        """The rows as an aligned plain-text table."""
        header = ("technique", "target", "metric", "value")
        lines = [(r.technique, r.target, r.metric, _format_value(r.value)) for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_table()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(results: Iterable[Any]) -> list[ReportRow]:
    rows: list[ReportRow] = []
    for result in results:
        rows.extend(result or ())
    return rows


def report(
    trainer: pl.Trainer | None = None,
    model: nn.Module | None = None,
    pluginmanager: ShrinkPluginManager | None = None,
) -> CompressionReport:
    """Gather the compression report.

    With a ``trainer`` that ran lightning-shrink callbacks, every plugin of its run contributes
    rows (the model defaults to ``trainer.lightning_module``). With a bare ``model``, the built-in
    and entry-point plugins report on it.
    """
    from lightning_shrink.callback import ShrinkCallback
    from lightning_shrink.manager import get_plugin_manager

    if trainer is not None:
        model = model if model is not None else trainer.lightning_module
        if pluginmanager is None:
            bridge = ShrinkCallback.find(trainer)
            pluginmanager = bridge.pluginmanager if bridge is not None else None
    if model is None:
        raise ValueError("report() needs a `trainer` or a `model`")
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    # pluggy returns results last-registered first; report them in registration order.
    results = pm.hook.shrink_report_rows(trainer=trainer, model=model)
    return CompressionReport(_flatten(reversed(results)))
