"""Pruning across processes: identical masks on DDP ranks; exact global thresholds over FSDP2 shards.

Each test runs a real ``Trainer.fit`` with ``devices=2`` on CPU in a subprocess (Lightning launches
the second rank by re-running the script); every rank writes what it saw to a file.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from lightning_shrink.testing.distributed import run_multiprocess_script

pytestmark = pytest.mark.slow

_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch.utils.data import DataLoader
    from lightning_shrink import GradualMagnitudePruning
    from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)  # different seeds on purpose: masks must still agree
    model = TinyClassifier(optimizer="adamw", lr=0.05)
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
        f"{out}/rank{trainer.global_rank}.pt",
    )
    """
)

_FSDP2_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.utils.data import DataLoader
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_shrink import GradualMagnitudePruning
    from lightning_shrink.pruning.callback import PruningPlugin
    from lightning_shrink.pruning.masks import Comm, compute_masks
    from lightning_shrink.testing.models import ShardedTinyClassifier, cpu_trainer, random_classification_data

    out = sys.argv[1]
    pattern, scope = sys.argv[2], sys.argv[3]

    def full(t, like):
        mesh = like.device_mesh
        return DTensor.from_local(t, mesh, [Shard(0)], shape=like.shape, stride=like.stride()).full_tensor()

    checks = []
    original_update = PruningPlugin._update

    def checked_update(self, trainer, step):
        # Reference: the single-process selection on the gathered (full) weights and masks.
        weights = [p.full_tensor() for p in self.params]
        keeps = [full(k, p) for k, p in zip(self.keeps, self.params)]
        groups = {}
        for i, t in enumerate(self.targets):
            groups.setdefault(t.group, []).append(i)
        expected = list(keeps)
        for idx in groups.values():
            s = self.schedule.sparsity(step, self.targets[idx[0]].final_sparsity)
            new = compute_masks([weights[i] for i in idx], [keeps[i] for i in idx],
                                [self.targets[i].transposed for i in idx], [weights[i].numel() for i in idx],
                                s, self.config.pattern, Comm())
            for i, m in zip(idx, new):
                expected[i] = m
        original_update(self, trainer, step)
        got = [full(k, p) for k, p in zip(self.keeps, self.params)]
        checks.append(all(torch.equal(a, b) for a, b in zip(got, expected)))

    PruningPlugin._update = checked_update
    torch.manual_seed(0)
    model = ShardedTinyClassifier(hidden=36, optimizer="adamw", lr=0.05)
    overrides = {"net.0": 0.5} if scope == "global" else None
    cb = GradualMagnitudePruning(0.75, end_step=6, frequency=2, pattern=pattern, scope=scope,
                                 sparsity_overrides=overrides)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = cpu_trainer(callbacks=[cb], strategy=strategy, devices=2, max_epochs=2)
    trainer.fit(model, DataLoader(random_classification_data(64), batch_size=8))
    plugin = cb.plugin
    local_shapes = [tuple(k.shape) for k in plugin.keeps]
    masks = {t.name: full(k, p) for t, k, p in zip(plugin.targets, plugin.keeps, plugin.params)}
    weights = {t.name: p.full_tensor() for t, p in zip(plugin.targets, plugin.params)}
    torch.save({"checks": checks, "masks": masks, "weights": weights, "local_shapes": local_shapes,
                "sparsity": cb.sparsity, "layer_sparsity": plugin.layer_sparsity},
               f"{out}/rank{trainer.global_rank}.pt")
    """
)


def _run(tmp_path: Path, script: str, *args: str) -> list[dict]:
    path = tmp_path / "script.py"
    path.write_text(script)
    run_multiprocess_script(path, tmp_path, *args, cwd=tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ddp_ranks_compute_identical_masks(tmp_path):
    r0, r1 = _run(tmp_path, _DDP_SCRIPT)
    assert r0["global_step"] == r1["global_step"] == 8
    assert r0["updates"] == r1["updates"] == 4  # steps 0, 2, 4, 6
    assert set(r0["masks"]) == {"net.0.weight", "net.2.weight"}
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name]), name
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    assert r0["sparsity"] == pytest.approx(0.7, abs=1e-3)
    for name, mask in r0["masks"].items():
        assert not r0["weights"][name][~mask].any()


@pytest.mark.parametrize(("pattern", "scope"), [("unstructured", "global"), ("rows", "layer")])
def test_fsdp2_sharded_thresholds_are_exact(tmp_path, pattern, scope):
    r0, r1 = _run(tmp_path, _FSDP2_SCRIPT, pattern, scope)
    # parameters really were sharded (36 rows split 18/18 on dim 0)
    assert r0["local_shapes"][0] == (18, 16) and r1["local_shapes"][0] == (18, 16)
    # every update: the sharded selection equals the single-process one on the gathered weights
    assert len(r0["checks"]) == 4 and all(r0["checks"]) and all(r1["checks"])
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
        assert not r0["weights"][name][~mask].any(), name
    if scope == "global":
        assert r0["layer_sparsity"]["net.0.weight"] == pytest.approx(0.5, abs=1e-3)
        assert r0["layer_sparsity"]["net.2.weight"] == pytest.approx(0.75, abs=1e-3)
    else:
        assert all((m.all(1) | ~m.any(1)).all() for m in r0["masks"].values())
        assert int((~r0["masks"]["net.2.weight"]).all(1).sum()) == 27  # 75% of 36 rows
