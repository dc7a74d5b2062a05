"""KnowledgeDistillation's checkpoint state, resume check and report rows; a student built in
``configure_model``; several instances (two teachers) in one Trainer. Real CPU fits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_shrink import KnowledgeDistillation, report
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
BASE = dict(temperature=2.0, alpha=0.5, hidden_mse_weight=1.0, layer_map={"net.2": "net.2"})


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.losses.append(float(outputs["loss"]))


def loader() -> DataLoader:
    return DataLoader(random_classification_data(n=16), batch_size=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Any, TinyClassifier]:
    """A 2-step distillation run's checkpoint (MLP student 32 wide, teacher 48: one projection)."""
    pl.seed_everything(0)
    teacher = TinyClassifier(hidden=48)
    trainer = cpu_trainer(max_steps=2, callbacks=[KnowledgeDistillation(teacher, **BASE)])
    trainer.fit(TinyClassifier(), loader())
    path = tmp_path_factory.mktemp("distillation") / "step2.ckpt"
    trainer.save_checkpoint(path)
    return path, teacher


def resume(path: Any, kd: KnowledgeDistillation, steps: int = 3) -> Recorder:
    rec = Recorder()
    trainer = cpu_trainer(max_steps=steps, max_epochs=-1, callbacks=[kd, rec])
    trainer.fit(TinyClassifier(), loader(), ckpt_path=path)
    return rec


def test_the_checkpoint_describes_the_run(checkpoint):
    path, teacher = checkpoint
    entry = torch.load(path, weights_only=True)["lightning_shrink"]["distillation"]
    assert entry["version"] == 2 and entry["step"] == 2
    run = entry["run"]
    assert run["temperature"] == 2.0 and run["alpha"] == 0.5 and run["layer_map"] == [["net.2", "net.2"]]
    assert run["student"] == "" and run["teacher_dtype"] is None
    assert run["teacher"]["class"].endswith("TinyClassifier")
    assert run["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert len(run["teacher"]["fingerprint"]) == len(list(teacher.parameters()))
    assert set(entry["projections"]) == {"layer_net__2.weight", "layer_net__2.bias"}


def test_resume_with_the_same_configuration_restores_and_continues(checkpoint):
    path, teacher = checkpoint
    kd = KnowledgeDistillation(teacher, **BASE)
    rec = resume(path, kd)
    assert rec.batches == 1 and rec.metrics[0]["distillation/hidden_mse"] > 0
    # an alpha schedule that has the checkpoint's value at its step is the same run
    resume(path, KnowledgeDistillation(teacher, **{**BASE, "alpha": lambda step: 0.5 if step >= 2 else 0.1}))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(temperature=3.0), "`temperature` 2.0 -> 3.0"),
        (dict(alpha=0.7), "`alpha` at the checkpoint's step 0.5 -> 0.7"),
        (dict(alpha=lambda step: 0.1), "`alpha` at the checkpoint's step 0.5 -> 0.1"),
        (dict(kl_weight=0.5), "`kl_weight` 1.0 -> 0.5"),
        (dict(layer_map={"net.0": "net.0"}), "`layer_map` {'net.2': 'net.2'} -> {'net.0': 'net.0'}"),
        (dict(teacher_dtype=torch.float64), "`teacher_dtype` None -> 'torch.float64'"),
        (dict(projection_lr=0.01), "`projection_lr` None -> 0.01"),
        (dict(student="net"), "the student (attribute path in the LightningModule) '' -> 'net'"),
    ],
)
def test_resume_with_a_changed_configuration_is_refused_naming_the_change(checkpoint, change, named):
    path, teacher = checkpoint
    if "teacher_dtype" in change:
        teacher = TinyClassifier(hidden=48)
        teacher.load_state_dict(checkpoint[1].state_dict())
    if "student" in change:  # the MLP `net` as the student (and the teacher's), layer names relative to it
        change = {**change, "layer_map": {"2": "2"}}
    rec = Recorder()
    kd = KnowledgeDistillation(teacher, **{**BASE, **change})
    with pytest.raises(ValueError, match="cannot resume") as info:
        cpu_trainer(max_steps=3, callbacks=[kd, rec]).fit(TinyClassifier(), loader(), ckpt_path=path)
    assert named in str(info.value) and str(info.value).startswith("KnowledgeDistillation (distillation)")
    assert rec.batches == 0


def test_resume_with_another_teacher_is_refused(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"the teacher's weights \(6 of 6 parameter tensors differ\)"):
        resume(path, KnowledgeDistillation(TinyClassifier(hidden=48), **BASE))

    class OtherTeacher(TinyClassifier):
        pass

    same_weights = OtherTeacher(hidden=48)
    same_weights.load_state_dict(checkpoint[1].state_dict())
    with pytest.raises(
        ValueError, match=r"the teacher's class '[\w.]+\.TinyClassifier' -> '[\w.<>]+OtherTeacher'"
    ):
        resume(path, KnowledgeDistillation(same_weights, **BASE))
    other = TinyClassifier(hidden=64)
    counts = [sum(p.numel() for p in t.parameters()) for t in (checkpoint[1], other)]
    with pytest.raises(ValueError, match=rf"the teacher's parameter count {counts[0]} -> {counts[1]}"):
        resume(path, KnowledgeDistillation(other, **BASE))


def test_resume_from_a_checkpoint_without_distillation_state(tmp_path, checkpoint):
    path, teacher = checkpoint
    # written by an older version (no description of the run): resumed, with a warning
    old = torch.load(path, weights_only=True)
    entry = old["lightning_shrink"]["distillation"]
    old["lightning_shrink"]["distillation"] = {"version": 1, "projections": entry["projections"]}
    torch.save(old, tmp_path / "v1.ckpt")
    with pytest.warns(UserWarning, match="older version that did not record"):
        resume(tmp_path / "v1.ckpt", KnowledgeDistillation(teacher, **BASE))
    # written without distillation: KL-only distillation starts with the resumed run...
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(TinyClassifier(), loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert resume(tmp_path / "plain.ckpt", KnowledgeDistillation(teacher)).metrics[0]["distillation/kl"] > 0
    # ...but learned projections cannot join the checkpoint's optimizer state
    with pytest.raises(
        ValueError, match=r"learns projections for \['layer_net__2'\], but the checkpoint holds none"
    ):
        resume(tmp_path / "plain.ckpt", KnowledgeDistillation(teacher, **BASE))


def test_report_rows_name_the_terms_their_last_values_and_the_teacher():
    pl.seed_everything(0)
    teacher = TinyClassifier(hidden=48)
    kd = KnowledgeDistillation(
        teacher, temperature=3.0, alpha=0.25, **{k: BASE[k] for k in ("hidden_mse_weight", "layer_map")}
    )
    rec = Recorder()
    trainer = cpu_trainer(max_steps=2, callbacks=[kd, rec])
    trainer.fit(TinyClassifier(), loader())
    rows = {r.metric: r for r in report(trainer).select(technique="distillation")}
    assert rows["temperature"].value == 3.0 and rows["alpha"].value == 0.25
    assert rows["terms"].value == "kl, hidden_mse"
    for term in ("kl", "hidden_mse"):
        assert (
            rows[term].value == pytest.approx(rec.metrics[-1][f"distillation/{term}"])
            and rows[term].value > 0
        )
    assert rows["teacher"].value == "TinyClassifier"
    assert rows["teacher parameters"].value == sum(p.numel() for p in teacher.parameters())
    assert rows["teacher dtype"].value == "torch.float32"
    assert rows["projection parameters"].value == 48 * 32 + 48
    assert rows["layer_map"].value == "{'net.2': 'net.2'}"


class BuiltInConfigureModel(TinyTransformerClassifier):
    """The transformers model is created in configure_model, as Lightning recommends for large models."""

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_bert(hidden_size=32, **NO_DROPOUT)


def test_a_student_built_in_configure_model_is_distilled():
    pl.seed_everything(0)
    student = BuiltInConfigureModel(model=lambda: None)
    kd = KnowledgeDistillation(
        tiny_bert(hidden_size=48, **NO_DROPOUT), hidden_mse_weight=1.0, layer_map={2: 2}
    )
    rec = Recorder()
    cpu_trainer(max_steps=2, callbacks=[kd, rec]).fit(student, token_dataloader(n=16))
    assert kd.plugin.student_module is student.model
    assert all(m["distillation/kl"] > 0 and m["distillation/hidden_mse"] > 0 for m in rec.metrics)
    assert kd.plugin.projections["layer_2"].weight.shape == (48, 32)
    assert not student.model._forward_hooks and not student.model._forward_pre_hooks


def two_teachers(temperature_2: float = 2.0) -> list[KnowledgeDistillation]:
    return [
        KnowledgeDistillation(TEACHERS[0], alpha=0.3, hidden_mse_weight=1.0, layer_map={2: 2}),
        KnowledgeDistillation(
            TEACHERS[1], temperature=temperature_2, alpha=0.3, hidden_cosine_weight=1.0, layer_map={1: 2}
        ),
    ]


torch.manual_seed(0)
TEACHERS = [tiny_bert(hidden_size=48, **NO_DROPOUT), tiny_bert(hidden_size=64, **NO_DROPOUT)]


def test_two_teachers_have_their_own_terms_state_rows_and_resume(tmp_path):
    pl.seed_everything(0)
    student = TinyTransformerClassifier(tiny_bert(hidden_size=32, **NO_DROPOUT))
    kd1, kd2 = two_teachers()
    rec = Recorder()
    trainer = cpu_trainer(max_steps=2, callbacks=[kd1, kd2, rec])
    trainer.fit(student, token_dataloader(n=16))
    assert (kd1.plugin.name, kd2.plugin.name) == ("distillation", "distillation-2")
    m = rec.metrics[0]
    assert m["distillation/hidden_mse"] > 0 and m["distillation-2/hidden_cosine"] > 0
    assert m["distillation/kl"] > 0 and m["distillation-2/kl"] > 0
    assert (
        rec.metrics[-1]["distillation/alpha"] == rec.metrics[-1]["distillation-2/alpha"] == pytest.approx(0.3)
    )
    # the task loss is weighted by the product (1 - 0.3) * (1 - 0.3)
    terms = sum(v for k, v in m.items() if k.startswith("distillation"))
    assert rec.losses[0] == pytest.approx(0.49 * m["shrink/task_loss"] + terms, rel=1e-5)
    assert kd2.plugin.projections["layer_1"].weight.shape == (64, 32)
    rows = report(trainer)
    assert rows.select("distillation", "hidden_mse") and rows.select("distillation-2", "hidden_cosine")
    assert rows.select("distillation-2", "teacher parameters")[0].value == sum(
        p.numel() for p in TEACHERS[1].parameters()
    )

    trainer.save_checkpoint(tmp_path / "two.ckpt")
    state = torch.load(tmp_path / "two.ckpt", weights_only=True)["lightning_shrink"]
    assert set(state["distillation"]["projections"]) == {"layer_2.weight", "layer_2.bias"}
    assert set(state["distillation-2"]["projections"]) == {"layer_1.weight", "layer_1.bias"}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.seen = [
                {k: v.detach().clone() for k, v in kd.plugin.projections.named_parameters()} for kd in resumed
            ]

    resumed, at_start = two_teachers(), AtStart()
    cpu_trainer(max_steps=3, max_epochs=-1, callbacks=[*resumed, at_start]).fit(
        TinyTransformerClassifier(tiny_bert(hidden_size=32, **NO_DROPOUT)),
        token_dataloader(n=16),
        ckpt_path=tmp_path / "two.ckpt",
    )
    for seen, name in zip(at_start.seen, ("distillation", "distillation-2"), strict=True):
        for k, v in state[name]["projections"].items():
            assert torch.equal(seen[k], v), (name, k)
    # a change in the second instance is refused naming it
    with pytest.raises(
        ValueError, match=r"KnowledgeDistillation \(distillation-2\): cannot resume.*`temperature` 2.0 -> 4.0"
    ):
        cpu_trainer(max_steps=3, max_epochs=-1, callbacks=two_teachers(temperature_2=4.0)).fit(
            TinyTransformerClassifier(tiny_bert(hidden_size=32, **NO_DROPOUT)),
            token_dataloader(n=16),
            ckpt_path=tmp_path / "two.ckpt",
        )


def test_two_instances_sharing_a_teacher_in_different_dtypes_are_refused_naming_both():
    teacher = TinyClassifier(hidden=48)
    callbacks = [KnowledgeDistillation(teacher), KnowledgeDistillation(teacher, teacher_dtype=torch.float64)]
    with pytest.raises(
        ValueError, match=r"plugins 'distillation' and 'distillation-2' share one teacher module"
    ):
        cpu_trainer(max_steps=1, callbacks=callbacks).fit(TinyClassifier(), loader())
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}  # refused before any conversion
    # one teacher for two instances in one dtype: two views of the same teacher (here two temperatures)
    rec = Recorder()
    callbacks = [
        KnowledgeDistillation(teacher, temperature=1.0),
        KnowledgeDistillation(teacher, temperature=4.0),
    ]
    cpu_trainer(max_steps=1, callbacks=[*callbacks, rec]).fit(TinyClassifier(), loader())
    assert rec.metrics[0]["distillation/kl"] != rec.metrics[0]["distillation-2/kl"]
