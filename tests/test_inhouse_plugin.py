"""The example in-house plugin, installed as a real distribution and discovered through its entry
point during a real ``Trainer.fit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.utils.data import DataLoader
    from lightning_shrink import ShrinkCallback, report
    from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

    torch.manual_seed(0)
    model = TinyClassifier()
    frozen = model.net[0].weight.detach().clone()
    bridge = ShrinkCallback()
    trainer = cpu_trainer(callbacks=[bridge], max_steps=4)
    trainer.fit(model, DataLoader(random_classification_data(), batch_size=8))
    pm = bridge.pluginmanager
    plugin = pm.get_plugin("gradnorm")
    print(json.dumps({
        "registered": plugin is not None,
        "distribution": pm.distribution_of("gradnorm"),
        "steps": plugin.steps,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gradnorm/")},
        "frozen_unchanged": bool(torch.equal(model.net[0].weight, frozen)),
        "report": [r.metric for r in report(trainer).select("gradnorm")],
    }))
    """
)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "inhouse_plugin"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return target


def run_fit(site: Path, **env: str) -> dict:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), **env}
    environ.pop("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-c", FIT], env=environ, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_example_plugin_is_discovered_through_its_entry_point_and_called(installed_plugin):
    result = run_fit(installed_plugin, SHRINK_GRADNORM_FREEZE="net.0.", SHRINK_GRADNORM_FREEZE_STEPS="4")
    assert result["registered"] and result["distribution"] == "shrink-gradnorm 0.1.0"
    assert result["steps"] == 4
    assert result["logged"]["gradnorm/total"] > 0 and result["logged"]["gradnorm/max"] > 0
    assert result["frozen_unchanged"]
    assert result["report"] == ["largest gradient norm"]


@pytest.mark.slow
def test_example_plugin_is_not_loaded_with_autoload_off(installed_plugin):
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(installed_plugin), str(ROOT)]),
        "LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    code = (
        "from lightning_shrink import get_plugin_manager; print(get_plugin_manager().has_plugin('gradnorm'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
