"""Run by tests/test_pruning_structured.py in a subprocess: a real 2-process CPU fit under DDP with
head and neuron pruning of a tiny BERT.

Before the first batch, rank 1 rescales its copy of the weights so that its own magnitudes would rank
the heads and neurons in the opposite order: the masks must still be rank 0's on both ranks.

``python pruning_structured_ddp.py OUT``: each rank writes what it saw to ``OUT/structured-rank<k>.pt``.
Also run from pruning_criteria_ddp.py (``structured``), in the same launch as the criteria's fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.testing.models import TinyTransformerClassifier, cpu_trainer, token_dataloader


class ReverseOnRankOne(pl.Callback):
    """On rank 1 only: scale every group's weights so that the last group is the largest."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 1:
            return
        bert = pl_module.model.bert
        with torch.no_grad():
            for layer in bert.encoder.layer:
                for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    lin.weight.mul_(torch.arange(1, 5).repeat_interleave(8).unsqueeze(1) * 10.0)
                layer.intermediate.dense.weight.mul_(torch.arange(1, 65).unsqueeze(1) * 10.0)


def main(out: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = TinyTransformerClassifier(BertForSequenceClassification(config), lr=1e-2)
    heads = GradualMagnitudePruning(0.5, pattern="heads", end_step=4, frequency=2)
    neurons = GradualMagnitudePruning(0.5, pattern="neurons", end_step=4, frequency=2, name="neurons")
    trainer = cpu_trainer(
        callbacks=[heads, neurons, ReverseOnRankOne()], strategy="ddp", devices=2, max_steps=6, max_epochs=2
    )
    trainer.fit(model, token_dataloader(n=48))
    torch.save(
        {
            "masks": {**heads.masks, **neurons.masks},
            "sparsity": [heads.sparsity, neurons.sparsity],
            "global_step": trainer.global_step,
        },
        out / f"structured-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
