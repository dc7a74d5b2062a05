"""Run by tests/test_pruning_criteria.py in a subprocess: real 2-process CPU fits under DDP with the
learned criteria.

``python pruning_criteria_ddp.py OUT [movement] [taylor] [structured]``: ``movement`` and
``taylor`` on a classifier built in ``configure_model``, with a different seed and different data on
each rank and gradients accumulated over two micro-batches. Every rank records, at each
``on_after_backward``, whether the micro-batch was the last of its optimizer step and the pruned
weights' gradients, and at fit end its masks, the criterion's state and the weights. Each rank writes
``OUT/<criterion>-rank<k>.pt``. ``structured`` runs the fit of pruning_structured_ddp.py
(``OUT/structured-rank<k>.pt``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from pruning_models import DeferredClassifier
from torch.utils.data import DataLoader

from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.testing.models import cpu_trainer, random_classification_data


class GradRecorder(pl.Callback):
    def __init__(self) -> None:
        self.grads: list[tuple[bool, torch.Tensor]] = []
        self.batch_idx = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx

    def on_after_backward(self, trainer, pl_module) -> None:
        last = self.batch_idx % 2 == 1
        self.grads.append((last, pl_module.net[0].weight.grad.detach().clone()))


def run(out: Path, criterion: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)  # different seeds and data on purpose: masks must still agree
    model = DeferredClassifier(optimizer="adamw", lr=0.05)
    cb = GradualMagnitudePruning(0.7, start_step=1, end_step=6, frequency=2, criterion=criterion)
    recorder = GradRecorder()
    trainer = cpu_trainer(
        callbacks=[cb, recorder], strategy="ddp", devices=2, max_epochs=4, accumulate_grad_batches=2
    )
    data = random_classification_data(64, seed=rank)
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    torch.save(
        {
            "masks": cb.masks,
            "criterion": cb.plugin.criterion.state_dict(),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "sparsity": cb.sparsity,
            "updates": cb.plugin.update_count,
            "global_step": trainer.global_step,
            "grads": recorder.grads,
        },
        out / f"{criterion}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for name in sys.argv[2:]:
        if name == "structured":  # one launch for both tests' fits: process start-up is most of the cost
            from pruning_structured_ddp import main

            main(out_dir)
        else:
            run(out_dir, name)
