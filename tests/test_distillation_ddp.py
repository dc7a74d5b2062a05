"""KnowledgeDistillation under real DDP (``devices=2`` on CPU, gloo), run in a subprocess."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lightning_shrink.testing.distributed import run_multiprocess_script

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch

    from lightning_shrink import KnowledgeDistillation
    from lightning_shrink.testing.models import TinyTransformerClassifier, cpu_trainer, tiny_bert
    from lightning_shrink.testing.models import token_dataloader

    out = Path(sys.argv[1])
    pl.seed_everything(0)
    nd = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    student = TinyTransformerClassifier(tiny_bert(hidden_size=32, **nd))
    teacher = tiny_bert(hidden_size=48, **nd)
    teacher_sum = float(sum(p.double().sum() for p in teacher.parameters()))
    kd = KnowledgeDistillation(teacher, alpha=0.5, hidden_mse_weight=1.0, layer_map={1: 1, 2: 2})


    class Report(pl.Callback):
        def __init__(self):
            self.kl = []

        def on_fit_start(self, trainer, pl_module):
            optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.teacher_in_optimizer = sum(id(p) in optimized for p in teacher.parameters())
            projections = pl_module.distill_projections.parameters()
            self.proj_in_optimizer = all(id(p) in optimized for p in projections)
            self.wrapped = type(trainer.strategy.model).__name__

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.kl.append(float(trainer.callback_metrics["distillation/kl"]))
            self.mse = float(trainer.callback_metrics["distillation/hidden_mse"])

        def on_train_end(self, trainer, pl_module):
            self.proj = [p.detach().double().sum().item() for p in pl_module.distill_projections.parameters()]
            self.student = float(sum(p.detach().double().sum() for p in pl_module.model.parameters()))


    report = Report()
    trainer = cpu_trainer(strategy="ddp", devices=2, max_steps=3, callbacks=[kd, report])
    trainer.fit(student, token_dataloader(n=64, batch_size=8))
    ckpt = out / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    keys = sorted(torch.load(ckpt, weights_only=False)["state_dict"]) if trainer.global_rank == 0 else []
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "world_size": trainer.world_size,
        "wrapped": report.wrapped,
        "kl": report.kl,
        "mse": report.mse,
        "teacher_in_optimizer": report.teacher_in_optimizer,
        "proj_in_optimizer": report.proj_in_optimizer,
        "proj": report.proj,
        "student": report.student,
        "teacher_changed": float(sum(p.double().sum() for p in teacher.parameters())) != teacher_sum,
        "teacher_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_device": str(next(kd.plugin.teacher.parameters()).device),
        "ckpt_keys": keys,
        "plain_keys": sorted(TinyTransformerClassifier(tiny_bert(hidden_size=32)).state_dict()),
        "has_projections_after_fit": hasattr(student, "distill_projections"),
    }))
    """
)


@pytest.mark.slow
def test_distillation_under_ddp_two_ranks(tmp_path: Path):
    script = tmp_path / "ddp_distill.py"
    script.write_text(SCRIPT)
    run_multiprocess_script(script, tmp_path, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel"
        assert len(r["kl"]) == 3 and all(v > 0 for v in r["kl"]) and r["mse"] > 0
        assert r["teacher_in_optimizer"] == 0 and r["proj_in_optimizer"]
        assert not r["teacher_changed"] and not r["teacher_grad"] and r["teacher_device"] == "cpu"
        assert not r["has_projections_after_fit"]
    # each rank distils its own shard of the data...
    assert ranks[0]["kl"] != ranks[1]["kl"]
    # ...and DDP keeps the student and the projections identical on both ranks
    assert ranks[0]["student"] == pytest.approx(ranks[1]["student"], rel=1e-9)
    assert ranks[0]["proj"] == pytest.approx(ranks[1]["proj"], rel=1e-9)
    # the checkpoint holds the student only
    assert ranks[0]["ckpt_keys"] == ranks[0]["plain_keys"]
