"""The compression report: rows gathered from every plugin, printed as a table, plotted, and
written into the logger's directory."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_shrink.manager import ShrinkPluginManager

__all__ = ["CompressionReport", "ReportRow", "metric_history", "report", "save_report"]

#: A metric's values over training: ``(step, value)`` pairs in step order.
History = dict[str, list[tuple[int, float]]]


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
    """The rows of every plugin, in the order the plugins returned them.

    Attributes:
        rows: The report rows.
        history: Optional metric values over training steps (``name -> [(step, value), ...]``),
            e.g. from :func:`metric_history`; :meth:`plot` draws them.
    """

    rows: list[ReportRow]
    history: History = field(default_factory=dict)

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

    def to_dict(self) -> dict[str, Any]:
        """Rows and history as JSON-serializable data."""
        return {
            "rows": [
                {
                    "technique": r.technique,
                    "target": r.target,
                    "metric": r.metric,
                    "value": _jsonable(r.value),
                }
                for r in self.rows
            ],
            "history": {k: [[int(s), float(v)] for s, v in pts] for k, pts in self.history.items()},
        }

    def plot(self, path: str | os.PathLike[str], title: str = "lightning-shrink compression report") -> Path:
        """Draw the report with matplotlib (Agg backend) and save it to ``path`` (PNG, SVG, PDF...).

        Panels, each drawn when there is something to show:

        * **sparsity over steps**: every history series whose name contains ``sparsity``;
        * **accuracy over steps**: every history series whose name contains ``acc``;
        * **accuracy**: a bar per row whose metric contains ``accuracy`` (e.g. dense vs
          compressed);
        * **per-layer sparsity**: rows with a ``target`` and a ``sparsity`` metric, when no
          sparsity history exists.

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
        sparsity = {k: v for k, v in self.history.items() if "sparsity" in k.rsplit("/", 1)[-1].lower() and v}
        accuracy = {
            k: v for k, v in self.history.items() if "acc" in k.lower() and "sparsity" not in k.lower() and v
        }
        acc_rows = [r for r in self.rows if "accuracy" in r.metric.lower() and _is_number(r.value)]
        layer_rows = (
            []
            if sparsity
            else [r for r in self.rows if r.target and "sparsity" in r.metric.lower() and _is_number(r.value)]
        )
        panels: list[tuple[str, Any]] = []
        if sparsity:
            panels.append(("series", ("sparsity over training", "sparsity", sparsity)))
        if accuracy:
            panels.append(("series", ("accuracy over training", "accuracy", accuracy)))
        if acc_rows:
            panels.append(
                ("bars", ("accuracy", [(r.target or r.technique, float(r.value)) for r in acc_rows]))
            )
        if layer_rows:
            panels.append(
                ("barh", ("sparsity per layer", [(r.target, float(r.value)) for r in layer_rows[:40]]))
            )
        if not panels:
            density = [(r.target or r.technique, float(r.value)) for r in self.select(metric="density")]
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

    def save(self, directory: str | os.PathLike[str], plot: bool = True) -> dict[str, Path]:
        """Write ``report.txt`` (the table), ``report.json`` (rows and history) and, with
        ``plot=True``, ``report.png`` into ``directory`` (created if needed).

        Returns the paths written, by kind (``"table"``, ``"json"``, ``"plot"``).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"table": directory / "report.txt", "json": directory / "report.json"}
        paths["table"].write_text(self.to_table() + "\n")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if plot:
            paths["plot"] = self.plot(directory / "report.png")
        return paths


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


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


def read_metrics_csv(path: str | os.PathLike[str]) -> History:
    """The series of a ``metrics.csv`` written by Lightning's ``CSVLogger``.

    Every column but ``step`` and ``epoch`` becomes a series of ``(step, value)`` pairs for the
    rows where it has a value.
    """
    history: History = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step_text = row.get("step", "")
            if not step_text:
                continue
            step = int(float(step_text))
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in ("", None):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                history.setdefault(key, []).append((step, value))
    for points in history.values():
        points.sort(key=lambda p: p[0])
    return history


def _metrics_csv(trainer: pl.Trainer) -> Path | None:
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()  # flush what is buffered
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                return path
    return None


def metric_history(trainer: pl.Trainer, names: Sequence[str] | None = None) -> History:
    """The logged metrics of ``trainer``'s run over steps, read from its ``CSVLogger``.

    Args:
        trainer: A trainer that ran with a ``CSVLogger`` (one of ``trainer.loggers``); without
            one the history is empty.
        names: Keep only these metrics (all when ``None``).
    """
    path = _metrics_csv(trainer)
    history = read_metrics_csv(path) if path is not None else {}
    if names is not None:
        history = {k: v for k, v in history.items() if k in set(names)}
    return history


def save_report(
    trainer: pl.Trainer,
    model: nn.Module | None = None,
    directory: str | os.PathLike[str] | None = None,
    extra_rows: Sequence[ReportRow] = (),
    history: Mapping[str, list[tuple[int, float]]] | None = None,
    plot: bool = True,
) -> CompressionReport:
    """Gather the report of ``trainer``'s run and write it into the logger's directory.

    Writes ``report.txt``, ``report.json`` and ``report.png`` (see
    :meth:`CompressionReport.save`) into ``directory``, by default ``trainer.log_dir``. The
    history plotted is the run's logged metrics (:func:`metric_history`) unless ``history`` is
    given.

    Raises:
        ValueError: no ``directory`` was given and the trainer has no logger.
    """
    target = directory
    if target is None:
        if not trainer.loggers or trainer.log_dir is None:
            raise ValueError("save_report: the trainer has no logger, so no log directory; pass `directory=`")
        target = trainer.log_dir
    rep = report(trainer, model)
    rep.rows.extend(extra_rows)
    rep.history = dict(history) if history is not None else metric_history(trainer)
    rep.save(target, plot=plot)
    return rep
