"""DifferentialPrivacy: accounting, clipping, Poisson sampling, refusals, budget stop, BERT."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from opacus.accountants import create_accountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from privacy_reference import per_example_reference
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_shrink import DifferentialPrivacy, ShrinkCallback, hookimpl, report
from lightning_shrink.privacy import PrivacyConfig, PrivacyError
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)

N, BATCH = 128, 16  # sample rate 1/8


def loader(n: int = N, batch_size: int = BATCH) -> DataLoader:
    return DataLoader(random_classification_data(n), batch_size=batch_size, shuffle=True)


class Recorder:
    """Records, after the privacy plugin ran, each step's batch, gradients and epsilon."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.summed: list[dict[str, torch.Tensor]] = []
        self.epsilons: list[float] = []

    @hookimpl
    def shrink_train_batch_start(self, batch: Any) -> None:
        self.batches.append(copy.deepcopy(batch))

    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})
        self.summed.append({n: p.summed_grad.detach().clone() for n, p in pl_module.named_parameters()})

    @hookimpl
    def shrink_after_optimizer_step(self, trainer: pl.Trainer) -> None:
        dp = next(cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy))
        self.epsilons.append(dp.epsilon)


def fit(
    model: pl.LightningModule,
    data: Any,
    dp: DifferentialPrivacy,
    recorder: Any = None,
    callbacks_extra: tuple = (),
    **kw: Any,
):
    callbacks = [
        dp,
        *callbacks_extra,
        *([ShrinkCallback(plugins=[recorder])] if recorder is not None else []),
    ]
    trainer = cpu_trainer(callbacks=callbacks, **kw)
    trainer.fit(model, data)
    return trainer


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(noise_multiplier=1.0, target_epsilon=3.0, epochs=1), "exactly one of `noise_multiplier`"),
        (dict(), "neither was given"),
        (dict(target_epsilon=3.0), "exactly one of `epochs` and `steps`"),
        (dict(target_epsilon=3.0, epochs=1, steps=5), "exactly one of `epochs` and `steps`"),
        (dict(noise_multiplier=1.0, epochs=2), "cannot be combined with `noise_multiplier`"),
        (dict(noise_multiplier=1.0, max_grad_norm=0.0), r"`max_grad_norm` must be a number in \(0, inf\)"),
        (dict(noise_multiplier=1.0, max_grad_norm=-1), r"`max_grad_norm` must be a number in \(0, inf\)"),
        (dict(noise_multiplier=-0.5), r"`noise_multiplier` must be a number in \[0, inf\)"),
        (dict(noise_multiplier=math.nan), "`noise_multiplier` must be finite"),
        (dict(target_epsilon=0.0, steps=3), r"`target_epsilon` must be a number in \(0, inf\)"),
        (dict(target_epsilon=1.0, steps=0), "`steps` must be >= 1 optimizer steps"),
        (dict(target_epsilon=1.0, steps=1.5), r"`steps` as a float is a fraction .* \(0, 1\]"),
        (dict(target_epsilon=1.0, epochs=0), r"`epochs` must be an int in \[1, inf\)"),
        (dict(noise_multiplier=1.0, delta=1.5), r"`delta` must be a number in \(0, 1\)"),
        (dict(noise_multiplier=1.0, accountant="moments"), "`accountant` must be one of"),
        (dict(noise_multiplier=1.0, grad_sample_mode="fast"), "`grad_sample_mode` must be one of"),
        (dict(noise_multiplier=1.0, loss_reduction="max"), "`loss_reduction` must be one of"),
    ],
)
def test_bad_values_are_value_errors_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"DifferentialPrivacy: .*{match}"):
        DifferentialPrivacy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(noise_multiplier="1"), "`noise_multiplier` must be a number or None, got '1'"),
        (dict(target_epsilon=1.0, epochs=1.5), "`epochs` must be an int or None, got 1.5"),
        (dict(noise_multiplier=1.0, max_grad_norm=True), "`max_grad_norm` must be a number, got True"),
        (dict(noise_multiplier=1.0, poisson_sampling="yes"), "`poisson_sampling` must be a bool, got 'yes'"),
        (dict(noise_multiplier=1.0, batch_first=1), "`batch_first` must be a bool, got 1"),
    ],
)
def test_bad_types_are_type_errors_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=f"DifferentialPrivacy: {match}"):
        DifferentialPrivacy(**kwargs)


def test_the_configuration_is_a_frozen_dataclass_exposed_by_the_callback() -> None:
    dp = DifferentialPrivacy(target_epsilon=8, epochs=3, max_grad_norm=2)
    assert dp.config == PrivacyConfig(target_epsilon=8.0, epochs=3, max_grad_norm=2.0)
    assert isinstance(dp.config.target_epsilon, float) and dp.config.accountant == "prv"
    with pytest.raises(dataclasses.FrozenInstanceError):
        dp.config.max_grad_norm = 10.0  # type: ignore[misc]
    assert dp.plugin.config is dp.config
    assert repr(dp) == (
        "DifferentialPrivacy(target_epsilon=8.0, epochs=3, delta=None, max_grad_norm=2.0, accountant='prv', "
        "grad_sample_mode='auto', batch_first=True)"
    )


def test_missing_opacus_is_a_clear_import_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if it were not installed
    # `import lightning_shrink` works without it: re-import the package from scratch (monkeypatch
    # puts the original modules back afterwards).
    ours = [n for n in sys.modules if n == "lightning_shrink" or n.startswith("lightning_shrink.")]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    try:
        fresh = importlib.import_module("lightning_shrink")
        with pytest.raises(ImportError, match=r'pip install "lightning-shrink\[privacy\]"'):
            fresh.DifferentialPrivacy(noise_multiplier=1.0)
    finally:  # no freshly imported copy may outlive the test (other tests check class identity)
        for name in [n for n in sys.modules if n.split(".")[0] == "lightning_shrink" and n not in ours]:
            del sys.modules[name]


def test_delta_of_one_over_n_fails_before_the_first_step() -> None:
    model = TinyClassifier()
    before = copy.deepcopy(model.state_dict())
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1.0 / N, accountant="rdp")
    with pytest.raises(PrivacyError, match=r"`delta`=0.0078125 must be below 1/N"):
        fit(model, loader(), dp, max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
@pytest.mark.filterwarnings("ignore:.*GDP accounting is experimental")
def test_epsilon_equals_opacus_accountant_every_step(accountant: str) -> None:
    recorder = Recorder()
    if accountant == "gdp":
        with pytest.warns(UserWarning, match="'gdp' accountant is asymptotic"):
            dp = DifferentialPrivacy(noise_multiplier=1.1, delta=1e-3, accountant=accountant)
    else:
        dp = DifferentialPrivacy(noise_multiplier=1.1, delta=1e-3, accountant=accountant)
    trainer = fit(TinyClassifier(), loader(), dp, recorder, max_steps=4)
    reference = create_accountant(accountant)
    expected = []
    for _ in range(4):
        reference.step(noise_multiplier=1.1, sample_rate=BATCH / N)
        expected.append(reference.get_epsilon(delta=1e-3))
    assert recorder.epsilons == expected
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(expected[-1], rel=1e-6)
    assert trainer.progress_bar_metrics["privacy/epsilon"] == pytest.approx(expected[-1], rel=1e-6)
    rows = {r.metric: r.value for r in report(trainer).select(technique="privacy")}
    assert rows["epsilon"] == expected[-1]
    assert rows["delta"] == 1e-3
    assert rows["accountant"] == accountant
    assert rows["steps"] == 4
    assert rows["sample rate"] == BATCH / N


def test_data_is_poisson_sampled() -> None:
    recorder = Recorder()
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer = fit(TinyClassifier(), loader(), dp, recorder, max_epochs=1)
    # One epoch is 1/q = 8 Poisson batches of random size (expected 16).
    sizes = [len(b[1]) for b in recorder.batches]
    assert len(sizes) == N // BATCH
    assert len(set(sizes)) > 1
    assert dp.plugin.steps == len(sizes)
    assert isinstance(trainer.train_dataloader.batch_sampler.batch_sampler, UniformWithReplacementSampler)


def test_without_poisson_sampling_the_loader_is_kept_and_the_guarantee_disclaimed() -> None:
    data = loader()
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", poisson_sampling=False)
    with pytest.warns(UserWarning, match="NOT a formal guarantee"):
        trainer = fit(TinyClassifier(), data, dp, max_steps=2)
    # the loader's own batches, counted (every layer is checked against each batch's examples)
    assert trainer.train_dataloader.batch_sampler.batch_sampler is data.batch_sampler
    rows = {r.metric: r.value for r in report(trainer).select(technique="privacy")}
    assert rows["guarantee"] == "none: Poisson sampling was off"


# ---------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_every_per_sample_gradient_is_clipped_before_noise(mode: str) -> None:
    model = TinyClassifier()
    initial = copy.deepcopy(model)
    recorder = Recorder()
    clip = 0.05
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, accountant="rdp"
    )
    fit(model, loader(), dp, recorder, max_steps=1)
    x, y = recorder.batches[0]
    norms, clipped = per_example_reference(initial, x, y, clip)
    assert (norms > clip).all()  # every example was clipped: the bound is what is being tested
    torch.testing.assert_close(dp.plugin.last_per_sample_norms, norms, rtol=1e-4, atol=1e-6)
    # Each example's clipped gradient has norm <= max_grad_norm...
    assert (norms * (clip / (norms + 1e-6)).clamp(max=1.0) <= clip).all()
    for name, expected_sum in clipped.items():
        # ...the plugin's sum before noise is exactly the sum of the clipped examples...
        torch.testing.assert_close(recorder.summed[0][name], expected_sum, rtol=1e-4, atol=1e-6)
        # ...and the gradient the optimizer steps on is that sum over the expected batch size.
        torch.testing.assert_close(recorder.grads[0][name], expected_sum / BATCH, rtol=1e-4, atol=1e-7)
    total = torch.cat([g.flatten() for g in recorder.summed[0].values()]).norm()
    assert total <= len(x) * clip * (1 + 1e-5)


def test_noise_has_the_calibrated_standard_deviation() -> None:
    recorder = Recorder()
    dp = DifferentialPrivacy(noise_multiplier=2.0, max_grad_norm=0.5, accountant="rdp")
    fit(TinyClassifier(hidden=64), loader(), dp, recorder, max_steps=1)
    noise = torch.cat(
        [(recorder.grads[0][n] * BATCH - recorder.summed[0][n]).flatten() for n in recorder.grads[0]]
    )
    assert noise.numel() > 5000
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.05)


# ---------------------------------------------------------------------------- refusals


class ManualModule(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class FunctionalBypass(TinyClassifier):
    """Uses the classifier's weight outside the layer's forward: Opacus' hooks never see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.classifier.weight, self.classifier.bias)


class WithBatchNorm(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.classifier = nn.Linear(32, 2)


class NoOptimizer(TinyClassifier):
    def configure_optimizers(self) -> None:
        return None


class Stream(IterableDataset):
    def __iter__(self):
        data = random_classification_data(32)
        return iter([data[i] for i in range(32)])


@pytest.mark.parametrize(
    ("model", "data", "trainer_kwargs", "match"),
    [
        (ManualModule, loader, {}, "manual optimization"),
        (WithBatchNorm, loader, {}, r"net.1 \(BatchNorm1d\) normalizes with batch statistics"),
        (TinyClassifier, loader, dict(accumulate_grad_batches=2), "accumulate_grad_batches=2"),
        (TinyClassifier, lambda: DataLoader(Stream(), batch_size=8), {}, "IterableDataset"),
        (NoOptimizer, loader, {}, "configures no optimizer"),
    ],
    ids=["manual", "batchnorm", "accumulation", "iterable", "no-optimizer"],
)
def test_runs_that_cannot_be_private_fail_before_the_first_step(model, data, trainer_kwargs, match) -> None:
    module = model()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(PrivacyError, match=match):
        fit(
            module,
            data(),
            DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"),
            max_steps=2,
            **trainer_kwargs,
        )
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_optimizer_missing_trainable_parameters_is_refused() -> None:
    class Partial(TinyClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.classifier.parameters(), lr=0.1)

    with pytest.raises(
        PrivacyError, match=r"trainable parameters \['net.0.weight'.* are not in the optimizer"
    ):
        fit(Partial(), loader(), DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), max_steps=1)


def test_functional_bypass_of_the_per_sample_engine_fails_before_any_update() -> None:
    module = FunctionalBypass()
    before = copy.deepcopy(module.state_dict())
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="hooks", accountant="rdp")
    with pytest.raises(PrivacyError, match="got no per-sample gradient"):
        fit(module, loader(), dp, max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert dp.plugin.steps == 0


def test_stepping_around_the_dp_optimizer_is_refused() -> None:
    class SwapBack(pl.Callback):
        """Puts the original optimizer back after DifferentialPrivacy took it over."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.strategy.optimizers = [trainer.optimizers[0].original_optimizer]

    module = TinyClassifier()
    before = copy.deepcopy(module.state_dict())
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer = cpu_trainer(callbacks=[dp, SwapBack()], max_steps=2)
    # torch runs the original optimizer's step pre-hooks (the plugin's guard) before the closure.
    with pytest.raises(PrivacyError, match="not clipped and noised"):
        trainer.fit(module, loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_learning_rate_scheduler_still_drives_the_wrapped_optimizer() -> None:
    class Scheduled(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

    class LrLog(pl.Callback):
        lrs: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    log = LrLog()
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer = cpu_trainer(callbacks=[dp, log], max_epochs=2)
    trainer.fit(Scheduled(), loader())
    assert dp.plugin.steps == 16
    assert log.lrs[0] == 0.1 and log.lrs[-1] == pytest.approx(0.05)


def test_original_optimizer_refuses_unprivatized_steps() -> None:
    class DirectStep(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
        ) -> None:
            trainer.optimizers[0].original_optimizer.step()

    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer = cpu_trainer(callbacks=[dp, DirectStep()], max_steps=1)
    with pytest.raises(PrivacyError, match="not clipped and noised"):
        trainer.fit(TinyClassifier(), loader())


# ---------------------------------------------------------------------------- budget


def test_budget_stop_before_exceeding_target_epsilon() -> None:
    dp = DifferentialPrivacy(target_epsilon=2.0, steps=6, delta=1e-3, accountant="rdp")
    recorder = Recorder()
    with pytest.warns(UserWarning, match=r"stopping after step \d+: epsilon=.*> target_epsilon=2.0"):
        trainer = fit(TinyClassifier(), loader(), dp, recorder, max_epochs=5)  # Lightning plans 40 steps
    plugin = dp.plugin
    assert plugin.max_steps is not None and plugin.max_steps >= 6
    assert trainer.global_step == plugin.steps == plugin.max_steps
    assert max(recorder.epsilons) == dp.epsilon <= 2.0
    assert plugin.epsilon_after(1) > 2.0
    assert plugin.stop_reason is not None and f"stopping after step {plugin.steps}:" in plugin.stop_reason


def test_target_epsilon_already_spent_fails_at_fit_start() -> None:
    dp = DifferentialPrivacy(target_epsilon=2.0, steps=6, delta=1e-3, accountant="rdp")
    fit(TinyClassifier(), loader(), dp, max_epochs=5)
    with pytest.raises(PrivacyError, match="already spent"):
        fit(TinyClassifier(), loader(), dp, max_epochs=1)


def test_checkpoint_resume_continues_the_accounting(tmp_path) -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3, accountant="rdp")
    trainer = fit(TinyClassifier(), loader(), dp, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "dp.ckpt")
    resumed = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3, accountant="rdp")
    trainer = cpu_trainer(callbacks=[resumed], max_epochs=2)
    trainer.fit(TinyClassifier(), loader(), ckpt_path=tmp_path / "dp.ckpt")
    reference = create_accountant("rdp")
    reference.history = [(1.0, BATCH / N, 16)]
    assert trainer.global_step == resumed.plugin.steps == 16
    assert resumed.epsilon == reference.get_epsilon(delta=1e-3)


@pytest.fixture(scope="module")
def private_checkpoint(tmp_path_factory) -> Any:
    """A checkpoint after two DP steps: noise 1, clip 1, delta 1e-3, rdp, batch 16 of 128 examples."""
    path = tmp_path_factory.mktemp("dp") / "dp.ckpt"
    trainer = fit(TinyClassifier(), loader(), DifferentialPrivacy(**RESUMED), max_steps=2)
    trainer.save_checkpoint(path)
    return path


RESUMED = dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, accountant="rdp")


@pytest.mark.parametrize(
    ("changes", "data", "match"),
    [
        (dict(noise_multiplier=2.0), loader(), r"noise_multiplier 1.0 -> 2.0"),
        (dict(max_grad_norm=0.5), loader(), r"max_grad_norm \(clipping norm\) 1.0 -> 0.5"),
        (dict(delta=1e-4), loader(), r"delta 0.001 -> 0.0001"),
        (dict(accountant="prv"), loader(), r"accountant 'rdp' -> 'prv'"),
        ({}, loader(batch_size=8), r"sample rate \(batch size x processes / examples\) 0.125 -> 0.0625"),
        ({}, loader(n=96, batch_size=12), r"number of training examples 128 -> 96"),
        (dict(target_epsilon=5.0, steps=10, noise_multiplier=None), loader(), r"noise_multiplier 1.0 -> "),
    ],
    ids=["noise", "clipping", "delta", "accountant", "batch-size", "dataset", "budget"],
)
def test_resume_with_a_changed_privacy_configuration_is_refused_naming_the_change(
    private_checkpoint, changes: dict, data: DataLoader, match: str
) -> None:
    resumed = DifferentialPrivacy(**{**RESUMED, **changes})
    trainer = cpu_trainer(callbacks=[resumed], max_steps=4)
    with pytest.raises(PrivacyError, match=f"another privacy configuration than this run: .*{match}"):
        trainer.fit(TinyClassifier(), data, ckpt_path=private_checkpoint)
    assert resumed.plugin.steps == 2  # the checkpoint's account, nothing added


def test_resume_of_a_checkpoint_trained_without_privacy_is_refused(tmp_path) -> None:
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(TinyClassifier(), loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    dp = DifferentialPrivacy(**RESUMED)
    with pytest.raises(
        PrivacyError, match=r"checkpoint has taken 3 optimizer step\(s\), of which the privacy"
    ):
        cpu_trainer(callbacks=[dp], max_steps=5).fit(
            TinyClassifier(), loader(), ckpt_path=tmp_path / "plain.ckpt"
        )


def test_planned_steps_as_a_fraction_of_the_run() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    dp = DifferentialPrivacy(target_epsilon=2.0, steps=1.0, delta=1e-3, accountant="rdp")
    trainer = fit(TinyClassifier(), loader(), dp, max_steps=6)
    expected = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-3, sample_rate=BATCH / N, steps=6, accountant="rdp"
    )
    assert dp.plugin.noise_multiplier == pytest.approx(expected)
    assert trainer.global_step == dp.plugin.steps == 6 <= dp.plugin.max_steps
    assert dp.epsilon <= 2.0


def test_one_differential_privacy_per_trainer() -> None:
    second = DifferentialPrivacy(noise_multiplier=2.0, accountant="rdp", name="dp2")
    with pytest.raises(
        PrivacyError, match="2 DifferentialPrivacy callbacks in one Trainer; one DP-SGD mechanism"
    ):
        fit(
            TinyClassifier(), loader(), DifferentialPrivacy(**RESUMED), callbacks_extra=(second,), max_steps=1
        )


def test_a_skipped_training_step_on_a_non_empty_batch_is_refused() -> None:
    class SkipsSecond(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    dp = DifferentialPrivacy(**RESUMED)
    with pytest.raises(
        PrivacyError, match=r"no per-sample gradient was computed \(training_step returned None"
    ):
        fit(SkipsSecond(), loader(), dp, max_steps=3)
    assert dp.plugin.steps == 1


# ---------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("mode", ["auto", "hooks"])
def test_tiny_bert_trains_privately(mode: str) -> None:
    model = TinyTransformerClassifier(tiny_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode=mode, accountant="rdp")
    trainer = fit(model, token_dataloader(n=64, batch_size=8), dp, max_steps=2)
    assert dp.plugin.grad_sample_mode == ("ghost" if mode == "auto" else "hooks")
    assert dp.plugin.steps == trainer.global_step == 2
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("position_embeddings" in k for k in changed)
    assert dp.plugin.last_per_sample_norms is not None and dp.plugin.last_per_sample_norms.shape[0] > 1
    # the model is plain again: no per-sample attributes, no hooks
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_ghost_clipping_equals_opacus_hooks_on_bert() -> None:
    sums = {}
    for mode in ("hooks", "ghost"):
        pl.seed_everything(3)
        recorder = Recorder()
        dp = DifferentialPrivacy(
            noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode=mode, accountant="rdp"
        )
        fit(
            TinyTransformerClassifier(tiny_bert),
            token_dataloader(n=64, batch_size=8),
            dp,
            recorder,
            max_steps=1,
        )
        sums[mode] = (recorder.summed[0], dp.plugin.last_per_sample_norms)
    torch.testing.assert_close(sums["ghost"][1], sums["hooks"][1], rtol=1e-4, atol=1e-5)
    for name, value in sums["hooks"][0].items():
        torch.testing.assert_close(sums["ghost"][0][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ghost_mode_refuses_unsupported_layers() -> None:
    class WithConv(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.conv(x.unsqueeze(1)).squeeze(1))

    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost", accountant="rdp")
    with pytest.raises(
        PrivacyError, match=r"no ghost clipping for the trainable layers \['conv \(Conv1d\)'\]"
    ):
        fit(WithConv(), loader(), dp, max_steps=1)
    auto = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    fit(WithConv(), loader(), auto, max_steps=1)
    assert auto.plugin.grad_sample_mode == "hooks"
    assert math.isfinite(auto.epsilon)


# ---------------------------------------------------------------------------- composition


def test_composes_with_distillation_and_pruning_and_warns_about_the_teacher() -> None:
    from lightning_shrink import GradualMagnitudePruning, KnowledgeDistillation

    sums = {}
    for mode in ("hooks", "ghost"):
        pl.seed_everything(0)
        teacher = TinyClassifier()
        recorder = Recorder()
        dp = DifferentialPrivacy(
            noise_multiplier=0.0, max_grad_norm=0.1, grad_sample_mode=mode, accountant="rdp"
        )
        extra = (
            KnowledgeDistillation(teacher),
            GradualMagnitudePruning(target_sparsity=0.5, end_step=2, frequency=1),
        )
        model = TinyClassifier()
        with pytest.warns(UserWarning, match="teacher did not see the private training data"):
            trainer = fit(model, loader(), dp, recorder, callbacks_extra=extra, max_steps=3)
        sums[mode] = recorder.summed[0]
        assert dp.plugin.steps == 3
        # pruning's masks act after the noise (privacy runs first): the pruned weights stay exactly zero
        assert trainer.callback_metrics["pruning/sparsity"].item() == pytest.approx(0.5, abs=0.01)
        pruned = [p for n, p in model.named_parameters() if n.endswith("weight") and n != "classifier.weight"]
        zeros = sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned)
        assert zeros == pytest.approx(0.5, abs=0.01)
    # the distillation term goes through per-example clipping identically in both engines
    for name, value in sums["hooks"].items():
        torch.testing.assert_close(sums["ghost"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_left_in_eval_mode_is_still_clipped_or_refused() -> None:
    # transformers' from_pretrained returns a model in eval mode, and Lightning keeps it so.
    model = TinyTransformerClassifier(lambda: tiny_bert().eval())
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    fit(model, token_dataloader(n=64, batch_size=8), dp, max_steps=2)
    assert dp.plugin.grad_sample_mode == "ghost" and dp.plugin.steps == 2
    hooks = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode="hooks")
    with pytest.raises(PrivacyError, match=r"are in eval mode, and Opacus' per-sample hooks skip"):
        fit(
            TinyTransformerClassifier(lambda: tiny_bert().eval()), token_dataloader(n=64, batch_size=8), hooks
        )
