"""Run by tests/test_pruning_distributed.py in a subprocess: a real 2-process CPU fit under FSDP2
(``ModelParallelStrategy`` with ``fully_shard``).

``python pruning_fsdp2.py OUT PATTERN SCOPE BUILD``: ``BUILD`` is ``init`` (the layers are built in
``__init__``, sharded in ``configure_model``) or ``configure_model`` (both there). At every mask
update the sharded selection is compared with the single-process selection on the gathered weights.
Each rank writes what it saw to ``OUT/rank<k>.pt``.
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from pruning_models import DeferredShardedClassifier
from torch.distributed.tensor import DTensor, Shard
from torch.utils.data import DataLoader

from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.pruning.distributed import Comm
from lightning_shrink.pruning.masks import compute_masks
from lightning_shrink.pruning.plugin import PruningPlugin
from lightning_shrink.testing.models import ShardedTinyClassifier, cpu_trainer, random_classification_data


def full(t, like):
    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Shard(0)], shape=like.shape, stride=like.stride()).full_tensor()


checks = []
original_update = PruningPlugin._update


def checked_update(self, trainer, step):
    # Reference: the single-process selection on the gathered (full) weights and masks.
    weights = [p.full_tensor() for p in self.params]
    keeps = [full(k, p) for k, p in zip(self.keeps, self.params, strict=True)]
    groups = {}
    for i, t in enumerate(self.targets):
        groups.setdefault(t.group, []).append(i)
    expected = list(keeps)
    for idx in groups.values():
        s = self.schedule.sparsity(step, self.targets[idx[0]].final_sparsity)
        new = compute_masks(
            [weights[i] for i in idx],
            [keeps[i] for i in idx],
            [self.targets[i].transposed for i in idx],
            [weights[i].numel() for i in idx],
            s,
            self.config.pattern,
            Comm(),
        )
        for i, m in zip(idx, new, strict=True):
            expected[i] = m
    original_update(self, trainer, step)
    got = [full(k, p) for k, p in zip(self.keeps, self.params, strict=True)]
    checks.append(all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)))


def fit(out: str, pattern: str, scope: str, build: str, ckpt_path: str | None = None) -> tuple:
    torch.manual_seed(0)
    kind = DeferredShardedClassifier if build == "configure_model" else ShardedTinyClassifier
    model = kind(hidden=36, optimizer="adamw", lr=0.05)
    overrides = {"net.0": 0.5} if scope == "global" else None
    cb = GradualMagnitudePruning(
        0.75, end_step=6, frequency=2, pattern=pattern, scope=scope, sparsity_overrides=overrides
    )
    checkpoint = ModelCheckpoint(dirpath=f"{out}/ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    save = build == "configure_model" and ckpt_path is None
    trainer = cpu_trainer(
        callbacks=[cb, checkpoint] if save else [cb],
        strategy=strategy,
        devices=2,
        max_epochs=2,
        enable_checkpointing=save,
    )
    trainer.fit(model, DataLoader(random_classification_data(64), batch_size=8), ckpt_path=ckpt_path)
    return cb, trainer


def main(out: str, pattern: str, scope: str, build: str) -> None:
    PruningPlugin._update = checked_update
    cb, trainer = fit(out, pattern, scope, build)
    plugin = cb.plugin
    result = {
        "checks": list(checks),
        "masks": {
            t.name: full(k, p) for t, k, p in zip(plugin.targets, plugin.keeps, plugin.params, strict=True)
        },
        "weights": {t.name: p.full_tensor() for t, p in zip(plugin.targets, plugin.params, strict=True)},
        "local_shapes": [tuple(k.shape) for k in plugin.keeps],
        "sparsity": cb.sparsity,
        "layer_sparsity": plugin.layer_sparsity,
    }
    if build == "configure_model":
        # resumed mid-schedule (step 4 of 8; the masks are rebuilt from the restored weights' zeros)
        resumed, _ = fit(out, pattern, scope, build, ckpt_path=f"{out}/ckpt/epoch=0.ckpt")
        result["resumed_updates"] = resumed.plugin.update_count
        result["resumed_weights"] = {
            t.name: p.full_tensor()
            for t, p in zip(resumed.plugin.targets, resumed.plugin.params, strict=True)
        }
        result["updates"] = plugin.update_count
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
