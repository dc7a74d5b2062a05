"""Run by tests/test_pruning_distributed.py in a subprocess: real 2-process CPU fits under DDP.

``python pruning_ddp.py OUT one``: one GradualMagnitudePruning on a classifier whose layers are built
in ``configure_model``, with a different seed and different data on each rank (the masks must
still agree).

``python pruning_ddp.py OUT two``: two GradualMagnitudePruning callbacks on a tiny BERT, attention at
50 % and the MLP at 80 %, saving a checkpoint after every epoch under ``OUT/ckpt``; then the same run
resumed from the checkpoint after epoch 0.

``python pruning_ddp.py OUT lora``: a tiny Llama with peft LoRA adapters, built in ``configure_model``:
movement pruning of the attention's and taylor pruning of the MLP's frozen base weights, merged-weight
QAT and distillation (tests/test_large_models.py ``compressed_fit``).

Each rank writes what it saw to ``OUT/<mode>-rank<k>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from pruning_models import DeferredClassifier
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_large_models import compressed_fit

import lightning_shrink
from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)


def one(out: Path) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)  # different seeds on purpose: masks must still agree
    model = DeferredClassifier(optimizer="adamw", lr=0.05)
    cb = GradualMagnitudePruning(0.7, end_step=6, frequency=2)
    trainer = cpu_trainer(callbacks=[cb], strategy="ddp", devices=2, max_epochs=2)
    trainer.fit(model, DataLoader(random_classification_data(64, seed=rank), batch_size=8, shuffle=True))
    torch.save(
        {
            "masks": cb.masks,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "sparsity": cb.sparsity,
            "updates": cb.plugin.update_count,
            "global_step": trainer.global_step,
        },
        out / f"one-rank{trainer.global_rank}.pt",
    )


def two(out: Path, ckpt: str | None) -> None:
    torch.manual_seed(0)
    bert = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = TinyTransformerClassifier(bert, lr=1e-2)
    attention = GradualMagnitudePruning(0.5, end_step=3, frequency=1, scope="layer", modules="*.attention.*")
    mlp = GradualMagnitudePruning(
        0.8,
        start_step=2,
        end_step=6,
        frequency=2,
        modules=["*.intermediate.dense", "*.output.dense"],
        exclude_modules="*.attention.*",
    )
    callbacks = [attention, mlp]
    if ckpt is None:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        )
    trainer = cpu_trainer(
        callbacks=callbacks, strategy="ddp", devices=2, max_epochs=2, enable_checkpointing=ckpt is None
    )
    # 48 sequences, 24 per rank: 3 optimizer steps an epoch, the checkpoint after epoch 0 at step 3
    trainer.fit(model, token_dataloader(n=48), ckpt_path=ckpt)
    report = lightning_shrink.report(trainer)
    torch.save(
        {
            "names": [attention.plugin.name, mlp.plugin.name],
            "masks": [attention.masks, mlp.masks],
            "sparsity": [attention.sparsity, mlp.sparsity],
            "updates": [attention.plugin.update_count, mlp.plugin.update_count],
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "rows": [(r.technique, r.metric, r.value, r.target) for r in report.rows],
            "global_step": trainer.global_step,
        },
        out / f"{'resumed' if ckpt else 'two'}-rank{trainer.global_rank}.pt",
    )


def lora(out: Path) -> None:
    trainer, model, _, pruning = compressed_fit("ddp", devices=2, lora=True, gradients=True)
    torch.save(
        {
            "masks": {n: m for p in pruning for n, m in p.masks.items()},
            "sparsity": [p.sparsity for p in pruning],
            "weights": {n: p.detach().clone() for n, p in model.model.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in model.model.named_parameters()},
            "kl": float(trainer.callback_metrics["distillation/kl"]),
        },
        out / f"lora-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for mode in sys.argv[2:]:  # several modes in one launch: process start-up is most of the cost
        if mode == "one":
            one(out_dir)
        elif mode == "lora":
            lora(out_dir)
        else:
            two(out_dir, None)
            two(out_dir, str(out_dir / "ckpt" / "epoch=0.ckpt"))
