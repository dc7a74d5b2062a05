"""The hooks that a fit's lifecycle offers beyond the per-step ones, each in a real Trainer.fit:
registration names, the model-configured point, plugin parameter groups, after-backward, epochs,
the DDP communication hook, whole-checkpoint access, and the loss seam's opt-out."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_shrink import (
    PluginError,
    ShrinkCallback,
    ShrinkLossMixin,
    TechniqueCallback,
    TechniquePlugin,
    hookimpl,
)
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(random_classification_data(n), batch_size=batch_size)


class BuiltInConfigureModel(pl.LightningModule):
    """The model exists only after ``configure_model`` (Lightning's pattern for large models)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Marker:
    """Adds a buffer to the first Linear when the model is configured: a checkpoint that holds the
    buffer only loads (strictly) into a model that already has it."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.saw_layers: list[int] = []

    @hookimpl
    def shrink_configure_model(self, trainer, pl_module, stage):
        self.stages.append(stage)
        layers = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        self.saw_layers.append(len(layers))
        if "shrink_marker" not in dict(layers[0].named_buffers()):
            layers[0].register_buffer("shrink_marker", torch.tensor(7.0))
        if stage == "fit":
            assert not trainer.optimizers  # before configure_optimizers


class MarkerTechnique(TechniqueCallback):
    plugin_name = "marker"

    def make_plugin(self):
        return Marker()


def test_shrink_configure_model_sees_a_model_built_in_configure_model(tmp_path):
    technique = MarkerTechnique()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = BuiltInConfigureModel()
    trainer = cpu_trainer(callbacks=[technique, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, loader())
    assert technique.plugin.stages == ["fit"] and technique.plugin.saw_layers == [2]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "net.0.shrink_marker" in saved["state_dict"]

    # A fresh model resumed from the checkpoint: the hook runs before the weights load (strict
    # loading would fail on the buffer otherwise), and again for test(ckpt_path=...).
    resumed = MarkerTechnique()
    fresh = BuiltInConfigureModel()
    trainer = cpu_trainer(callbacks=[resumed], max_steps=10, max_epochs=2)
    trainer.fit(fresh, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step > 8 and resumed.plugin.saw_layers == [2]
    trainer.test(BuiltInConfigureModel(), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.plugin.stages == ["fit", "test"]
    assert trainer.strategy.__dict__.get("setup") is None  # the interception is gone after the stage


class Scale(TechniquePlugin):
    """Trains one tensor of its own: the loss term ``(scale - 3)^2``."""

    default_name = "scale"

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__(config=None)
        self.lr = lr
        self.scale = torch.zeros((), requires_grad=True)

    @hookimpl
    def shrink_optimizer_param_groups(self):
        return [{"params": [self.scale], "lr": self.lr, "weight_decay": 0.0}]

    @hookimpl
    def shrink_training_loss(self):
        return {self.key("penalty"): (self.scale - 3.0) ** 2}


def test_shrink_optimizer_param_groups_trains_plugin_tensors_with_their_own_lr():
    plugin = Scale(lr=0.25)
    model = TinyClassifier(optimizer="sgd", lr=0.01)
    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[plugin])], max_steps=1)
    trainer.fit(model, loader())
    group = trainer.optimizers[0].param_groups[-1]
    assert group["params"] == [plugin.scale] and group["lr"] == 0.25 and group["weight_decay"] == 0.0
    # one SGD step of d/ds (s - 3)^2 = -6 at s = 0 with the group's own lr
    assert float(plugin.scale) == pytest.approx(0.25 * 6.0)
    assert "scale/penalty" in trainer.callback_metrics


def test_shrink_optimizer_param_groups_follow_the_lr_schedule():
    class Warmup(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 4)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    plugin = Scale(lr=1.0)
    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[plugin])], max_steps=2)
    trainer.fit(Warmup(), loader())
    groups = trainer.optimizers[0].param_groups
    # after 2 steps the schedule factor is 3/4 for every group, relative to its own lr
    assert groups[0]["lr"] == pytest.approx(0.1 * 3 / 4)
    assert groups[-1]["lr"] == pytest.approx(1.0 * 3 / 4)


def test_shrink_optimizer_param_groups_errors_name_the_plugin():
    class NonLeaf:
        @hookimpl
        def shrink_optimizer_param_groups(self):
            return [{"params": [torch.ones(2, requires_grad=True) * 2]}]

    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[NonLeaf()])], max_steps=1)
    with pytest.raises(PluginError, match=r"NonLeaf.*leaf tensors with requires_grad=True"):
        trainer.fit(TinyClassifier(), loader())

    class NoOptimizer(TinyClassifier):
        def configure_optimizers(self):
            return None

    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[Scale()])], max_steps=1)
    with pytest.raises(PluginError, match="configures no optimizer"):
        trainer.fit(NoOptimizer(), loader())


def test_shrink_optimizer_param_groups_resume_with_their_optimizer_state(tmp_path):
    def run(ckpt_path=None, max_steps=8):
        plugin = Scale(lr=0.1)
        model = TinyClassifier(optimizer="adamw", lr=0.01)
        callbacks = [ShrinkCallback(plugins=[plugin]), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        trainer = cpu_trainer(
            callbacks=callbacks, max_steps=max_steps, max_epochs=2, enable_checkpointing=True
        )
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return trainer

    trainer = run()
    state = trainer.optimizers[0].state_dict()
    assert len(state["param_groups"]) == 2
    trainer = run(ckpt_path=tmp_path / "last.ckpt", max_steps=9)
    restored = trainer.optimizers[0].state_dict()
    # the plugin's group kept its Adam state across the resume: 8 steps before, 1 after
    assert float(restored["state"][len(restored["param_groups"][0]["params"])]["step"]) == 9


def test_shrink_after_backward_fires_every_micro_batch_with_gradients(shrink_pluginmanager, cpu_trainer):
    norms: list[float] = []

    class GradProbe:
        @hookimpl
        def shrink_after_backward(self, pl_module):
            norms.append(float(pl_module.classifier.weight.grad.norm()))

    shrink_pluginmanager.register(GradProbe())
    trainer = cpu_trainer(accumulate_grad_batches=4, max_epochs=1)
    trainer.fit(TinyClassifier(), loader(n=128))  # 16 batches, 4 steps
    assert len(norms) == 16 and trainer.global_step == 4
    assert all(n > 0 for n in norms)


def test_shrink_train_epoch_start_and_shrink_train_epoch_end(shrink_recorder, cpu_trainer):
    trainer = cpu_trainer(max_epochs=3, max_steps=-1)
    trainer.fit(TinyClassifier(), loader(n=16))
    starts = shrink_recorder.assert_called("shrink_train_epoch_start", times=3)
    ends = shrink_recorder.assert_called("shrink_train_epoch_end", times=3)
    assert [c.trainer is trainer for c in starts + ends] == [True] * 6
    names = [n for n in shrink_recorder.names() if n.startswith("shrink_train_")]
    assert names[:4] == [
        "shrink_train_epoch_start",
        "shrink_train_batch_start",
        "shrink_train_batch_start",
        "shrink_train_epoch_end",
    ]


class CountingCommHook:
    """Supplies a DDP communication hook that all-reduces as DDP would, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def hook(self, state, bucket):
        self.calls += 1
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    @hookimpl
    def shrink_ddp_comm_hook(self):
        return (None, self.hook)


def _ddp_trainer(callbacks, **strategy_kwargs):
    from lightning.pytorch.strategies import DDPStrategy

    return cpu_trainer(callbacks=callbacks, strategy=DDPStrategy(**strategy_kwargs), devices=1, max_steps=2)


@pytest.fixture
def _single_process_group():
    # Lightning's DDP set-up writes MASTER_PORT, WORLD_SIZE, LOCAL_RANK... into os.environ of this
    # process; later multi-process tests must not inherit them.
    environ = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.usefixtures("_single_process_group")
def test_shrink_ddp_comm_hook_is_registered_under_ddp():
    supplier = CountingCommHook()
    trainer = _ddp_trainer([ShrinkCallback(plugins=[supplier])])
    trainer.fit(TinyClassifier(), loader())
    assert supplier.calls >= 2  # one bucket or more per backward


@pytest.mark.usefixtures("_single_process_group")
def test_shrink_ddp_comm_hook_conflicts_are_refused():
    trainer = _ddp_trainer([ShrinkCallback(plugins=[CountingCommHook(), CountingCommHook()])])
    with pytest.raises(PluginError, match="each supply a DDP communication hook"):
        trainer.fit(TinyClassifier(), loader())

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    trainer = _ddp_trainer(
        [ShrinkCallback(plugins=[CountingCommHook()])], ddp_comm_hook=default_hooks.allreduce_hook
    )
    with pytest.raises(PluginError, match="the strategy registers its own"):
        trainer.fit(TinyClassifier(), loader())


class DropClassifier:
    """Keeps ``classifier.weight`` out of the checkpoint's state dict, in an entry of its own."""

    @hookimpl
    def shrink_save_checkpoint(self, checkpoint):
        checkpoint["kept_aside"] = checkpoint["state_dict"].pop("classifier.weight")

    @hookimpl
    def shrink_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"]["classifier.weight"] = checkpoint.pop("kept_aside")


def test_shrink_save_checkpoint_and_shrink_load_checkpoint_edit_the_whole_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = cpu_trainer(
        callbacks=[ShrinkCallback(plugins=[DropClassifier()]), checkpoint],
        max_steps=3,
        enable_checkpointing=True,
    )
    trainer.fit(model, loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "classifier.weight" not in saved["state_dict"] and "kept_aside" in saved
    torch.testing.assert_close(saved["kept_aside"], model.classifier.weight.detach())

    torch.manual_seed(1)
    fresh = TinyClassifier()
    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[DropClassifier()])], max_steps=3)
    trainer.validate(fresh, loader(), ckpt_path=tmp_path / "last.ckpt")  # strict loading succeeds
    torch.testing.assert_close(fresh.classifier.weight.detach(), saved["kept_aside"])


class Penalty:
    @hookimpl
    def shrink_training_loss(self, pl_module):
        return {"penalty/l2": 0.5 * (pl_module.classifier.weight**2).sum()}


class MixinModel(ShrinkLossMixin, TinyClassifier):
    def training_step(self, batch, batch_idx):
        return self.shrink_loss(super().training_step(batch, batch_idx), batch, batch_idx)


def test_shrink_loss_mixin_adds_the_terms_without_patching_training_step():
    model = MixinModel()
    seen = {}

    class Spy(Penalty):
        @hookimpl
        def shrink_fit_start(self, pl_module):
            seen["patched"] = "training_step" in pl_module.__dict__

    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[Spy()])], max_steps=2)
    trainer.fit(model, loader())
    assert seen == {"patched": False}
    assert float(trainer.callback_metrics["penalty/l2"]) > 0
    assert "training_step" not in model.__dict__
    # Outside a Trainer the call is the identity.
    loss = torch.tensor(1.5)
    assert MixinModel().shrink_loss(loss, None, 0) is loss


def test_shrink_loss_mixin_that_forgets_the_call_is_an_error():
    class Forgets(ShrinkLossMixin, TinyClassifier):
        pass

    trainer = cpu_trainer(callbacks=[ShrinkCallback(plugins=[Penalty()])], max_steps=2)
    with pytest.raises(PluginError, match=r"did not return self.shrink_loss"):
        trainer.fit(Forgets(), loader())


def test_bridge_added_by_a_technique_is_set_up_once_per_stage(shrink_pluginmanager):
    # No bridge is listed: the technique adds one and sets it up itself, so the result does not
    # depend on whether Lightning also visits the appended callback in the same round.
    from lightning_shrink.testing.plugin import HookRecorder

    recorder = HookRecorder(shrink_pluginmanager)
    technique = MarkerTechnique()
    trainer = cpu_trainer(callbacks=[technique], max_steps=1)
    bridge = ShrinkCallback(pluginmanager=shrink_pluginmanager)
    trainer.callbacks.append(bridge)  # listed after the technique
    trainer.fit(TinyClassifier(), loader())
    recorder.assert_called("shrink_setup", times=1)
    recorder.assert_called("shrink_configure_model", times=1)
    recorder.finish_recording()


def test_shrink_plugin_registered_gives_every_plugin_its_name(shrink_pluginmanager):
    seen: list[tuple[str, bool]] = []

    class Watcher:
        @hookimpl
        def shrink_plugin_registered(self, plugin, plugin_name, pluginmanager):
            seen.append((plugin_name, plugin is self))

    shrink_pluginmanager.register(Watcher(), "watcher")
    assert ("core", False) in seen and ("watcher", True) in seen  # historic: earlier plugins too
    first, second = MarkerTechnique(), MarkerTechnique()
    named = MarkerTechnique(name="special")
    trainer = cpu_trainer(
        callbacks=[first, second, named, ShrinkCallback(pluginmanager=shrink_pluginmanager)], max_steps=1
    )
    trainer.fit(TinyClassifier(), loader())
    assert [n for n, _ in seen if n.startswith(("marker", "special"))] == ["marker", "marker-2", "special"]

    scale = Scale()
    shrink_pluginmanager.register(scale, "scale-3")
    assert scale.name == "scale-3" and scale.key("x") == "scale-3/x"


def test_technique_names_are_validated():
    with pytest.raises(TypeError, match="MarkerTechnique: `name` must be a str"):
        MarkerTechnique(name=3)
    with pytest.raises(ValueError, match="without '/'"):
        MarkerTechnique(name="a/b")
    trainer = cpu_trainer(callbacks=[MarkerTechnique(name="same"), MarkerTechnique(name="same")], max_steps=1)
    with pytest.raises(PluginError, match="another plugin is registered under that name"):
        trainer.fit(TinyClassifier(), loader())
