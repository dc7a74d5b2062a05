"""KnowledgeDistillation in real CPU fits: loss terms against hand-computed references, the logit
cache under shuffling, transformers students (BERT, GPT-2), teachers from paths, the record hook,
and the errors at set-up and at the first batch (layer maps, vocabularies, a teacher still training).

The learned projections are tested in test_distillation_projections.py, checkpoints, resumes, report
rows and several instances in test_distillation_state.py, the configuration in
test_distillation_config.py."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_shrink import KnowledgeDistillation
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


class BagOfTokens(pl.LightningModule):
    """A student that is not a transformers model: an embedding bag classifier called as self(ids)."""

    def __init__(self, vocab_size: int = 64) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 16)
        self.classifier = torch.nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.classifier(self.embedding(input_ids).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Started(pl.Callback):
    batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def test_a_teacher_with_a_smaller_vocabulary_is_refused_at_setup_naming_both_sizes():
    started = Started()
    kd = KnowledgeDistillation(tiny_bert(vocab_size=32))
    with pytest.raises(
        ValueError,
        match=r"teacher's vocabulary \(BertForSequenceClassification, 32 token ids\) is "
        r"smaller than the student's \(BertForSequenceClassification, 64 token ids\)",
    ):
        cpu_trainer(max_steps=1, callbacks=[kd, started]).fit(
            TinyTransformerClassifier(tiny_bert(vocab_size=64)), token_dataloader(n=8)
        )
    assert started.batches == 0  # at set-up, before any batch
    # a teacher with a larger vocabulary reads every student token id
    cpu_trainer(max_steps=1, callbacks=[KnowledgeDistillation(tiny_bert(vocab_size=80))]).fit(
        TinyTransformerClassifier(tiny_bert(vocab_size=64)), token_dataloader(n=8)
    )


def test_token_ids_beyond_the_teachers_vocabulary_fail_before_the_teacher_runs():
    # The student is no transformers model, so its vocabulary is unknown at set-up: the batch is
    # checked against the teacher's input embedding before the teacher is called.
    teacher = tiny_bert(vocab_size=32)
    started = []
    teacher.register_forward_pre_hook(lambda *a: started.append(1))
    with pytest.raises(
        ValueError, match=r"batch holds token id 63, but the teacher's vocabulary has 32 token ids"
    ):
        _fit(BagOfTokens(), KnowledgeDistillation(teacher), token_dataloader(n=8))
    assert started == []


def test_a_teacher_embedding_too_small_for_the_inputs_names_the_embedding_and_sizes():
    # The teacher is no transformers model: each of its embeddings checks its indices before the lookup.
    class EmbeddingTeacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = torch.nn.Embedding(32, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.head(self.tokens(input_ids).mean(1))

    with pytest.raises(ValueError, match=r"teacher's embedding 'tokens' has 32 rows .* hold id 63"):
        _fit(
            TinyTransformerClassifier(tiny_bert()),
            KnowledgeDistillation(EmbeddingTeacher()),
            token_dataloader(n=8),
        )
    # the same teacher with a vocabulary that fits trains, and its embedding is left without hooks
    teacher = EmbeddingTeacher()
    teacher.tokens = torch.nn.Embedding(64, 8)
    _fit(TinyTransformerClassifier(tiny_bert()), KnowledgeDistillation(teacher), token_dataloader(n=8))
    assert not teacher.tokens._forward_pre_hooks


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


def test_a_teacher_in_the_optimizer_is_refused_at_fit_start():
    class TrainsTeacherToo(TinyClassifier):
        def __init__(self, teacher):
            super().__init__()
            object.__setattr__(self, "other", teacher)  # not a submodule, but optimized

        def configure_optimizers(self):
            return torch.optim.SGD([*self.parameters(), *self.other.parameters()], lr=0.1)

    teacher = TinyClassifier(hidden=48)
    with pytest.raises(ValueError, match=r"teacher's parameter 'net\.0\.weight' is in the optimizer"):
        _fit(TrainsTeacherToo(teacher), KnowledgeDistillation(teacher))


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
