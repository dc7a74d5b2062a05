"""KnowledgeDistillation under real DDP (``devices=2`` on CPU, gloo), run in a subprocess: a student
built in ``configure_model``, learned projections that start different on the two ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_shrink.testing.distributed import run_multiprocess_script

SCRIPT = Path(__file__).parent / "scripts" / "distillation_ddp.py"


@pytest.mark.slow
def test_distillation_under_ddp_two_ranks(tmp_path: Path):
    run_multiprocess_script(SCRIPT, tmp_path, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel" and r["global_step"] == 3
        assert r["student_built_in_configure_model"] and not r["hooks_left"]
        assert len(r["kl"]) == 3 and all(v > 0 for v in r["kl"]) and r["mse"] > 0
        assert r["teacher_in_optimizer"] == 0 and r["projections_own_group"] and r["projection_lr"] == 1e-2
        assert not r["teacher_changed"] and not r["teacher_grad"] and r["teacher_device"] == "cpu"
        assert r["modules_unchanged"]
    # each rank distils its own shard of the data...
    assert ranks[0]["kl"] != ranks[1]["kl"]
    # ...the projections were created differently on each rank (each rank's own random state)...
    assert ranks[0]["proj_at_creation"] != ranks[1]["proj_at_creation"]
    # ...and after the steps the student (DDP) and the projections (rank 0's values at fit start,
    # gradients averaged by the bridge) are identical on both ranks
    assert ranks[0]["student"] == ranks[1]["student"]
    assert ranks[0]["proj"] == ranks[1]["proj"]
    # the checkpoint holds the student only; the projections travel in the plugin's state
    assert ranks[0]["ckpt_keys"] == ranks[0]["plain_keys"]
    assert ranks[0]["ckpt_projections"] == [
        "layer_1.bias",
        "layer_1.weight",
        "layer_2.bias",
        "layer_2.weight",
    ]
