"""The compression report: table, JSON, plot, metric history and writing into the logger's directory."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lightning_shrink import GradualMagnitudePruning, report
from lightning_shrink.report import (
    CompressionReport,
    ReportRow,
    metric_history,
    read_metrics_csv,
    save_report,
)
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    # matplotlib is imported only when plotting; without it, the error says what to install.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rep = CompressionReport([ReportRow("model", "density", 1.0)])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        rep.plot(tmp_path / "x.png")
    paths = rep.save(tmp_path / "no-plot", plot=False)
    assert set(paths) == {"table", "json"}


def test_plot_and_save_with_history_and_accuracy_rows(tmp_path):
    rows = [
        ReportRow("pruning", "sparsity", 0.8, "pruned layers"),
        ReportRow("demo", "test accuracy", 0.81, "dense"),
        ReportRow("demo", "test accuracy", 0.79, "compressed"),
        ReportRow("model", "weight bits", 8),
    ]
    history = {
        "pruning/sparsity": [(s, min(0.8, s / 100)) for s in range(0, 200, 10)],
        "pruning/sparsity/net.0.weight": [(0, 0.0), (100, 0.5)],
        "val_acc": [(50, 0.7), (100, 0.75)],
    }
    rep = CompressionReport(rows, history=history)
    paths = rep.save(tmp_path / "out")
    assert set(paths) == {"table", "json", "plot"}
    assert paths["plot"].read_bytes()[:8] == PNG and paths["plot"].stat().st_size > 10_000
    assert "test accuracy" in paths["table"].read_text()
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1] == {
        "technique": "demo",
        "target": "dense",
        "metric": "test accuracy",
        "value": 0.81,
    }
    assert data["history"]["val_acc"] == [[50, 0.7], [100, 0.75]]
    # Other formats by extension; no history and no accuracy still gives a figure.
    svg = CompressionReport([ReportRow("model", "density", 0.25)]).plot(tmp_path / "density.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    assert CompressionReport([]).plot(tmp_path / "empty.png").read_bytes()[:8] == PNG


def test_read_metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,pruning/sparsity,step,train_loss\n0,0.1,0,0.9\n0,,1,0.8\n0,0.3,2,\n")
    assert read_metrics_csv(path) == {
        "pruning/sparsity": [(0, 0.1), (2, 0.3)],
        "train_loss": [(0, 0.9), (1, 0.8)],
    }


def test_save_report_writes_into_the_logger_directory(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = TinyClassifier()
    loader = DataLoader(random_classification_data(n=128), batch_size=8)
    trainer = cpu_trainer(
        max_steps=12,
        logger=CSVLogger(str(tmp_path), name="run"),
        log_every_n_steps=1,
        callbacks=[GradualMagnitudePruning(0.5, start_step=0, end_step=8, frequency=2)],
    )
    trainer.fit(model, loader)
    rep = save_report(trainer, extra_rows=[ReportRow("team", "note", "ok")])
    log_dir = tmp_path / "run" / "version_0"
    assert trainer.log_dir == str(log_dir)
    for name in ("report.txt", "report.json", "report.png"):
        assert (log_dir / name).is_file(), name
    sparsity = rep.history["pruning/sparsity"]
    assert sparsity[0][1] < 0.5 <= sparsity[-1][1] + 1e-6
    assert [s for s, _ in sparsity] == sorted(s for s, _ in sparsity)
    assert rep.select("team", "note")[0].value == "ok"
    assert rep.select("pruning", "sparsity")
    assert metric_history(trainer, names=["train_loss"]).keys() == {"train_loss"}
    # Without a logger there is no directory to default to.
    quiet = cpu_trainer(max_steps=1)
    quiet.fit(TinyClassifier(), loader)
    with pytest.raises(ValueError, match="no logger"):
        save_report(quiet)
    assert len(save_report(quiet, directory=tmp_path / "explicit").rows) == len(report(quiet).rows)
    assert (tmp_path / "explicit" / "report.png").is_file()
