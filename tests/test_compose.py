"""All techniques together on a model built in ``configure_model`` (Lightning's pattern for large
models), in one process and under DDP with two processes; and the guarantee that lightning-shrink
writes nothing into the user's LightningModule but the documented ``training_step`` seam."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_shrink as ls
from lightning_shrink import hookimpl
from lightning_shrink.testing.distributed import run_multiprocess_script
from lightning_shrink.testing.models import (
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)

SCRIPT = Path(__file__).parent / "scripts" / "compose_distributed.py"


class ConfiguredBert(pl.LightningModule):
    """A transformers classifier that exists only after ``configure_model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ConfiguredMLP(pl.LightningModule):
    """An MLP built in ``configure_model``, for differential privacy."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DictSnapshot:
    """Records the LightningModule's instance attributes and submodules in the middle of the fit."""

    def __init__(self) -> None:
        self.attributes: set[str] = set()
        self.modules: set[str] = set()

    @hookimpl
    def shrink_after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        self.attributes = set(pl_module.__dict__)
        self.modules = {name for name, _ in pl_module.named_modules()}


class Baseline(pl.Callback):
    """The same snapshot without lightning-shrink (what Lightning itself sets)."""

    def __init__(self) -> None:
        self.attributes: set[str] = set()
        self.modules: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.attributes = set(pl_module.__dict__)
        self.modules = {name for name, _ in pl_module.named_modules()}


def test_pruning_quantization_and_distillation_together_on_a_model_built_in_configure_model():
    baseline = Baseline()
    cpu_trainer(callbacks=[baseline], max_steps=2).fit(ConfiguredBert(), token_dataloader())

    torch.manual_seed(1)
    teacher = tiny_bert()
    snapshot = DictSnapshot()
    pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
    callbacks = [
        ls.ShrinkCallback(plugins=[snapshot]),
        pruning,
        ls.QuantizationAwareTraining(weight_bits=8, activations="dynamic"),
        ls.KnowledgeDistillation(teacher=teacher, temperature=2.0, alpha=0.5),
    ]
    model = ConfiguredBert()
    trainer = cpu_trainer(callbacks=callbacks, max_steps=4)
    trainer.fit(model, token_dataloader())

    assert pruning.sparsity == pytest.approx(0.5, abs=0.01)
    assert sum(ls.quantization.is_prepared(m) for m in model.modules()) > 0
    assert float(trainer.callback_metrics["distillation/kl"]) > 0
    # The only attribute lightning-shrink adds to the LightningModule is the training_step seam, and it
    # adds no submodule (the teacher and any projection live on the plugins).
    assert snapshot.attributes - baseline.attributes == {"training_step"}
    assert snapshot.modules == baseline.modules
    assert "training_step" not in model.__dict__  # removed at teardown
    converted = ls.convert(model.model)
    assert any(ls.quantization.is_converted(m) for m in converted.modules())


def test_privacy_and_pruning_together_on_a_model_built_in_configure_model():
    pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
    privacy = ls.DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
    model = ConfiguredMLP()
    trainer = cpu_trainer(callbacks=[pruning, privacy], max_steps=4)
    trainer.fit(model, DataLoader(random_classification_data(64), batch_size=8))
    assert trainer.global_step == 4
    assert pruning.sparsity == pytest.approx(0.5, abs=0.01)
    assert privacy.epsilon > 0
    assert privacy.plugin.last_per_sample_norms is not None


@pytest.mark.slow
def test_all_techniques_on_a_model_built_in_configure_model_under_ddp(tmp_path):
    run_multiprocess_script(SCRIPT, tmp_path, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["global_step"] == 4
        assert result["kd_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert result["dp_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert result["prepared"] > 0 and result["kl"] > 0 and result["epsilon"] > 0
    # both ranks hold the same model after every technique acted on it
    for key in ("kd_weights", "dp_weights"):
        for name, value in ranks[0][key].items():
            torch.testing.assert_close(torch.tensor(value), torch.tensor(ranks[1][key][name]))
