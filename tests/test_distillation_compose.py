"""KnowledgeDistillation together with GradualMagnitudePruning and QuantizationAwareTraining in one
fit: every technique acts, none touches the others' parts (the teacher, the projections, which are
the distillation plugin's own tensors and not part of the LightningModule)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_shrink.distillation import KnowledgeDistillation, Projection
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

GradualMagnitudePruning = pytest.importorskip("lightning_shrink.pruning").GradualMagnitudePruning
QuantizationAwareTraining = pytest.importorskip("lightning_shrink.quantization").QuantizationAwareTraining


class Seen(pl.Callback):
    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.kl: list[float] = []
        self.mse: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kl.append(float(trainer.callback_metrics["distillation/kl"]))
        self.mse.append(float(trainer.callback_metrics["distillation/hidden_mse"]))
        self.projection_types = {type(m) for m in self.kd.plugin.projections.children()}
        self.linear_types = {type(m).__name__ for m in pl_module.model.modules() if isinstance(m, nn.Linear)}
        projections = {id(p) for p in self.kd.plugin.projections.parameters()}
        self.projections_in_module = any(id(p) in projections for p in pl_module.parameters())


@pytest.mark.parametrize("order", ["distillation first", "distillation last"])
def test_distillation_with_pruning_and_qat(order):
    pl.seed_everything(0)
    student = TinyTransformerClassifier(tiny_bert(hidden_size=32))
    teacher = tiny_bert(hidden_size=48)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = KnowledgeDistillation(teacher, alpha=0.5, hidden_mse_weight=1.0, layer_map={2: 2})
    pruning = GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
    qat = QuantizationAwareTraining()
    techniques = [kd, pruning, qat] if order == "distillation first" else [qat, pruning, kd]
    seen = Seen(kd)
    cpu_trainer(max_steps=4, callbacks=[*techniques, seen]).fit(student, token_dataloader(n=32))

    # distillation ran every step, with a learned projection that neither pruning nor QAT touched
    assert len(seen.kl) == 4 and all(v > 0 for v in seen.kl) and all(v > 0 for v in seen.mse)
    assert seen.projection_types == {Projection} and not seen.projections_in_module
    assert "FakeQuantLinear" in seen.linear_types  # QAT prepared the student's layers
    names = [t.name for t in pruning.plugin.targets]
    assert names
    assert all(n.startswith("model.") for n in names)
    projection = kd.plugin.projections["layer_2"]
    assert float((projection.weight == 0).float().mean()) == 0.0
    # pruning reached its target on the student's selected weights
    params = dict(student.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    assert zeros / total == pytest.approx(0.5, abs=0.02)
    # the teacher is neither pruned, nor quantized, nor trained
    assert all(type(m) is nn.Linear for m in teacher.modules() if isinstance(m, nn.Linear))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
