"""Tiny models and data for tests: real LightningModules and transformers models built from
configs (nothing is downloaded), small enough for a CPU ``Trainer.fit`` in about a second."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "DeferredTinyClassifier",
    "RandomClassificationData",
    "ShardedTinyClassifier",
    "TinyClassifier",
    "TinyTransformerClassifier",
    "TokenClassificationDataset",
    "cpu_trainer",
    "random_classification_data",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_qwen2",
    "token_dataloader",
]


def random_classification_data(
    n: int = 64, in_features: int = 16, num_classes: int = 2, seed: int = 0
) -> TensorDataset:
    """A linearly separable-ish random classification set (features, labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    w = torch.randn(in_features, num_classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """An MLP classifier: ``Linear -> ReLU -> Linear -> ReLU -> Linear`` (the last one is
    ``classifier``). ``training_step`` returns the cross-entropy loss."""

    def __init__(
        self,
        in_features: int = 16,
        hidden: int = 32,
        num_classes: int = 2,
        lr: float = 0.1,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        self.classifier: nn.Linear | None = None
        if not self.build_in_configure_model:
            self._build()

    #: Whether the layers are created in ``configure_model`` instead of ``__init__``.
    build_in_configure_model: ClassVar[bool] = False

    def _build(self) -> None:
        h = self.hparams
        self.net = nn.Sequential(
            nn.Linear(h.in_features, h.hidden), nn.ReLU(), nn.Linear(h.hidden, h.hidden), nn.ReLU()
        )
        self.classifier = nn.Linear(h.hidden, h.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.net(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        acc = (self(x).argmax(dim=1) == y).float().mean()
        self.log("test_acc", acc)
        return acc

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class DeferredTinyClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose layers do not exist until ``configure_model`` creates them
    (Lightning's pattern for models too large to build in ``__init__``): techniques must prepare the
    model in ``shrink_configure_model``, not earlier. A second ``configure_model`` call keeps the
    layers it built."""

    build_in_configure_model = True

    def configure_model(self) -> None:
        if self.net is None:
            self._build()


class ShardedTinyClassifier(TinyClassifier):
    """:class:`TinyClassifier` sharded with FSDP2 for ``ModelParallelStrategy``: each ``Linear`` and
    then the whole module are ``fully_shard``-ed over the ``"data_parallel"`` mesh dimension in
    ``configure_model`` (weights split along dim 0 across the ranks)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (*self.net, self.classifier):
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class RandomClassificationData(pl.LightningDataModule):
    """:func:`random_classification_data` as a LightningDataModule, for recipes
    (``data.class_path: lightning_shrink.testing.models.RandomClassificationData``) and examples:
    ``n`` training examples and ``val_size`` held-out ones (the validation and the test loader) of
    one labelling rule.

    Args:
        n: Training examples.
        in_features: Features per example.
        num_classes: Classes.
        batch_size: Batch size of every loader.
        val_size: Held-out examples.
        seed: Seed of the examples and of the labelling rule.
    """

    def __init__(
        self,
        n: int = 64,
        in_features: int = 16,
        num_classes: int = 2,
        batch_size: int = 8,
        val_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for argument, value in (("n", n), ("batch_size", batch_size), ("val_size", val_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"RandomClassificationData: `{argument}` must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"RandomClassificationData: `{argument}` must be >= 1, got {value!r}")
        self.save_hyperparameters()
        data = random_classification_data(n + val_size, in_features, num_classes, seed)
        self.train_set = TensorDataset(*(t[:n] for t in data.tensors))
        self.val_set = TensorDataset(*(t[n:] for t in data.tensors))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def tiny_bert(
    num_labels: int = 2, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, **kwargs: Any
) -> nn.Module:
    """A 2-layer BERT for sequence classification, built from a config (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kwargs,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(
    num_labels: int = 2, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, **kwargs: Any
) -> nn.Module:
    """A 2-layer GPT-2 (``Conv1D`` layers) for sequence classification, built from a config."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=2,
        n_positions=64,
        num_labels=num_labels,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **kwargs,
    )
    return GPT2ForSequenceClassification(config)


def _decoder_kwargs(vocab_size: int, hidden_size: int, num_layers: int, num_labels: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )


def tiny_llama(
    num_labels: int = 2, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, **kwargs: Any
) -> nn.Module:
    """A 2-layer Llama for sequence classification, built from a config (random weights)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(**_decoder_kwargs(vocab_size, hidden_size, num_layers, num_labels), **kwargs)
    return LlamaForSequenceClassification(config)


def tiny_qwen2(
    num_labels: int = 2, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, **kwargs: Any
) -> nn.Module:
    """A 2-layer Qwen2 (biased q/k/v projections) for sequence classification, built from a config."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(**_decoder_kwargs(vocab_size, hidden_size, num_layers, num_labels), **kwargs)
    return Qwen2ForSequenceClassification(config)


class TokenClassificationDataset(Dataset):
    """Random token sequences whose label is whether token 3 occurs more often than token 4."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab_size: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(2, vocab_size, (n, seq_len), generator=g)
        self.labels = ((self.input_ids == 3).sum(1) > (self.input_ids == 4).sum(1)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def token_dataloader(
    n: int = 64,
    batch_size: int = 8,
    seq_len: int = 16,
    vocab_size: int = 64,
    seed: int = 0,
    shuffle: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`TokenClassificationDataset` batches (dicts of tensors)."""
    return DataLoader(
        TokenClassificationDataset(n, seq_len, vocab_size, seed), batch_size=batch_size, shuffle=shuffle
    )


class TinyTransformerClassifier(pl.LightningModule):
    """Wraps a transformers sequence classifier the way users do: ``training_step`` calls
    ``self.model(**batch)`` with keyword arguments and returns ``outputs.loss``."""

    def __init__(self, model: nn.Module | Callable[[], nn.Module] | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        if model is None:
            model = tiny_bert()
        elif not isinstance(model, nn.Module):
            model = model()
        self.model = model
        self.lr = lr

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.log("val_loss", out.loss)
        return out.loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("test_acc", acc)
        return acc

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def cpu_trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet, fast CPU Trainer: no logger, no checkpointing, no progress bar, no model summary,
    one epoch, unless ``kwargs`` says otherwise."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
