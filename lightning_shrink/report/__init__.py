"""The compression report: what every plugin reports about a run or a model.

:func:`report` gathers :class:`~lightning_shrink.ReportRow`\\ s from every plugin
(``shrink_report_rows``); :class:`CompressionReport` prints them as a table and JSON and, when
matplotlib is installed, draws them (:mod:`lightning_shrink.report.plot`).
"""

from lightning_shrink.report.table import (
    CompressionReport,
    metric_history,
    read_metrics_csv,
    report,
    save_report,
)
from lightning_shrink.types import History, ReportRow

__all__ = [
    "CompressionReport",
    "History",
    "ReportRow",
    "metric_history",
    "read_metrics_csv",
    "report",
    "save_report",
]
