"""Run by tests/test_distributed.py in a subprocess: a real 2-process CPU fit under DDP or FSDP2.

Each rank writes what it saw to ``<out>/rank<k>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shrink import ShrinkCallback, hookimpl

C, LR = 0.05, 0.1


class ZeroInputModel(pl.LightningModule):
    """Bias-free linear classifier fed zeros: the task loss has zero gradient, so every weight
    change comes from the plugin's loss term."""

    def __init__(self, fsdp: bool) -> None:
        super().__init__()
        self.fsdp = fsdp
        self.layer = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10)
            self.head.weight.copy_(torch.eye(3))

    def configure_model(self) -> None:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.head(self.layer(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class RankDependentTerm:
    """Adds ``c_rank * sum(logits_of_ones ** 2)`` with ``c_rank = C * (rank + 1)``: the gradients
    agree across ranks only if the term went through the strategy's gradient synchronization."""

    def __init__(self) -> None:
        self.after_steps = 0
        self.before_steps = 0
        self.calls: list[str] = []

    @hookimpl
    def shrink_setup(self, stage):
        self.calls.append(f"setup:{stage}")

    @hookimpl
    def shrink_fit_start(self):
        self.calls.append("fit_start")

    @hookimpl
    def shrink_training_loss(self, trainer, pl_module, loss):
        c = C * (trainer.global_rank + 1)
        ones = torch.ones(1, 4, device=loss.device)
        return {"rank/term": c * (pl_module(ones) ** 2).sum()}

    @hookimpl
    def shrink_before_optimizer_step(self):
        self.before_steps += 1

    @hookimpl
    def shrink_after_optimizer_step(self):
        self.after_steps += 1

    @hookimpl
    def shrink_fit_end(self):
        self.calls.append("fit_end")


def main(strategy_name: str, out: str) -> None:
    fsdp = strategy_name == "fsdp2"
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    pl.seed_everything(0)
    model = ZeroInputModel(fsdp)
    data = TensorDataset(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
    plugin = RankDependentTerm()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ShrinkCallback(plugins=[plugin], autoload=False)],
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    weights = {}
    for name, p in model.named_parameters():
        weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "after_steps": plugin.after_steps,
        "before_steps": plugin.before_steps,
        "calls": plugin.calls,
        "weights": weights,
        "logged": sorted(trainer.callback_metrics),
    }
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
