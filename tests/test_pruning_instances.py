"""Several GradualMagnitudePruning callbacks in one Trainer, and models built in ``configure_model``.

Each instance prunes its own parameters to its own target on its own schedule, under its own name
(``pruning``, ``pruning-2`` or the ``name`` given): metrics, checkpoint state, report rows. A parameter
selected by two of them is refused at set-up, naming both.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_shrink
from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

ATTENTION = dict(modules="*.attention.*")
MLP = dict(modules=["*.intermediate.dense", "*.output.dense"], exclude_modules="*.attention.*")


def _two(names=(None, None)):
    """Attention at 50 % (updates at steps 0..4), the MLP at 80 % (steps 2, 4, ..., 8)."""
    attention = GradualMagnitudePruning(
        0.5, end_step=4, frequency=1, scope="layer", name=names[0], **ATTENTION
    )
    mlp = GradualMagnitudePruning(0.8, start_step=2, end_step=8, frequency=2, name=names[1], **MLP)
    return attention, mlp


def _fit_two(tmp_path, ckpt_path=None, save=False, callbacks=None):
    torch.manual_seed(0)
    # no dropout: a resumed run draws other random numbers (Lightning does not restore the RNG)
    bert = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = TinyTransformerClassifier(bert, lr=1e-2)
    callbacks = callbacks or list(_two())
    extra = (
        [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
        if save
        else []
    )
    trainer = cpu_trainer(callbacks=[*callbacks, *extra], max_epochs=2, enable_checkpointing=save)
    trainer.fit(model, token_dataloader(n=48), ckpt_path=ckpt_path)  # 6 steps an epoch
    return model, callbacks, trainer


def test_two_pruning_callbacks_reach_their_own_targets_under_their_own_names(tmp_path):
    model, (attention, mlp), trainer = _fit_two(tmp_path, save=True)
    assert (attention.plugin.name, mlp.plugin.name) == ("pruning", "pruning-2")
    layers = model.model.bert.encoder.layer
    assert set(attention.masks) == {
        f"model.bert.encoder.layer.{i}.attention.{m}.weight"
        for i in range(2)
        for m in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert set(mlp.masks) == {
        f"model.bert.encoder.layer.{i}.{m}.dense.weight" for i in range(2) for m in ("intermediate", "output")
    }
    assert attention.sparsity == pytest.approx(0.5) and mlp.sparsity == pytest.approx(0.8, abs=1e-3)
    assert float((layers[0].attention.self.query.weight == 0).float().mean()) == pytest.approx(0.5)
    assert float((layers[1].intermediate.dense.weight == 0).float().mean()) >= 0.5
    assert not (model.model.bert.pooler.dense.weight == 0).any()  # selected by neither
    metrics = trainer.callback_metrics
    assert float(metrics["pruning/sparsity"]) == pytest.approx(0.5)
    assert float(metrics["pruning-2/sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert float(metrics["pruning-2/target_sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert "pruning-2/sparsity/model.bert.encoder.layer.0.output.dense.weight" in metrics
    assert {"pruning/sparsity", "pruning-2/sparsity"} <= set(trainer.progress_bar_metrics)
    report = lightning_shrink.report(trainer)
    for name, cb, target in (("pruning", attention, 0.5), ("pruning-2", mlp, 0.8)):
        rows = {r.metric: r.value for r in report.select(name) if r.target == "pruned layers"}
        assert rows["sparsity"] == pytest.approx(target, abs=1e-3) and rows["target sparsity"] == target
        assert rows["target reached"] is True
        assert {r.target for r in report.select(name, "sparsity")} - {"pruned layers"} == set(cb.masks)
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["lightning_shrink"]
    assert set(state["pruning"]["masks"]) == set(attention.masks)
    assert set(state["pruning-2"]["masks"]) == set(mlp.masks)
    assert state["pruning"]["last_update_step"] == 4 and state["pruning-2"]["last_update_step"] == 6


def test_a_resume_restores_both_bit_exactly(tmp_path):
    model_a, (att_a, mlp_a), _ = _fit_two(tmp_path, save=True)
    # after epoch 0 (step 6): the MLP's schedule is halfway
    model_b, (att_b, mlp_b), _ = _fit_two(tmp_path, ckpt_path=tmp_path / "epoch=0.ckpt")
    for (na, a), (nb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b), na
    for cb_a, cb_b in ((att_a, att_b), (mlp_a, mlp_b)):
        assert cb_b.plugin.update_count == cb_a.plugin.update_count
        for name, mask in cb_a.masks.items():
            assert torch.equal(mask, cb_b.masks[name]), name


def test_a_resume_with_the_callbacks_swapped_or_one_missing_is_refused(tmp_path):
    _fit_two(tmp_path, save=True)
    ckpt = tmp_path / "epoch=0.ckpt"
    # the names follow the callback list: swapped, each would take the other's state
    attention, mlp = _two()
    with pytest.raises(
        ValueError, match=r"\('pruning(-2)?'\): the checkpoint was written by a run that pruned"
    ):
        _fit_two(tmp_path, ckpt_path=ckpt, callbacks=[mlp, attention])
    # without the MLP callback its masks would no longer be enforced
    with pytest.raises(
        ValueError, match=r"holds the pruning state of \['pruning-2'\], but the Trainer has no"
    ):
        _fit_two(tmp_path, ckpt_path=ckpt, callbacks=[_two()[0]])


def test_explicit_names_namespace_metrics_state_and_rows(tmp_path):
    _, _, trainer = _fit_two(tmp_path, callbacks=list(_two(("attention", "mlp"))))
    assert float(trainer.callback_metrics["attention/sparsity"]) == pytest.approx(0.5)
    assert float(trainer.callback_metrics["mlp/sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert {r.technique for r in lightning_shrink.report(trainer).rows} >= {"attention", "mlp"}


def test_overlapping_selections_are_refused_at_setup_naming_both_plugins():
    model = TinyTransformerClassifier(tiny_bert())
    attention = GradualMagnitudePruning(0.5, **ATTENTION)
    everything = GradualMagnitudePruning(0.8)  # the default selection includes the attention layers
    trainer = cpu_trainer(callbacks=[attention, everything], max_steps=2)
    with pytest.raises(
        ValueError,
        match=r"plugins 'pruning' and 'pruning-2' both select \['model\.bert\.encoder\.layer\.0\.attention"
        r"\.self\.query\.weight', .*\] and 5 more: a parameter can follow one schedule only",
    ):
        trainer.fit(model, token_dataloader(n=16))
    assert trainer.global_step == 0


class DeferredBert(TinyTransformerClassifier):
    """A tiny BERT classifier whose BERT does not exist until ``configure_model`` creates it."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr = 1e-2

    def configure_model(self) -> None:
        if not hasattr(self, "model"):  # configure_model runs again for every stage
            self.model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_shrink_configure_model_prunes_a_model_built_in_configure_model(tmp_path):
    def fit(ckpt_path=None):
        torch.manual_seed(0)
        model = DeferredBert()
        assert not list(model.parameters())
        attention, mlp = _two()
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        callbacks = [attention, mlp] + ([checkpoint] if ckpt_path is None else [])
        trainer = cpu_trainer(callbacks=callbacks, max_epochs=2, enable_checkpointing=ckpt_path is None)
        trainer.fit(model, token_dataloader(n=48), ckpt_path=ckpt_path)
        return model, attention, mlp

    model, attention, mlp = fit()
    assert len(attention.masks) == 8 and len(mlp.masks) == 4
    assert attention.sparsity == pytest.approx(0.5) and mlp.sparsity == pytest.approx(0.8, abs=1e-3)
    assert float((model.model.bert.encoder.layer[0].output.dense.weight == 0).float().mean()) > 0.5
    # a fresh model, built in configure_model again, resumed mid-schedule: bit-exact
    fresh, _, _ = fit(ckpt_path=tmp_path / "epoch=0.ckpt")
    for (na, a), (nb, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b), na
