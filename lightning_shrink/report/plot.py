"""The compression report as a figure (optional: needs matplotlib)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_shrink.report.table import CompressionReport

__all__ = ["matplotlib_available", "plot_report"]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (it is an optional dependency: the ``demo`` extra)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_report(
    report: CompressionReport,
    path: str | os.PathLike[str],
    title: str = "lightning-shrink compression report",
) -> Path:
    """Draw ``report`` with matplotlib (Agg backend) and save it to ``path`` (PNG, SVG, PDF...).

    Panels, each drawn when there is something to show:

    * **sparsity over steps**: every history series whose name contains ``sparsity``;
    * **accuracy over steps**: every history series whose name contains ``acc``;
    * **accuracy**: a bar per row whose metric contains ``accuracy`` (e.g. dense vs compressed);
    * **per-layer sparsity**: rows with a ``target`` and a ``sparsity`` metric, when no sparsity
      history exists.

    A report with none of these shows the model's density row, so a file is always written.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("CompressionReport.plot needs matplotlib: pip install matplotlib") from exc

    # Overall series only: per-layer series (``pruning/sparsity/<layer>``) would crowd the panel.
    sparsity = {k: v for k, v in report.history.items() if "sparsity" in k.rsplit("/", 1)[-1].lower() and v}
    accuracy = {
        k: v for k, v in report.history.items() if "acc" in k.lower() and "sparsity" not in k.lower() and v
    }
    acc_rows = [r for r in report.rows if "accuracy" in r.metric.lower() and _is_number(r.value)]
    layer_rows = (
        []
        if sparsity
        else [r for r in report.rows if r.target and "sparsity" in r.metric.lower() and _is_number(r.value)]
    )
    panels: list[tuple[str, Any]] = []
    if sparsity:
        panels.append(("series", ("sparsity over training", "sparsity", sparsity)))
    if accuracy:
        panels.append(("series", ("accuracy over training", "accuracy", accuracy)))
    if acc_rows:
        panels.append(("bars", ("accuracy", [(r.target or r.technique, float(r.value)) for r in acc_rows])))
    if layer_rows:
        panels.append(("barh", ("sparsity per layer", [(r.target, float(r.value)) for r in layer_rows[:40]])))
    if not panels:
        density = [(r.target or r.technique, float(r.value)) for r in report.select(metric="density")]
        panels.append(("bars", ("density (nonzero fraction)", density or [("model", 0.0)])))

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (kind, spec) in zip(axes[0], panels, strict=True):
        if kind == "series":
            name, ylabel, series = spec
            for label, points in sorted(series.items()):
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label, marker="." if len(points) < 30 else None)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        elif kind == "bars":
            name, bars = spec
            labels, values = zip(*bars, strict=True)
            positions = range(len(values))
            ax.bar(
                positions,
                values,
                color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(values)] or None,
            )
            ax.set_xticks(list(positions), labels, rotation=15, fontsize=8)
            for x, v in zip(positions, values, strict=True):
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
            low = min(values)
            if name == "accuracy" and low > 0.2:
                ax.set_ylim(max(0.0, low - 0.15), min(1.0, max(values) + 0.05))
            ax.set_title(name)
        else:
            name, bars = spec
            labels, values = zip(*bars, strict=True)
            ax.barh(range(len(values)), values)
            ax.set_yticks(range(len(values)), labels, fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel("sparsity")
            ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
