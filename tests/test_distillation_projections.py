"""The learned projections (student width -> teacher width) are the plugin's own tensors: trained in an
optimizer parameter group of their own, saved in the plugin's checkpoint state and restored in place,
never a part of the LightningModule. Real CPU fits with tiny BERTs."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_shrink import KnowledgeDistillation
from lightning_shrink.distillation import Projection
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


def student(hidden: int = 32) -> TinyTransformerClassifier:
    return TinyTransformerClassifier(tiny_bert(hidden_size=hidden, **NO_DROPOUT))


def teacher(hidden: int = 48) -> torch.nn.Module:
    return tiny_bert(hidden_size=hidden, **NO_DROPOUT)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.losses.append(float(outputs["loss"]))


def test_hidden_mse_across_widths_matches_reference_and_gradients_reach_student_and_projections_only():
    pl.seed_everything(0)
    model, big = student(), teacher()
    teacher_before = copy.deepcopy(big.state_dict())
    kd = KnowledgeDistillation(big, alpha=1.0, kl_weight=0.0, hidden_mse_weight=1.0, layer_map={0: 0, 2: 2})

    class Probe(pl.Callback):
        reference: float | None = None
        grads: dict[str, Any] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                return
            proj = kd.plugin.projections
            assert set(proj) == {"layer_0", "layer_2"} and proj["layer_0"].weight.shape == (48, 32)
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                s = pl_module.model(**inputs, output_hidden_states=True).hidden_states
                t = big(**inputs, output_hidden_states=True).hidden_states
                terms = [((proj[f"layer_{i}"](s[i]) - t[i]) ** 2).mean().item() for i in (0, 2)]
            self.reference = sum(terms) / 2

        def on_after_backward(self, trainer, pl_module):
            if self.grads:
                return
            groups = trainer.optimizers[0].param_groups
            self.grads = {
                "student": [p.grad for p in pl_module.parameters()],
                "projections": [p.grad for p in kd.plugin.projections.parameters()],
                "teacher": [p.grad for p in big.parameters()],
                "groups": [{id(p) for p in g["params"]} for g in groups],
            }

    probe, rec = Probe(), Recorder()
    cpu_trainer(max_steps=3, callbacks=[kd, probe, rec]).fit(model, token_dataloader(n=32))

    assert rec.metrics[0]["distillation/hidden_mse"] == pytest.approx(probe.reference, rel=1e-5)
    assert rec.losses[0] == pytest.approx(rec.metrics[0]["distillation/hidden_mse"], rel=1e-6)  # alpha = 1
    g = probe.grads
    student_grads = [x for x in g["student"] if x is not None]
    assert student_grads and sum(float(x.abs().sum()) for x in student_grads) > 0
    assert all(x is not None and x.abs().sum() > 0 for x in g["projections"])
    assert all(x is None for x in g["teacher"])
    # the student's group as configure_optimizers made it, the projections in a group of their own
    assert len(g["groups"]) == 2
    assert g["groups"][0] == {id(p) for p in model.parameters()}
    assert g["groups"][1] == {id(p) for p in kd.plugin.projections.parameters()}
    assert not any(id(p) in group for group in g["groups"] for p in big.parameters())
    for k, v in big.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert all(type(p) is Projection for p in kd.plugin.projections.values())


def test_projections_never_become_part_of_the_lightning_module(tmp_path):
    pl.seed_everything(0)

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.attributes = set(vars(pl_module))
                self.modules = [n for n, _ in pl_module.named_modules()]
                self.keys = list(pl_module.state_dict())

    def fit(callbacks: list[Any]) -> tuple[TinyTransformerClassifier, Snapshot, set[str]]:
        model = student()
        before = set(vars(model))
        snapshot = Snapshot()
        ckpt = ModelCheckpoint(
            dirpath=tmp_path / ("kd" if callbacks else "plain"), every_n_train_steps=2, filename="{step}"
        )
        cpu_trainer(max_steps=2, callbacks=[*callbacks, snapshot, ckpt], enable_checkpointing=True).fit(
            model, token_dataloader(n=16)
        )
        return model, snapshot, before

    kd = KnowledgeDistillation(teacher(), hidden_mse_weight=1.0, layer_map={2: 2})
    model, seen, before = fit([kd])
    plain_model, plain_seen, plain_before = fit([])
    assert kd.plugin.projections is not None and len(kd.plugin.projections) == 1
    # The same modules, tensors and attributes as in a fit without distillation; the one attribute
    # the bridge adds is its loss seam on training_step (removed at the end of fit).
    assert seen.modules == plain_seen.modules and seen.keys == plain_seen.keys
    assert (seen.attributes - before) - (plain_seen.attributes - plain_before) == {"training_step"}
    assert set(vars(model)) - before == set(vars(plain_model)) - plain_before

    # The checkpoint: the student's keys only; the projections in the optimizer's second group and in
    # the plugin's state.
    ckpt = torch.load(tmp_path / "kd" / "step=2.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == plain_seen.keys
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters())), 2]
    saved = ckpt["lightning_shrink"]["distillation"]["projections"]
    assert set(saved) == {"layer_2.weight", "layer_2.bias"}
    for k, v in kd.plugin.projections.named_parameters():
        torch.testing.assert_close(saved[k], v.detach())
    # a plain checkpoint: a Trainer without distillation tests from it, a bare module loads it strictly
    cpu_trainer().test(student(), token_dataloader(n=8), ckpt_path=tmp_path / "kd" / "step=2.ckpt")
    student().load_state_dict(ckpt["state_dict"], strict=True)


def test_projection_lr_and_weight_decay_default_to_the_optimizers():
    def group_of(kd: KnowledgeDistillation) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        class Groups(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                optimizer = trainer.optimizers[0]
                seen.update(defaults=dict(optimizer.defaults), group=dict(optimizer.param_groups[-1]))

        cpu_trainer(max_steps=1, callbacks=[kd, Groups()]).fit(student(), token_dataloader(n=8))
        return seen

    own = group_of(
        KnowledgeDistillation(
            teacher(),
            hidden_mse_weight=1.0,
            layer_map={1: 1},
            projection_lr=0.05,
            projection_weight_decay=0.0,
        )
    )
    assert own["group"]["lr"] == 0.05 and own["group"]["weight_decay"] == 0.0
    default = group_of(KnowledgeDistillation(teacher(), hidden_mse_weight=1.0, layer_map={1: 1}))
    assert default["group"]["lr"] == default["defaults"]["lr"] == 1e-3  # AdamW(lr=1e-3)
    assert default["group"]["weight_decay"] == default["defaults"]["weight_decay"] == 0.01


def test_resume_with_projections_is_bit_exact(tmp_path):
    config = dict(alpha=0.5, hidden_mse_weight=1.0, layer_map={1: 1, 2: 2})
    big = teacher()

    def run(ckpt_path: Any = None) -> tuple[dict[str, torch.Tensor], KnowledgeDistillation]:
        pl.seed_everything(0)
        model = student()
        kd = KnowledgeDistillation(big, **config)
        directory = tmp_path / ("resumed" if ckpt_path else "straight")
        every_2 = ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        trainer = cpu_trainer(max_steps=4, max_epochs=-1, callbacks=[kd, every_2], enable_checkpointing=True)
        # One batch per epoch: Lightning restarts a plain DataLoader when it resumes, so the data of
        # each step is the same in the straight and the resumed run.
        trainer.fit(model, token_dataloader(n=8), ckpt_path=ckpt_path)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, kd

    straight, kd_straight = run()
    resumed, kd_resumed = run(ckpt_path=tmp_path / "straight" / "step=2.ckpt")
    assert set(resumed) == set(straight)
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k
    projections = dict(kd_straight.plugin.projections.named_parameters())
    for k, v in kd_resumed.plugin.projections.named_parameters():
        assert torch.equal(v, projections[k]), k
    # the projections really changed after the checkpoint
    saved = torch.load(tmp_path / "straight" / "step=2.ckpt", weights_only=False)["lightning_shrink"]
    assert not torch.equal(
        saved["distillation"]["projections"]["layer_1.weight"], projections["layer_1.weight"]
    )


def test_a_second_fit_continues_with_the_learned_projections():
    pl.seed_everything(0)
    model = student()
    kd = KnowledgeDistillation(teacher(), hidden_mse_weight=1.0, layer_map={2: 2})
    cpu_trainer(max_steps=1, callbacks=[kd]).fit(model, token_dataloader(n=8))
    first = kd.plugin.projections
    before = {k: v.detach().clone() for k, v in first.named_parameters()}
    cpu_trainer(max_steps=1, callbacks=[kd]).fit(model, token_dataloader(n=8))
    assert kd.plugin.projections is first
    assert any(not torch.equal(before[k], v) for k, v in first.named_parameters())
    # other widths (another student): new projections
    cpu_trainer(max_steps=1, callbacks=[kd]).fit(student(hidden=16), token_dataloader(n=8))
    assert kd.plugin.projections is not first and kd.plugin.projections["layer_2"].weight.shape == (48, 16)
