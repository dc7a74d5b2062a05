"""The demo of lightning-shrink: a real pretrained transformer fine-tuned on real data, dense and
compressed, with a report (``lightning-shrink demo``).

The pieces are reusable: :class:`SequenceClassifier` and :class:`TextClassificationData` serve the
``lightning-shrink fit`` recipes and the examples.
"""

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
from lightning_shrink.demo.model import (
    SequenceClassifier,
    TextClassificationData,
    evaluate_accuracy,
    load_backbone,
    load_tokenizer,
    make_dataloader,
    measure_latency,
)
from lightning_shrink.demo.run import PRESETS, DemoConfig, DemoError, run_demo, technique_status

__all__ = [
    "PRESETS",
    "DataError",
    "DemoConfig",
    "DemoError",
    "Example",
    "SequenceClassifier",
    "TextClassificationData",
    "TextClassificationSet",
    "cache_dir",
    "evaluate_accuracy",
    "load_backbone",
    "load_csv",
    "load_data",
    "load_hf_dataset",
    "load_rotten_tomatoes",
    "load_tokenizer",
    "make_dataloader",
    "measure_latency",
    "run_demo",
    "split_by_group",
    "technique_status",
]
