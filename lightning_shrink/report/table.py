"""The compression report: rows gathered from every plugin, as a table and JSON, written into the
logger's directory (with a plot when matplotlib is installed)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_shrink.types import History, ReportRow

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_shrink.manager import ShrinkPluginManager

__all__ = ["CompressionReport", "metric_history", "read_metrics_csv", "report", "save_report"]


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
        """Draw the report with matplotlib and save it to ``path``; see
        :func:`lightning_shrink.report.plot.plot_report`.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        from lightning_shrink.report.plot import plot_report

        return plot_report(self, path, title)

    def save(self, directory: str | os.PathLike[str], plot: bool | None = None) -> dict[str, Path]:
        """Write ``report.txt`` (the table), ``report.json`` (rows and history) and ``report.png``
        into ``directory`` (created if needed).

        Args:
            directory: Where to write.
            plot: ``True``: draw ``report.png`` (matplotlib must be installed); ``False``: do not;
                ``None`` (default): draw it when matplotlib is installed.

        Returns the paths written, by kind (``"table"``, ``"json"``, ``"plot"``).
        """
        from lightning_shrink.report.plot import matplotlib_available

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"table": directory / "report.txt", "json": directory / "report.json"}
        paths["table"].write_text(self.to_table() + "\n")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if plot or (plot is None and matplotlib_available()):
            paths["plot"] = self.plot(directory / "report.png")
        return paths


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
    from lightning_shrink.lightning.bridge import ShrinkCallback
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
    plot: bool | None = None,
) -> CompressionReport:
    """Gather the report of ``trainer``'s run and write it into the logger's directory.

    Writes ``report.txt``, ``report.json`` and, when matplotlib is installed or ``plot=True``,
    ``report.png`` (see :meth:`CompressionReport.save`) into ``directory``, by default
    ``trainer.log_dir``. The history plotted is the run's logged metrics (:func:`metric_history`)
    unless ``history`` is given.

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
