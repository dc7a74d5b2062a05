"""KnowledgeDistillation in real CPU fits: loss terms against hand-computed references, where the
gradients go, checkpoints and optimizer, layer mapping across widths, the logit cache under
shuffling, transformers students (BERT, GPT-2), teachers from paths, and the errors."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_shrink import KnowledgeDistillation
from lightning_shrink.distillation import PROJECTIONS_ATTRIBUTE
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    tiny_gpt2,
    token_dataloader,
)

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


class Recorder(pl.Callback):
    """Records, per training batch, the logged metrics and the loss the step returned."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.batches: list[Any] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.losses.append(float(outputs["loss"]))
        self.batches.append(batch)


def hand_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist(), strict=True):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    return t * t * total / len(student_logits)


# ---------------------------------------------------------------------------------------------
# Loss terms in a fit
# ---------------------------------------------------------------------------------------------


def test_kl_term_matches_hand_computed_reference_and_alpha_schedule_weights_the_loss():
    pl.seed_everything(0)
    student, teacher = TinyClassifier(), TinyClassifier(hidden=48)
    loader = DataLoader(random_classification_data(n=24), batch_size=8)
    first_x, _ = next(iter(loader))
    with torch.no_grad():
        expected = hand_kl(copy.deepcopy(student)(first_x), teacher(first_x), 3.0)
    alphas = [0.25, 0.75, 1.0]
    kd = KnowledgeDistillation(teacher, temperature=3.0, alpha=lambda step: alphas[min(step, 2)])
    rec = Recorder()
    cpu_trainer(max_steps=3, callbacks=[kd, rec]).fit(student, loader)

    assert rec.metrics[0]["distillation/kl"] == pytest.approx(0.25 * expected, rel=1e-5)
    for step, alpha in enumerate(alphas):
        m = rec.metrics[step]
        # final loss = (1 - alpha) * task loss + alpha * KL (the logged term already carries alpha)
        assert rec.losses[step] == pytest.approx((1 - alpha) * m["shrink/task_loss"] + m["distillation/kl"])
        assert m["distillation/kl"] > 0
    # the teacher is frozen, in eval mode, untouched by training
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_hidden_mse_across_widths_matches_reference_and_gradients_reach_student_and_projections_only():
    pl.seed_everything(0)
    student = TinyTransformerClassifier(tiny_bert(hidden_size=32, **NO_DROPOUT))
    teacher = tiny_bert(hidden_size=48, **NO_DROPOUT)
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(
        teacher, alpha=1.0, kl_weight=0.0, hidden_mse_weight=1.0, layer_map={0: 0, 2: 2}
    )

    class Probe(pl.Callback):
        reference: float | None = None
        grads: dict[str, Any] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                return
            proj = pl_module.distill_projections
            assert set(proj) == {"layer_0", "layer_2"}
            assert proj["layer_0"].weight.shape == (48, 32)
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                s = pl_module.model(**inputs, output_hidden_states=True).hidden_states
                t = teacher(**inputs, output_hidden_states=True).hidden_states
                terms = [((proj[f"layer_{i}"](s[i]) - t[i]) ** 2).mean().item() for i in (0, 2)]
            self.reference = sum(terms) / 2

        def on_after_backward(self, trainer, pl_module):
            if self.grads:
                return
            self.grads = {
                "student": [p.grad for p in pl_module.model.parameters()],
                "projections": [p.grad for p in pl_module.distill_projections.parameters()],
                "teacher": [p.grad for p in teacher.parameters()],
            }
            optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.grads["proj_in_optimizer"] = all(
                id(p) in optimized for p in pl_module.distill_projections.parameters()
            )
            self.grads["teacher_in_optimizer"] = any(id(p) in optimized for p in teacher.parameters())

    probe, rec = Probe(), Recorder()
    cpu_trainer(max_steps=3, callbacks=[kd, probe, rec]).fit(student, token_dataloader(n=32))

    assert rec.metrics[0]["distillation/hidden_mse"] == pytest.approx(probe.reference, rel=1e-5)
    assert rec.losses[0] == pytest.approx(rec.metrics[0]["distillation/hidden_mse"], rel=1e-6)  # alpha = 1
    g = probe.grads
    encoder_grads = [x for x in g["student"] if x is not None]
    assert encoder_grads and sum(float(x.abs().sum()) for x in encoder_grads) > 0
    assert all(x is not None and x.abs().sum() > 0 for x in g["projections"])
    assert all(x is None for x in g["teacher"])
    assert g["proj_in_optimizer"] and not g["teacher_in_optimizer"]
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    # finalized: a plain model again (no projections, no hooks), the projections kept on the plugin
    assert not hasattr(student, PROJECTIONS_ATTRIBUTE)
    assert not student.model._forward_hooks and not student.model._forward_pre_hooks
    assert kd.plugin.projections is not None


def test_teacher_absent_from_checkpoint_and_optimizer_projections_resume(tmp_path):
    pl.seed_everything(0)

    def make_student():
        return TinyTransformerClassifier(tiny_bert(hidden_size=32, **NO_DROPOUT))

    # A LightningModule teacher: distillation calls its inner transformers model.
    teacher = TinyTransformerClassifier(tiny_bert(hidden_size=48, **NO_DROPOUT))
    config = dict(alpha=0.5, hidden_mse_weight=1.0, layer_map={2: 2})
    student = make_student()
    plain_keys = set(make_student().state_dict())
    n_student_params = len(list(student.parameters()))
    kd = KnowledgeDistillation(teacher, **config)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = cpu_trainer(max_steps=2, callbacks=[kd, ckpt_cb], enable_checkpointing=True)
    trainer.fit(student, token_dataloader(n=32))
    assert kd.plugin.teacher_target is teacher.model

    ckpt_path = tmp_path / "step=2.ckpt"  # written during fit, with the projections registered
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert set(ckpt["state_dict"]) == plain_keys  # neither teacher nor projections
    params = ckpt["optimizer_states"][0]["param_groups"][0]["params"]
    assert len(params) == n_student_params + 2  # the student's and one projection's weight and bias
    saved = ckpt["lightning_shrink"]["distillation"]["projections"]
    assert set(saved) == {"layer_2.weight", "layer_2.bias"}
    trained = {k: v.detach().clone() for k, v in kd.plugin.projections.state_dict(keep_vars=True).items()}
    assert trained == {}  # the projections' own state_dict is empty by design...
    for k, v in saved.items():  # ...their weights travel in the plugin state
        torch.testing.assert_close(v, dict(kd.plugin.projections.named_parameters())[k].detach())

    # Resume into a fresh student and a fresh callback: projections are re-created in setup and
    # restored before the weights load; the student's weights load strictly.
    class AtStart(pl.Callback):
        seen: dict[str, torch.Tensor] = {}

        def on_train_start(self, trainer, pl_module):
            self.seen = {k: v.detach().clone() for k, v in pl_module.distill_projections.named_parameters()}
            self.student = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    at_start = AtStart()
    student2 = make_student()
    kd2 = KnowledgeDistillation(teacher, **config)
    cpu_trainer(max_steps=3, callbacks=[kd2, at_start]).fit(
        student2, token_dataloader(n=32), ckpt_path=ckpt_path
    )
    for k, v in saved.items():
        torch.testing.assert_close(at_start.seen[k], v)
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(at_start.student[k], v)
    assert not hasattr(student2, PROJECTIONS_ATTRIBUTE)

    # The student's checkpoint is a plain one: a Trainer without distillation tests from it, and
    # a bare module loads it strictly.
    cpu_trainer().test(make_student(), token_dataloader(n=16), ckpt_path=ckpt_path)
    make_student().load_state_dict(ckpt["state_dict"], strict=True)

    # A second fit with the same callback continues with the learned projections.
    before = {k: v.detach().clone() for k, v in kd.plugin.projections.named_parameters()}
    cpu_trainer(max_steps=1, callbacks=[kd]).fit(student, token_dataloader(n=8))
    after = dict(kd.plugin.projections.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Teacher-logit cache
# ---------------------------------------------------------------------------------------------


class IndexedData(Dataset):
    def __init__(self, n: int = 32) -> None:
        data = random_classification_data(n=n)
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "idx": i}


class IndexedClassifier(TinyClassifier):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])


def _cache_run(cache_key: Any, epochs: int = 3) -> tuple[Recorder, int, KnowledgeDistillation]:
    pl.seed_everything(0)
    teacher = TinyClassifier(hidden=48)
    student = IndexedClassifier()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=0.7, cache_key=cache_key)
    rec = Recorder()
    loader = DataLoader(IndexedData(32), batch_size=8, shuffle=True)
    cpu_trainer(max_epochs=epochs, callbacks=[kd, rec]).fit(student, loader)
    return rec, len(calls), kd


def test_cache_returns_the_right_logits_under_shuffling():
    cached, cached_calls, kd = _cache_run("idx")
    plain, plain_calls, _ = _cache_run(None)
    order = [b["idx"].tolist() for b in cached.batches]
    assert order[:4] != order[4:8]  # the loader really reshuffles between epochs
    assert [b["idx"].tolist() for b in plain.batches] == order
    assert plain_calls == 12 and cached_calls == 4  # the teacher runs in the first epoch only
    assert len(kd.plugin.cache) == 32
    kl_cached = [m["distillation/kl"] for m in cached.metrics]
    kl_plain = [m["distillation/kl"] for m in plain.metrics]
    assert kl_cached == pytest.approx(kl_plain, rel=1e-5)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)


def test_cache_refuses_non_unique_or_missing_keys():
    # keys by position in the batch: the same keys come back with other examples -> refuse
    with pytest.raises(ValueError, match="refuses to guess"):
        _cache_run(lambda batch: list(range(len(batch["idx"]))), epochs=1)
    with pytest.raises(KeyError, match=r"cache_key='index'.*no such field.*'idx'"):
        _cache_run("index", epochs=1)


# ---------------------------------------------------------------------------------------------
# transformers students and teachers from paths
# ---------------------------------------------------------------------------------------------


def test_gpt2_from_a_directory_in_bfloat16_with_kl_cosine_and_attention(tmp_path):
    pl.seed_everything(0)
    tiny_gpt2(hidden_size=48).save_pretrained(tmp_path / "teacher")
    student = TinyTransformerClassifier(tiny_gpt2(hidden_size=32))
    kd = KnowledgeDistillation(
        str(tmp_path / "teacher"),
        teacher_dtype=torch.bfloat16,
        hidden_cosine_weight=1.0,
        layer_map={-1: -1},
        attention_weight=10.0,
        attention_layer_map={0: 0, 1: 1},
    )
    rec = Recorder()
    cpu_trainer(max_steps=2, callbacks=[kd, rec]).fit(student, token_dataloader(n=16))
    teacher = kd.plugin.teacher
    assert type(teacher).__name__ == "GPT2ForSequenceClassification"
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    for name in ("kl", "hidden_cosine", "attention"):
        values = [m[f"distillation/{name}"] for m in rec.metrics]
        assert all(math.isfinite(v) and v > 0 for v in values), (name, values)
    # attention maps needed eager attention during fit; the student's setting is restored after
    assert student.model.config._attn_implementation == "sdpa"
    assert not student.model._forward_hooks and not student.model._forward_pre_hooks


def test_teacher_from_a_lightning_checkpoint(tmp_path):
    pl.seed_everything(0)
    teacher = TinyClassifier(hidden=48)
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(teacher, DataLoader(random_classification_data(n=8), batch_size=8))
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    kd = KnowledgeDistillation(tmp_path / "teacher.ckpt")  # loaded with the student's class
    cpu_trainer(max_steps=1, callbacks=[kd]).fit(
        TinyClassifier(), DataLoader(random_classification_data(n=8), batch_size=8)
    )
    loaded = kd.plugin.teacher
    assert isinstance(loaded, TinyClassifier) and loaded.hparams.hidden == 48
    torch.testing.assert_close(loaded.classifier.weight, teacher.classifier.weight)


# ---------------------------------------------------------------------------------------------
# The one hook for modules the capture cannot serve
# ---------------------------------------------------------------------------------------------


class TwiceCalled(TinyClassifier):
    """Calls itself twice per step (e.g. two augmented views)."""

    use_record = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        noisy = self(x + 0.01)
        if self.use_record:
            KnowledgeDistillation.record(self, out, x)
        return F.cross_entropy(out, y) + F.cross_entropy(noisy, y)


def test_record_hook_for_a_student_called_twice():
    loader = DataLoader(random_classification_data(n=16), batch_size=8)
    kd = KnowledgeDistillation(TinyClassifier(hidden=48))
    with pytest.raises(RuntimeError, match=r"called 2 times.*KnowledgeDistillation.record"):
        cpu_trainer(max_steps=1, callbacks=[kd]).fit(TwiceCalled(), loader)
    student = TwiceCalled()
    student.use_record = True
    rec = Recorder()
    cpu_trainer(max_steps=2, callbacks=[KnowledgeDistillation(TinyClassifier(hidden=48)), rec]).fit(
        student, loader
    )
    assert all(m["distillation/kl"] > 0 for m in rec.metrics)
    # without a distillation callback, record() does nothing and the module trains as before
    cpu_trainer(max_steps=1).fit(student, loader)


def test_two_teachers_each_with_projections():
    pl.seed_everything(0)
    student = TinyTransformerClassifier(tiny_bert(hidden_size=32))
    kd1 = KnowledgeDistillation(tiny_bert(hidden_size=48), alpha=0.3, hidden_mse_weight=1.0, layer_map={2: 2})
    kd2 = KnowledgeDistillation(
        tiny_bert(hidden_size=64), alpha=0.3, hidden_cosine_weight=1.0, layer_map={1: 2}
    )

    class Attributes(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.seen = {n: type(m).__name__ for n, m in pl_module.named_children()}

    attrs, rec = Attributes(), Recorder()
    cpu_trainer(max_steps=2, callbacks=[kd1, kd2, attrs, rec]).fit(student, token_dataloader(n=16))
    assert attrs.seen.get("distill_projections") == attrs.seen.get("distill_projections_2") == "ModuleDict"
    assert kd2.plugin.projections["layer_1"].weight.shape == (64, 32)
    m = rec.metrics[0]
    assert m["distillation/hidden_mse"] > 0 and m["distillation-2/hidden_cosine"] > 0
    assert m["distillation/kl"] > 0 and m["distillation-2/kl"] > 0
    # the task loss is weighted by the product (1 - 0.3) * (1 - 0.3)
    terms = sum(v for k, v in m.items() if k.startswith("distillation"))
    assert rec.losses[0] == pytest.approx(0.49 * m["shrink/task_loss"] + terms, rel=1e-5)
    assert not hasattr(student, "distill_projections") and not hasattr(student, "distill_projections_2")


def test_alpha_zero_skips_the_teacher_and_returns_zero_terms():
    teacher = TinyClassifier(hidden=48)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    kd = KnowledgeDistillation(teacher, alpha=lambda step: 0.0 if step < 2 else 0.5)
    rec = Recorder()
    cpu_trainer(max_steps=3, callbacks=[kd, rec]).fit(
        TinyClassifier(), DataLoader(random_classification_data(n=24), batch_size=8)
    )
    assert [m["distillation/kl"] == 0.0 for m in rec.metrics] == [True, True, False]
    assert rec.losses[0] == pytest.approx(rec.metrics[0]["shrink/task_loss"])  # weight 1 - 0
    assert len(calls) == 1  # the teacher ran only when alpha > 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, "`temperature`"),
        (dict(alpha=1.5), ValueError, "`alpha` must be in"),
        (dict(alpha=lambda step: -1.0), ValueError, r"alpha\(0\)"),
        (dict(kl_weight=0.0), ValueError, "would do nothing"),
        (dict(hidden_mse_weight=1.0), ValueError, "need `layer_map`"),
        (dict(hidden_mse_weight=1.0, layer_map={1: "x"}), ValueError, "`layer_map` entry 1"),
        (dict(attention_weight=1.0), ValueError, "`attention_layer_map`"),
        (dict(hidden_mse_weight=1.0, layer_map={1: 1}, cache_key="idx"), ValueError, "`cache_key`"),
        (dict(teacher_dtype=torch.int8), ValueError, "`teacher_dtype`"),
        (dict(teacher="/nonexistent/teacher.ckpt"), FileNotFoundError, "`teacher="),
        (dict(teacher=42), TypeError, "`teacher` must be"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    kwargs = {"teacher": TinyClassifier(), **kwargs}
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**kwargs)


def _fit(student, kd, loader=None, steps=1):
    loader = loader or DataLoader(random_classification_data(n=16), batch_size=8)
    cpu_trainer(max_steps=steps, callbacks=[kd]).fit(student, loader)


def test_logit_shape_mismatch_names_student_and_teacher():
    kd = KnowledgeDistillation(TinyClassifier(num_classes=3))
    with pytest.raises(ValueError, match=r"student have shape \(8, 2\).*teacher have shape \(8, 3\)"):
        _fit(TinyClassifier(num_classes=2), kd)


def test_layer_map_out_of_range_names_the_side_at_setup():
    student = TinyTransformerClassifier(tiny_bert())
    kd = KnowledgeDistillation(tiny_bert(hidden_size=48), hidden_mse_weight=1.0, layer_map={5: 1})
    with pytest.raises(IndexError, match=r"student layer 5 is out of range.*3 hidden states"):
        _fit(student, kd, token_dataloader(n=8))
    kd = KnowledgeDistillation(tiny_bert(hidden_size=48), attention_weight=1.0, attention_layer_map={0: 2})
    with pytest.raises(IndexError, match=r"teacher layer 2 is out of range.*2 attention maps"):
        _fit(TinyTransformerClassifier(tiny_bert()), kd, token_dataloader(n=8))
    kd = KnowledgeDistillation(TinyClassifier(), hidden_mse_weight=1.0, layer_map={1: 1})
    with pytest.raises(ValueError, match=r"integer layer indices.*student is a TinyClassifier"):
        _fit(TinyClassifier(), kd)


def test_a_teacher_that_is_still_training_is_refused():
    student = TinyTransformerClassifier(tiny_bert())
    # the teacher is the student itself, or its inner model
    with pytest.raises(ValueError, match="teacher is the student itself"):
        _fit(student, KnowledgeDistillation(student), token_dataloader(n=8))
    with pytest.raises(ValueError, match="teacher is the student itself"):
        _fit(student, KnowledgeDistillation(student.model), token_dataloader(n=8))
    # a teacher sharing parameters with the student would be trained by its optimizer
    shared = tiny_bert()
    shared.bert.embeddings = student.model.bert.embeddings
    with pytest.raises(ValueError, match=r"shares its parameter 'bert\.embeddings.*with the student"):
        _fit(student, KnowledgeDistillation(shared), token_dataloader(n=8))
    assert all(p.requires_grad for p in student.parameters())  # nothing was frozen by mistake

    # a LightningModule teacher that another Trainer is fitting right now
    teacher = TinyClassifier(hidden=48)
    errors = []

    class DistilMidway(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            try:
                _fit(TinyClassifier(), KnowledgeDistillation(pl_module))
            except ValueError as exc:
                errors.append(str(exc))

    _fit(teacher, DistilMidway())
    assert errors and "attached to a Trainer that is fitting it" in errors[0]


def test_teacher_in_the_optimizer_or_projections_outside_it_are_errors():
    class TrainsTeacherToo(TinyClassifier):
        def __init__(self, teacher):
            super().__init__()
            object.__setattr__(self, "other", teacher)  # not a submodule, but optimized

        def configure_optimizers(self):
            return torch.optim.SGD([*self.parameters(), *self.other.parameters()], lr=0.1)

    teacher = TinyClassifier(hidden=48)
    with pytest.raises(ValueError, match=r"teacher's parameter 'net\.0\.weight' is in the optimizer"):
        _fit(TrainsTeacherToo(teacher), KnowledgeDistillation(teacher))

    class OnlyModelParams(TinyTransformerClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    kd = KnowledgeDistillation(tiny_bert(hidden_size=48), hidden_mse_weight=1.0, layer_map={1: 1})
    with pytest.raises(ValueError, match=r"projections distill_projections\.layer_1.*not in the optimizer"):
        _fit(OnlyModelParams(tiny_bert()), kd, token_dataloader(n=8))


def test_student_not_called_as_a_module_is_an_error():
    class CallsForward(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.forward(x), y)

    with pytest.raises(RuntimeError, match=r"student \(CallsForward.*was not called during training_step"):
        _fit(CallsForward(), KnowledgeDistillation(TinyClassifier()))


def test_student_attribute_override_and_submodule_layer_names():
    # `student=""` picks the LightningModule itself; layer maps may name submodules of any model.
    pl.seed_everything(0)
    student, teacher = TinyClassifier(hidden=32), TinyClassifier(hidden=48)
    kd = KnowledgeDistillation(
        teacher, student="", hidden_mse_weight=1.0, layer_map={"net.2": "net.2"}, kl_weight=0.5
    )
    rec = Recorder()
    loader = DataLoader(random_classification_data(n=16), batch_size=8)
    cpu_trainer(max_steps=2, callbacks=[kd, rec]).fit(student, loader)
    assert kd.plugin.projections["layer_net__2"].weight.shape == (48, 32)
    assert all(m["distillation/hidden_mse"] > 0 for m in rec.metrics)
    with pytest.raises(AttributeError, match="`student='encoder'` names no submodule"):
        _fit(TinyClassifier(), KnowledgeDistillation(TinyClassifier(), student="encoder"))
