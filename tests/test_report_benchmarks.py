"""benchmarks/run_all.py: the benchmarks page is assembled from the result files, with every goal
checked and every miss quantified."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all_under_test", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(module, "RESULTS", results)
    monkeypatch.setattr(module, "META", results / "run_all.json")
    monkeypatch.setattr(module, "DOC", tmp_path / "docs" / "benchmarks.md")
    monkeypatch.setattr(module, "HERE", tmp_path)
    yield module
    sys.modules.pop(spec.name, None)


def test_page_checks_goals_and_says_by_how_much_they_are_missed(run_all, tmp_path):
    (tmp_path / "results" / "pruning.json").write_text(
        json.dumps({"ratio_to_plain": {"plain": 1.0, "GradualMagnitudePruning": 1.02}})
    )
    (tmp_path / "results" / "quantization.json").write_text(
        json.dumps(
            {"train_step_ratio_vs_plain": {"lightning-shrink": 1.38}, "batch1_speedup_int8_over_fp32": 2.6}
        )
    )
    (tmp_path / "results" / "accuracy.json").write_text(
        json.dumps(
            {"points_vs_dense": {"sparse80_kd": -2.5, "int8_qat": -0.1}, "command": "python x.py --quick"}
        )
    )
    meta = {"machine": {"cpu": "Test CPU", "cores": 2, "torch": "9.9"}, "runs": {}}
    text = run_all.write_doc(meta, "python benchmarks/run_all.py --docs-only")
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == text
    assert "CPU: Test CPU (2 cores" in text
    lines = text.splitlines()

    def row(what: str) -> str:
        return next(line for line in lines if what in line)

    assert "| 1.02x | <= 1.03x | yes |" in row("GradualMagnitudePruning training step")
    assert "| 1.38x | <= 1.15x | **no** | 0.23x (20% of the target) |" in row(
        "QuantizationAwareTraining (int8)"
    )
    assert "| yes |" in row("batch-1 CPU speed-up over FP32 |")
    assert "| -2.5 points | >= -1 points | **no** | 1.5 points" in row("80% sparsity + distillation")
    assert "| -0.1 points | >= -0.5 points | yes |" in row("int8 QAT (converted)")
    assert "not measured (no result file)" in row("DifferentialPrivacy")
    assert "not measured (number not found in its JSON)" in row(
        "80% sparsity + int8 (int4 embeddings) + distillation"
    )
    assert "| accuracy | `python x.py --quick` |" in text
    assert "## quantization" in text and "| batch1_speedup_int8_over_fp32 | 2.6 |" in text
