"""The ``lightning-shrink`` command: ``plugins``, ``fit`` with the example recipes, and recipe errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lightning_shrink.cli import ShrinkCLI, check_recipe_callbacks, describe_plugins, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
FIXTURE = Path(__file__).parent / "data" / "reviews.csv"


def test_usage_and_unknown_subcommand(capsys):
    assert main([]) == 2
    assert "fit --config recipe.yaml" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["shrinkify"]) == 2
    assert "unknown subcommand 'shrinkify'" in capsys.readouterr().err


def test_plugins_lists_builtin_entry_point_and_blocked_plugins(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_shrink_plugin.py").write_text(
        textwrap.dedent(
            """
            from lightning_shrink import hookimpl

            @hookimpl
            def shrink_metrics():
                return {"acme/value": 1.0}

            @hookimpl
            def shrink_report_rows(trainer, model):
                return []
            """
        )
    )
    info = site / "acme_shrink-2.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-shrink\nVersion: 2.0.1\n")
    (info / "entry_points.txt").write_text("[lightning_shrink]\nacme = acme_shrink_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    try:
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "core (built-in, essential): lightning_shrink._core" in out
        assert "acme (entry point, distribution acme-shrink 2.0.1): acme_shrink_plugin" in out
        acme_hooks = out.split("acme (entry point")[1].splitlines()[1]
        assert acme_hooks.strip() == "hooks: shrink_metrics, shrink_report_rows"
        assert "blocked plugins: (none)" in out
        pruning = out.split("GradualMagnitudePruning -> plugin 'pruning'")[1].splitlines()[1]
        assert pruning.strip().startswith("hooks: ") and "shrink_after_optimizer_step" in pruning

        assert main(["plugins", "-p", "acme"]) == 0
        out = capsys.readouterr().out
        assert "acme (entry point" not in out and "blocked plugins: acme" in out

        text = describe_plugins(autoload=False)
        assert "entry-point autoload: off" in text and "acme" not in text

        assert main(["plugins", "-p", "core"]) == 2
        assert "essential" in capsys.readouterr().err
    finally:
        sys.modules.pop("acme_shrink_plugin", None)


def _parse_recipe(path: Path, *overrides: str) -> ShrinkCLI:
    """Parse and instantiate a recipe the way ``lightning-shrink fit --config`` does, without fitting."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    return ShrinkCLI(
        args=["--config", str(path), *overrides],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
    )


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A tiny teacher saved as a transformers model directory (what all_three.yaml can name)."""
    from lightning_shrink.demo import load_backbone

    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    load_backbone("tiny").save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["dense", "pruning", "qat", "all_three", "dp_finetune"])
def test_every_recipe_parses_and_instantiates(name, teacher_checkpoint, tmp_path):
    recipe = RECIPES / f"{name}.yaml"
    check_recipe_callbacks(str(recipe))
    raw = yaml.safe_load(recipe.read_text())
    if name == "all_three":
        # The recipe names the checkpoint dense.yaml writes; point it at a tiny saved teacher.
        kd = raw["trainer"]["callbacks"][2]
        assert kd["class_path"].endswith("KnowledgeDistillation")
        kd["init_args"]["teacher"] = str(teacher_checkpoint)
        recipe = tmp_path / recipe.name
        recipe.write_text(yaml.safe_dump(raw))
    if name == "dp_finetune":
        pytest.importorskip("opacus")
    cli = _parse_recipe(recipe, "--model.init_args.model_name", "tiny")
    expected = [cb["class_path"].rsplit(".", 1)[-1] for cb in raw["trainer"].get("callbacks", [])]
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    for cls_name in expected:
        assert cls_name in names
    assert type(cli.model).__name__ == "SequenceClassifier"
    assert cli.trainer.max_steps == raw["trainer"].get("max_steps", -1)


@pytest.mark.slow
def test_fit_runs_a_recipe_and_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "fit",
            "--config",
            str(RECIPES / "pruning.yaml"),
            "--config",
            str(RECIPES / "qat.yaml"),
            "--model.init_args.model_name=tiny",
            "--model.init_args.lr=0.001",
            f"--data.init_args.data={FIXTURE}",
            "--data.init_args.group_column=movie",
            "--data.init_args.batch_size=8",
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Compression report (written to" in out
    (log_dir,) = list((tmp_path / "run" / "lightning_logs").iterdir())
    for name in ("report.txt", "report.json", "report.png", "metrics.csv", "config.yaml"):
        assert (log_dir / name).is_file(), name
    table = (log_dir / "report.txt").read_text()
    # The second --config's callbacks replace the first's: QAT only.
    assert "quantization" in table and "fake-quantized layers" in table


def test_unknown_callback_argument_names_the_field(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    raw = yaml.safe_load((RECIPES / "pruning.yaml").read_text())
    raw["trainer"]["callbacks"][0]["init_args"]["target_sparsty"] = 0.9
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "trainer.callbacks[0].init_args.target_sparsty" in err
    assert "GradualMagnitudePruning has no argument 'target_sparsty'; did you mean 'target_sparsity'?" in err

    # LightningCLI (jsonargparse) itself also rejects it, naming the option.
    with pytest.raises(SystemExit) as exc:
        _parse_recipe(recipe)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Option 'target_sparsty' is not accepted" in err or "target_sparsty" in err


def test_rejected_callback_value_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    raw = yaml.safe_load((RECIPES / "pruning.yaml").read_text())
    raw["trainer"]["callbacks"][0]["init_args"]["target_sparsity"] = 1.5
    raw["model"]["init_args"]["model_name"] = "tiny"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "lightning-shrink fit: error: ValueError" in err and "target_sparsity" in err


def _tiny_recipe(tmp_path: Path, **trainer: object) -> Path:
    """The tiny recipe of docs/cli.md (the MLP, random data, pruning), quiet and under ``tmp_path``."""
    import re

    blocks = re.findall(r"^```yaml\n(.*?)^```$", (ROOT / "docs" / "cli.md").read_text(), re.S | re.M)
    (text,) = [b for b in blocks if "RandomClassificationData" in b]
    recipe = yaml.safe_load(text)
    recipe["trainer"].update(
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path / "run"),
        **trainer,
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_fit_without_a_logger_prints_the_report_and_warns_nothing_about_loggers(tmp_path, capsys, recwarn):
    assert main(["fit", "--config", str(_tiny_recipe(tmp_path, logger=False))]) == 0
    out = capsys.readouterr().out
    assert "Compression report:" in out and "pruning" in out
    # Every plugin metric (one per pruned layer) is logged with logger=False when there is no logger.
    assert not [w for w in recwarn if "no logger configured" in str(w.message)]
    assert not list((tmp_path / "run").rglob("report.*"))


def _site_packages_without(tmp_path: Path, *names: str) -> tuple[str, Path]:
    """The site-packages directory, and a copy of it (links) in which the distributions ``names``
    (their modules and metadata) are not installed."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    copy = tmp_path / "site-packages"
    copy.mkdir()
    hidden = {n.lower() for n in names}
    for entry in site.iterdir():
        stem = entry.name.split("-", 1)[0].removesuffix(".py").lower()
        if stem not in hidden:
            (copy / entry.name).symlink_to(entry)
    return str(site), copy


@pytest.mark.slow
def test_fit_without_matplotlib_writes_the_table_and_json_report(tmp_path):
    # A fresh process in which matplotlib is not installed: neither its modules nor its metadata are
    # on the path (what libraries such as torchmetrics check before importing it).
    site, without = _site_packages_without(tmp_path, "matplotlib", "mpl_toolkits", "pylab")
    program = (
        "import sys\n"
        f"sys.path = [{str(without)!r} if p == {site!r} else p for p in sys.path]\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('matplotlib') is None\n"
        "from lightning_shrink.cli import main\n"
        f"sys.exit(main(['fit', '--config', {str(_tiny_recipe(tmp_path))!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Compression report (written to" in proc.stdout
    (log_dir,) = list((tmp_path / "run" / "lightning_logs").iterdir())
    assert "pruning" in (log_dir / "report.txt").read_text()
    assert json.loads((log_dir / "report.json").read_text())["history"]["pruning/sparsity"]
    assert not (log_dir / "report.png").exists()
