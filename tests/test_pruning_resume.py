"""Resuming a pruning run: bit-exact mid-schedule; a changed configuration refused before the first
step, naming what changed; a run that ends short of its target says so at fit end."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_shrink
from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

#: 24 optimizer steps (3 epochs of 8); the checkpoint after epoch 0 is at step 8.
RUN = dict(target_sparsity=0.8, start_step=2, end_step=0.875, frequency=3, scope="layer")


def _loader() -> DataLoader:
    return DataLoader(random_classification_data(64), batch_size=8)


def _fit(tmp_path, ckpt_path=None, save=False, max_epochs=3, callbacks=None, **changes):
    """A 3-epoch run; updates at steps 2, 5, 8 (the checkpoint), 11, ..., 20 and 21 (0.875 of the run)."""
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.05)
    cb = GradualMagnitudePruning(**{**RUN, **changes})
    extra = list(callbacks or [])
    if save:
        extra.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer = cpu_trainer(callbacks=[cb, *extra], max_epochs=max_epochs, enable_checkpointing=save)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return model, cb, trainer


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The uninterrupted run and its checkpoints."""
    tmp_path = tmp_path_factory.mktemp("original")
    model, cb, _ = _fit(tmp_path, save=True)
    return tmp_path, model, cb


def _assert_same_run(model_a, cb_a, model_b, cb_b):
    assert cb_b.plugin.update_count == cb_a.plugin.update_count
    for (na, a), (nb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b), na
    for name, mask in cb_a.masks.items():
        assert torch.equal(mask, cb_b.masks[name])


def test_resume_mid_schedule_is_bit_exact(original, tmp_path):
    directory, model_a, cb_a = original
    ckpt = directory / "epoch=0.ckpt"  # after 8 of 24 steps: mid-schedule, at an update step
    state = torch.load(ckpt, weights_only=False)["lightning_shrink"]["pruning"]
    assert state["last_update_step"] == 8 and 0 < state["sparsity"] < 0.8
    assert state["schedule"] == {"start": 2, "end": 21, "frequency": 3} and state["total_steps"] == 24
    model_b, cb_b, _ = _fit(tmp_path, ckpt_path=ckpt)
    _assert_same_run(model_a, cb_a, model_b, cb_b)
    assert cb_b.sparsity == pytest.approx(0.8, abs=1e-3)


def test_resume_with_the_same_schedule_given_otherwise_or_other_logging_is_accepted(original, tmp_path):
    directory, model_a, cb_a = original
    # end_step=21 is 0.875 of 24 steps; logging and gradient masking do not change what is pruned
    model_b, cb_b, _ = _fit(
        tmp_path, ckpt_path=directory / "epoch=0.ckpt", end_step=21, log_layer_sparsity=False
    )
    _assert_same_run(model_a, cb_a, model_b, cb_b)
    _, cb_c, _ = _fit(tmp_path, ckpt_path=directory / "epoch=0.ckpt", mask_gradients=True)
    assert cb_c.sparsity == pytest.approx(0.8, abs=1e-3)


def test_resume_with_an_earlier_end_step_is_refused_before_the_first_step(original, tmp_path):
    # Accepted silently before: the schedule's end (6) lay before the checkpoint's step (8), no mask was
    # updated again and the fit ended at the checkpoint's sparsity against a 0.8 target.
    directory, _, _ = original
    with pytest.raises(ValueError, match="GradualMagnitudePruning") as info:
        _fit(tmp_path, ckpt_path=directory / "epoch=0.ckpt", end_step=6)
    message = str(info.value)
    assert "'pruning'" in message and "(2, 21, 3) optimizer steps, now (2, 6, 3)" in message
    assert "Resume with the callback arguments" in message


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        (dict(target_sparsity=0.9), "`target_sparsity` was 0.8, is 0.9"),
        (dict(scope="global"), "`scope` was 'layer', is 'global'"),
        (dict(pattern="rows"), "`pattern` was 'unstructured', is 'rows'"),
        (dict(schedule="linear"), "`schedule` was 'cubic', is 'linear'"),
        (dict(modules=["net.0"]), "`modules` was None, is ['net.0']"),
        (dict(sparsity_overrides={"net.0": 0.5}), "`sparsity_overrides` was [], is [['net.0', 0.5]]"),
        (dict(initial_sparsity=0.1), "`initial_sparsity` was 0.0, is 0.1"),
        (dict(prune_output_layer=True), "`prune_output_layer` was False, is True"),
        (dict(parameter_names=("weight", "bias")), "`parameter_names` was ['weight'], is ['weight', 'bias']"),
        (dict(max_epochs=4), "(the run's length changed from 24 to 32 optimizer steps"),
    ],
)
def test_shrink_load_state_refuses_a_changed_pruning_configuration(original, tmp_path, changes, said):
    directory, _, _ = original
    with pytest.raises(
        ValueError, match="the checkpoint was written by a run that pruned differently"
    ) as info:
        _fit(tmp_path, ckpt_path=directory / "epoch=0.ckpt", **changes)
    assert said in str(info.value)


def test_a_checkpoint_without_pruning_state_is_caught_up_with_a_warning(tmp_path):
    torch.manual_seed(0)
    dense = TinyClassifier(optimizer="adamw", lr=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, filename="dense")
    cpu_trainer(callbacks=[checkpoint], max_epochs=1, enable_checkpointing=True).fit(dense, _loader())
    # resumed at step 8 with a pruning schedule that ended at step 6
    model = TinyClassifier(optimizer="adamw", lr=0.05)
    cb = GradualMagnitudePruning(0.6, end_step=6, frequency=2)
    trainer = cpu_trainer(callbacks=[cb], max_epochs=2)
    with pytest.warns(UserWarning, match=r"starts at optimizer step 8 .* without this plugin's state"):
        trainer.fit(model, _loader(), ckpt_path=tmp_path / "dense.ckpt")
    assert trainer.global_step == 16 and cb.plugin.update_count == 1
    assert cb.sparsity == pytest.approx(0.6, abs=1e-3)


def test_a_run_that_ends_short_of_its_target_says_so_at_fit_end():
    # Silent before: the last update (step 12) lies after the run's 8 steps
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.05)
    cb = GradualMagnitudePruning(0.8, end_step=12, frequency=2)
    trainer = cpu_trainer(callbacks=[cb], max_epochs=1)
    with pytest.warns(UserWarning) as record:
        trainer.fit(model, _loader())
    ended = [str(w.message) for w in record if "the run ended" in str(w.message)]
    assert len(ended) == 1 and "'pruning'" in ended[0], [str(w.message) for w in record]
    assert "at optimizer step 8 short of its target sparsity" in ended[0]
    assert "2 layers under the global threshold at 0." in ended[0] and "(target 0.8)" in ended[0]
    assert "the schedule's last mask update is at step 12, after the run's end" in ended[0]
    assert cb.sparsity < 0.8
    rows = {r.metric: r.value for r in lightning_shrink.report(trainer).rows if r.target == "pruned layers"}
    assert rows["target reached"] is False and rows["target sparsity"] == 0.8


def test_a_callable_schedule_below_the_target_says_so_and_a_reached_target_is_quiet():
    torch.manual_seed(0)
    short = GradualMagnitudePruning(0.8, end_step=4, frequency=2, schedule=lambda step: 0.1 * min(step, 4))
    with pytest.warns(UserWarning, match=r"the `schedule` callable's value at step 4 is below the target"):
        cpu_trainer(callbacks=[short], max_epochs=1).fit(TinyClassifier(), _loader())
    assert short.sparsity == pytest.approx(0.4, abs=1e-3)

    reached = GradualMagnitudePruning(0.5, pattern="rows", scope="layer", end_step=4, frequency=2)
    trainer = cpu_trainer(callbacks=[reached], max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*short of its target")
        trainer.fit(TinyClassifier(), _loader())
    rows = {r.metric: r.value for r in lightning_shrink.report(trainer).rows if r.target == "pruned layers"}
    assert rows["target reached"] is True


def test_a_checkpoint_of_the_first_state_version_resumes_and_is_checked(original, tmp_path):
    directory, model_a, cb_a = original
    checkpoint = torch.load(directory / "epoch=0.ckpt", weights_only=False)
    state = checkpoint["lightning_shrink"]["pruning"]
    for key in ("technique", "config", "targets", "total_steps"):  # what version 1 did not write
        del state[key]
    state["version"] = 1
    torch.save(checkpoint, tmp_path / "v1.ckpt")
    model_b, cb_b, _ = _fit(tmp_path, ckpt_path=tmp_path / "v1.ckpt")
    _assert_same_run(model_a, cb_a, model_b, cb_b)
    # its resolved schedule and masked parameters are still compared
    with pytest.raises(ValueError, match=r"resolved to \(2, 21, 3\) optimizer steps, now \(2, 6, 3\)"):
        _fit(tmp_path, ckpt_path=tmp_path / "v1.ckpt", end_step=6)
    with pytest.raises(ValueError, match=r"the selected parameters differ \(1: \['net\.2\.weight'\]\)"):
        _fit(tmp_path, ckpt_path=tmp_path / "v1.ckpt", modules="net.0")
