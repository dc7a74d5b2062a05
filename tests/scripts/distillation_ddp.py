"""KnowledgeDistillation under DDP devices=2 on CPU (run by tests/test_distillation_ddp.py).

The student is built in ``configure_model`` with a different random seed on each rank, so the learned
projections (created right after ``configure_model``) start different on the two ranks: the plugin must
give both rank 0's values, and the bridge must average their gradients. Each rank writes what it saw.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_shrink import KnowledgeDistillation
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


class BuiltInConfigureModel(TinyTransformerClassifier):
    def configure_model(self) -> None:
        torch.manual_seed(100 + self.global_rank)  # a different random state on each rank
        self.model = self.model or tiny_bert(hidden_size=32, **NO_DROPOUT)


def checksum(tensors) -> float:
    return float(sum(t.detach().double().sum() for t in tensors))


class Report(pl.Callback):
    """Listed before the bridge (which the technique callback appends), so its on_fit_start sees the
    projections as each rank created them."""

    def __init__(self, kd: KnowledgeDistillation, teacher: torch.nn.Module) -> None:
        self.kd, self.teacher = kd, teacher
        self.kl: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        self.modules = sorted(n for n, _ in pl_module.named_modules())
        self.proj_at_creation = checksum(self.kd.plugin.projections.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kl.append(float(trainer.callback_metrics["distillation/kl"]))
        self.mse = float(trainer.callback_metrics["distillation/hidden_mse"])
        if batch_idx == 0:
            groups = trainer.optimizers[0].param_groups
            self.groups = [sorted(id(p) for p in g["params"]) for g in groups]
            self.proj_ids = sorted(id(p) for p in self.kd.plugin.projections.parameters())
            optimized = {i for group in self.groups for i in group}
            self.teacher_in_optimizer = sum(id(p) in optimized for p in self.teacher.parameters())
            self.wrapped = type(trainer.strategy.model).__name__
            self.modules_during = sorted(n for n, _ in pl_module.named_modules())

    def on_train_end(self, trainer, pl_module):
        self.proj = [p.detach().double().sum().item() for p in self.kd.plugin.projections.parameters()]
        self.student = checksum(pl_module.model.parameters())


out = Path(sys.argv[1])
pl.seed_everything(0)
student = BuiltInConfigureModel(model=lambda: None)
teacher = tiny_bert(hidden_size=48, **NO_DROPOUT)
teacher_sum = checksum(teacher.parameters())
kd = KnowledgeDistillation(
    teacher, alpha=0.5, hidden_mse_weight=1.0, layer_map={1: 1, 2: 2}, projection_lr=1e-2
)
report = Report(kd, teacher)
trainer = cpu_trainer(strategy="ddp", devices=2, max_steps=3, callbacks=[kd, report])
trainer.fit(student, token_dataloader(n=64, batch_size=8))
ckpt = out / "last.ckpt"
trainer.save_checkpoint(ckpt)
saved = torch.load(ckpt, weights_only=True) if trainer.global_rank == 0 else None
(out / f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "wrapped": report.wrapped,
            "student_built_in_configure_model": kd.plugin.student_module is student.model,
            "kl": report.kl,
            "mse": report.mse,
            "teacher_in_optimizer": report.teacher_in_optimizer,
            "projections_own_group": report.groups[-1] == report.proj_ids and len(report.groups) == 2,
            "projection_lr": trainer.optimizers[0].param_groups[-1]["lr"],
            "proj_at_creation": report.proj_at_creation,
            "proj": report.proj,
            "student": report.student,
            "modules_unchanged": report.modules == report.modules_during,
            "teacher_changed": checksum(teacher.parameters()) != teacher_sum,
            "teacher_grad": any(p.requires_grad for p in teacher.parameters()),
            "teacher_device": str(next(kd.plugin.teacher.parameters()).device),
            "ckpt_keys": sorted(saved["state_dict"]) if saved else [],
            "ckpt_projections": sorted(saved["lightning_shrink"]["distillation"]["projections"])
            if saved
            else [],
            "plain_keys": sorted(TinyTransformerClassifier(tiny_bert(hidden_size=32)).state_dict()),
            "hooks_left": bool(student.model._forward_hooks or student.model._forward_pre_hooks),
        }
    )
)
