"""The examples run in one command (digits with a few epochs; the transformer example on the CSV fixture)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIXTURE = Path(__file__).parent / "data" / "reviews.csv"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_digits_example_prunes_quantizes_and_exports(tmp_path, capsys):
    results = _load("digits").main(["--epochs", "4", "--output-dir", str(tmp_path)])
    assert results["dense_accuracy"] > 0.85
    assert results["converted_accuracy"] > 0.8
    assert results["reloaded_accuracy"] == pytest.approx(results["converted_accuracy"])
    assert results["sparsity"] and results["sparsity"][0] == pytest.approx(0.8, abs=0.01)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert (tmp_path / "report" / "report.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "converted:" in capsys.readouterr().out


@pytest.mark.slow
def test_transformer_finetune_example_runs(tmp_path):
    results = _load("transformer_finetune").main(
        [
            "--model",
            "tiny",
            "--data",
            str(FIXTURE),
            "--group-column",
            "movie",
            "--teacher-steps",
            "3",
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert results["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert (tmp_path / "export" / "shrink_config.json").is_file()
    assert (tmp_path / "report" / "report.txt").is_file()


def _gradnorm_plugin(monkeypatch, **env: str):
    monkeypatch.syspath_prepend(str(EXAMPLES / "inhouse_plugin" / "src"))
    monkeypatch.delitem(sys.modules, "shrink_gradnorm", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shrink_gradnorm import GradNormPlugin

    return GradNormPlugin()


def test_inhouse_plugin_checks_its_prefixes_on_a_model_built_in_configure_model(
    monkeypatch, shrink_pluginmanager, cpu_trainer, tiny_dataloader
):
    from lightning_shrink.testing.models import DeferredTinyClassifier

    plugin = _gradnorm_plugin(monkeypatch, SHRINK_GRADNORM_FREEZE="net.0.", SHRINK_GRADNORM_FREEZE_STEPS="2")
    shrink_pluginmanager.register(plugin)
    model = DeferredTinyClassifier()  # no parameters until configure_model
    cpu_trainer(max_steps=3).fit(model, tiny_dataloader)
    assert plugin.steps == 3 and plugin.max_norm > 0


def test_inhouse_plugin_refuses_a_prefix_that_names_no_parameter(
    monkeypatch, shrink_pluginmanager, cpu_trainer, tiny_dataloader
):
    from lightning_shrink.testing.models import DeferredTinyClassifier

    plugin = _gradnorm_plugin(monkeypatch, SHRINK_GRADNORM_FREEZE="nett.0.")
    shrink_pluginmanager.register(plugin)
    with pytest.raises(ValueError, match=re.escape("no parameter of the model starts with 'nett.0.'")):
        cpu_trainer(max_steps=3).fit(DeferredTinyClassifier(), tiny_dataloader)
    assert plugin.steps == 0
