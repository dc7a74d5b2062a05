"""The bridge: Lightning events become hook calls, in the documented order, with real fits."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_shrink import PluginError, ShrinkCallback, TechniqueCallback, hookimpl
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data


class Counter:
    """A stateful plugin: counts real optimizer steps and saves the count in checkpoints."""

    def __init__(self, prefix: str = "counter") -> None:
        self.prefix = prefix
        self.steps = 0
        self.loaded_state = None
        self.weights_at_load: torch.Tensor | None = None

    @hookimpl
    def shrink_after_optimizer_step(self):
        self.steps += 1

    @hookimpl
    def shrink_save_state(self, state):
        state[self.prefix] = {"steps": self.steps}

    @hookimpl
    def shrink_load_state(self, pl_module, state):
        self.loaded_state = dict(state)
        self.steps = state.get(self.prefix, {}).get("steps", 0)
        self.weights_at_load = pl_module.classifier.weight.detach().clone()

    @hookimpl
    def shrink_metrics(self):
        return {f"{self.prefix}/steps": float(self.steps)}

    @hookimpl
    def shrink_progress_bar_metrics(self):
        return {f"{self.prefix}/steps_seen": float(self.steps), f"{self.prefix}/steps": float(self.steps)}


class Technique(TechniqueCallback):
    plugin_name = "counter"

    def __init__(self, prefix: str = "counter") -> None:
        super().__init__()
        self.prefix = prefix

    def make_plugin(self):
        return Counter(self.prefix)


def loader(n=64, batch_size=8, shuffle=False):
    return DataLoader(random_classification_data(n), batch_size=batch_size, shuffle=shuffle)


def test_hook_call_order_during_fit(cpu_trainer, tiny_module, tiny_dataloader, shrink_recorder):
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(tiny_module, tiny_dataloader)
    names = [
        n for n in shrink_recorder.names() if n not in ("shrink_report_rows", "shrink_plugin_registered")
    ]
    per_step = [
        "shrink_train_batch_start",
        "shrink_loss_weight",
        "shrink_training_loss",
        "shrink_after_backward",
        "shrink_before_optimizer_step",
        "shrink_after_optimizer_step",
        "shrink_metrics",
        "shrink_progress_bar_metrics",
    ]
    assert names == [
        "shrink_setup",
        "shrink_configure_model",
        # shrink_optimizer_param_groups and shrink_ddp_comm_hook are called per implementation
        # (none here; the latter only under DDP).
        "shrink_fit_start",
        "shrink_train_epoch_start",
        *per_step,
        *per_step,
        "shrink_train_epoch_end",
        "shrink_fit_end",
        "shrink_teardown",
    ]
    setup = shrink_recorder.getcalls("shrink_setup")[0]
    assert setup.stage == "fit" and setup.pl_module is tiny_module and setup.trainer is trainer


def test_shrink_setup_runs_before_optimizers_exist(
    cpu_trainer, tiny_module, tiny_dataloader, shrink_pluginmanager
):
    seen = {}

    class Swap:
        @hookimpl
        def shrink_setup(self, trainer, pl_module):
            seen["optimizers"] = list(trainer.optimizers)
            # A plugin may swap modules here; the optimizer created afterwards sees the new ones.
            pl_module.classifier = torch.nn.Linear(32, 2)
            seen["new"] = pl_module.classifier.weight

        @hookimpl
        def shrink_fit_start(self, trainer):
            seen["param_ids"] = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    shrink_pluginmanager.register(Swap())
    cpu_trainer(max_steps=1).fit(tiny_module, tiny_dataloader)
    assert seen["optimizers"] == []
    assert id(seen["new"]) in seen["param_ids"]


@pytest.mark.parametrize("accumulate", [1, 4])
def test_shrink_after_optimizer_step_fires_once_per_real_step(
    accumulate, cpu_trainer, tiny_module, shrink_recorder
):
    trainer = cpu_trainer(accumulate_grad_batches=accumulate)
    trainer.fit(tiny_module, loader(n=128))  # 16 batches
    assert trainer.global_step == 16 // accumulate
    shrink_recorder.assert_called("shrink_after_optimizer_step", times=16 // accumulate)
    shrink_recorder.assert_called("shrink_before_optimizer_step", times=16 // accumulate)
    shrink_recorder.assert_called("shrink_train_batch_start", times=16)
    shrink_recorder.assert_called("shrink_training_loss", times=16)


def test_shrink_after_optimizer_step_skipped_when_amp_skips_the_step(
    cpu_trainer, tiny_module, shrink_recorder, shrink_pluginmanager
):
    class PoisonFirstBatch:
        @hookimpl
        def shrink_training_loss(self, loss, batch_idx):
            # An infinite loss term on batch 0 makes the gradient scaler skip that step.
            return {"poison": loss * float("inf")} if batch_idx == 0 else None

    shrink_pluginmanager.register(PoisonFirstBatch())
    # Lightning refuses "16-mixed" on CPU by name, but its plugin runs there with torch's CPU scaler.
    amp = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = cpu_trainer(plugins=[amp], max_steps=-1, limit_train_batches=4)
    trainer.fit(tiny_module, loader())
    before = shrink_recorder.count("shrink_before_optimizer_step")
    after = shrink_recorder.count("shrink_after_optimizer_step")
    assert before == 4
    assert after == 3  # the skipped step updated nothing, so the hook did not fire


def test_shrink_training_loss_and_shrink_loss_weight_change_the_gradient(shrink_pluginmanager, cpu_trainer):
    c, lr, weight = 0.25, 0.1, 0.5

    class L2:
        @hookimpl
        def shrink_training_loss(self, pl_module):
            return {"l2": c * (pl_module.classifier.weight**2).sum()}

        @hookimpl
        def shrink_loss_weight(self):
            return weight

    def one_step(with_plugin):
        torch.manual_seed(0)
        model = TinyClassifier(optimizer="sgd", lr=lr)
        model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=lr)
        w0 = model.classifier.weight.detach().clone()
        x, y = random_classification_data(8)[:]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, model.classifier.weight)
        callbacks = [ShrinkCallback(plugins=[L2()], autoload=False)] if with_plugin else []
        cpu_trainer_ = pl.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        cpu_trainer_.fit(model, DataLoader(random_classification_data(8), batch_size=8))
        return w0, grad, model.classifier.weight.detach(), cpu_trainer_

    w0, g, w1, _ = one_step(False)
    torch.testing.assert_close(w1, w0 - lr * g)
    w0, g, w1, trainer = one_step(True)
    torch.testing.assert_close(w1, w0 - lr * (weight * g + 2 * c * w0))
    assert "l2" in trainer.callback_metrics and "shrink/task_loss" in trainer.callback_metrics
    assert trainer.callback_metrics["shrink/task_loss_weight"] == weight


def test_shrink_metrics_and_shrink_progress_bar_metrics_are_logged(tiny_module, tmp_path):
    trainer = cpu_trainer(
        callbacks=[Technique()], max_steps=3, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1
    )
    trainer.fit(tiny_module, loader())
    assert trainer.logged_metrics["counter/steps"] == 3.0
    assert trainer.progress_bar_metrics["counter/steps_seen"] == 3.0
    assert "counter/steps_seen" not in trainer.logged_metrics
    # A key that is both a metric and a progress-bar value is logged once, to both.
    assert trainer.progress_bar_metrics["counter/steps"] == 3.0


def test_metrics_without_a_logger_reach_callback_metrics_without_warnings(tiny_module, recwarn):
    trainer = cpu_trainer(callbacks=[Technique()], max_steps=3, logger=False)
    trainer.fit(tiny_module, loader())
    assert trainer.callback_metrics["counter/steps"] == 3.0
    assert not [w for w in recwarn if "no logger configured" in str(w.message)]


def test_technique_callback_brings_the_bridge_and_list_order_does_not_matter(tiny_module):
    technique = Technique()
    trainer = cpu_trainer(callbacks=[technique], max_steps=2)
    trainer.fit(tiny_module, loader())
    bridge = ShrinkCallback.find(trainer)
    assert bridge is not None and bridge.pluginmanager.get_plugin("counter") is technique.plugin
    assert technique.plugin.steps == 2

    # An explicit bridge listed before or after the technique gives the same result.
    for callbacks in ([ShrinkCallback(), Technique()], [Technique(), ShrinkCallback()]):
        trainer = cpu_trainer(callbacks=callbacks, max_steps=2)
        trainer.fit(TinyClassifier(), loader())
        technique = next(cb for cb in callbacks if isinstance(cb, Technique))
        assert technique.plugin.steps == 2
        assert sum(isinstance(cb, ShrinkCallback) for cb in trainer.callbacks) == 1


def test_two_instances_of_a_technique_get_distinct_names(tiny_module):
    a, b = Technique(), Technique(prefix="other")
    trainer = cpu_trainer(callbacks=[a, b], max_steps=1)
    trainer.fit(tiny_module, loader())
    pm = ShrinkCallback.find(trainer).pluginmanager
    assert pm.get_plugin("counter") is a.plugin and pm.get_plugin("counter-2") is b.plugin


def test_blocking_a_listed_technique_is_an_error(tiny_module):
    trainer = cpu_trainer(callbacks=[ShrinkCallback(block_plugins=["counter"]), Technique()], max_steps=1)
    with pytest.raises(PluginError, match="'counter' of Technique is blocked"):
        trainer.fit(tiny_module, loader())


def test_two_bridges_are_an_error(tiny_module):
    trainer = cpu_trainer(callbacks=[ShrinkCallback(), ShrinkCallback()], max_steps=1)
    with pytest.raises(ValueError, match="2 ShrinkCallback"):
        trainer.fit(tiny_module, loader())


def test_loss_plugins_refuse_manual_optimization(shrink_pluginmanager, cpu_trainer):
    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    class Term:
        @hookimpl
        def shrink_training_loss(self, loss):
            return {"t": loss * 0}

    shrink_pluginmanager.register(Term(), "term")
    with pytest.raises(PluginError, match=r"\['term'\] add loss terms.*automatic optimization"):
        cpu_trainer(max_steps=1).fit(Manual(), loader())


def test_model_is_plain_after_fit_and_a_second_fit_works(tiny_module):
    technique = Technique()
    trainer = cpu_trainer(callbacks=[technique], max_steps=2)
    trainer.fit(tiny_module, loader())
    assert "training_step" not in tiny_module.__dict__
    assert "on_load_checkpoint" not in tiny_module.__dict__
    copy.deepcopy(tiny_module)
    pickle.dumps(tiny_module)
    trainer = cpu_trainer(callbacks=[technique], max_steps=3)
    trainer.fit(tiny_module, loader())
    assert technique.plugin.steps == 5


def test_shrink_save_state_and_shrink_load_state_round_trip_through_a_resumed_fit(tmp_path):
    torch.manual_seed(0)
    first = Technique()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = cpu_trainer(callbacks=[first, ckpt], max_epochs=1, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), loader())
    assert first.plugin.steps == 8
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["lightning_shrink"] == {"counter": {"steps": 8}}

    torch.manual_seed(1)  # a differently initialized model: the checkpoint's weights must replace it
    model = TinyClassifier()
    fresh_weights = model.classifier.weight.detach().clone()
    resumed = Technique()
    trainer = cpu_trainer(callbacks=[resumed], max_epochs=2)
    trainer.fit(model, loader(), ckpt_path=tmp_path / "last.ckpt")
    plugin = resumed.plugin
    assert plugin.loaded_state == {"counter": {"steps": 8}}
    # Restored through the Callback's own checkpoint hook, after Lightning loaded the weights.
    torch.testing.assert_close(plugin.weights_at_load, saved["state_dict"]["classifier.weight"])
    assert not torch.equal(saved["state_dict"]["classifier.weight"], fresh_weights)
    assert plugin.steps == 16 and trainer.global_step == 16
    assert "on_load_checkpoint" not in model.__dict__


def test_test_with_ckpt_path_runs_setup_and_load_state(tmp_path, cpu_trainer, shrink_recorder):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = cpu_trainer(callbacks=[Technique(), ckpt], max_epochs=1, enable_checkpointing=True)
    model = TinyClassifier()
    trainer.fit(model, loader())
    shrink_recorder.clear()
    trainer.test(model, loader(), ckpt_path="last")
    setup = shrink_recorder.assert_called("shrink_setup", times=1)[0]
    assert setup.stage == "test"
    assert shrink_recorder.assert_called("shrink_configure_model", times=1)[0].stage == "test"
    loaded = shrink_recorder.assert_called("shrink_load_state", times=1)[0]
    assert loaded.state == {"counter": {"steps": 8}}
    shrink_recorder.assert_called("shrink_teardown", times=1)
