"""The demo of lightning-shrink: a real pretrained transformer fine-tuned on real data, dense and
compressed, with a report (``lightning-shrink demo``).

Modules, one job each: :mod:`~lightning_shrink.demo.data` (data sources and the split by group),
:mod:`~lightning_shrink.demo.datasets` (the named data sets of ``--dataset``),
:mod:`~lightning_shrink.demo.model` (the backbone and :class:`SequenceClassifier`),
:mod:`~lightning_shrink.demo.datamodule` (tokenized loaders and :class:`TextClassificationData`),
:mod:`~lightning_shrink.demo.config` (:class:`DemoConfig` and the presets),
:mod:`~lightning_shrink.demo.recipe` (the recipe table and the compression callbacks),
:mod:`~lightning_shrink.demo.measure` (accuracy, latency, sparsity, sizes),
:mod:`~lightning_shrink.demo.console` (what is printed), :mod:`~lightning_shrink.demo.summary` (the
result table), :mod:`~lightning_shrink.demo.run` (the pipeline, :func:`run_demo`).

The pieces are reusable: :class:`SequenceClassifier` and :class:`TextClassificationData` serve the
``lightning-shrink fit`` recipes and the examples.
"""

from lightning_shrink.demo.config import PRESETS, TECHNIQUES, DemoConfig, DemoError
from lightning_shrink.demo.data import (
    DataError,
    Example,
    TextClassificationSet,
    cache_dir,
    load_csv,
    load_data,
    load_hf_dataset,
    load_rotten_tomatoes,
    split_by_group,
)
from lightning_shrink.demo.datamodule import TextClassificationData, make_dataloader
from lightning_shrink.demo.datasets import DATASETS, load_dataset, load_tweet_sentiment
from lightning_shrink.demo.measure import evaluate_accuracy, machine_info, measure_latency
from lightning_shrink.demo.model import SequenceClassifier, bert_config, load_backbone, load_tokenizer
from lightning_shrink.demo.recipe import RECIPES, Recipe
from lightning_shrink.demo.run import run_demo

__all__ = [
    "DATASETS",
    "PRESETS",
    "RECIPES",
    "TECHNIQUES",
    "DataError",
    "DemoConfig",
    "DemoError",
    "Example",
    "Recipe",
    "SequenceClassifier",
    "TextClassificationData",
    "TextClassificationSet",
    "bert_config",
    "cache_dir",
    "evaluate_accuracy",
    "load_backbone",
    "load_csv",
    "load_data",
    "load_dataset",
    "load_hf_dataset",
    "load_rotten_tomatoes",
    "load_tokenizer",
    "load_tweet_sentiment",
    "machine_info",
    "make_dataloader",
    "measure_latency",
    "run_demo",
    "split_by_group",
]
