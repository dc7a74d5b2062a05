"""DifferentialPrivacy on what a model's layers see: time-major inputs, empty Poisson batches,
fake-quantized layers, parameters no per-layer rule covers, models built in ``configure_model``.

Per-example gradients are compared with a ``torch.func`` reference (``vmap`` over examples of
``grad`` of each example's own loss), computed on a copy of the model before the step."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from privacy_reference import per_example_reference
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_shrink import DifferentialPrivacy, QuantizationAwareTraining, ShrinkCallback, hookimpl
from lightning_shrink.privacy import PrivacyError
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)

ENGINES = ["ghost", "hooks"]


class Recorder:
    """Records each batch, and the clipped sums and gradients DP leaves before the optimizer steps."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.summed: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.after_backward: list[list[torch.Tensor | None]] = []

    @hookimpl
    def shrink_train_batch_start(self, batch: Any) -> None:
        self.batches.append(copy.deepcopy(batch))

    @hookimpl
    def shrink_after_backward(self, pl_module: pl.LightningModule) -> None:
        self.after_backward.append([p.grad for p in pl_module.parameters()])

    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        self.summed.append({n: p.summed_grad.clone() for n, p in pl_module.named_parameters()})
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def fit(
    model: pl.LightningModule, data: DataLoader, dp: DifferentialPrivacy, *extra: Any, **kw: Any
) -> Recorder:
    recorder = Recorder()
    trainer = cpu_trainer(callbacks=[dp, *extra, ShrinkCallback(plugins=[recorder])], **kw)
    trainer.fit(model, data)
    return recorder


def reference(model: nn.Module, batch: Any, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example gradient norms and the clipped sum, by ``torch.func`` over the batch's examples."""
    x, y = batch
    return per_example_reference(model, x, y, clip)


def assert_matches_reference(dp: DifferentialPrivacy, recorder: Recorder, initial: nn.Module) -> None:
    norms, clipped = reference(initial, recorder.batches[0], dp.config.max_grad_norm)
    assert (norms > dp.config.max_grad_norm).any()  # clipping is exercised
    torch.testing.assert_close(dp.plugin.last_per_sample_norms, norms, rtol=1e-4, atol=1e-6)
    for name, expected in clipped.items():
        torch.testing.assert_close(recorder.summed[0][name], expected, rtol=1e-4, atol=1e-6, msg=name)


class Snapshot(pl.Callback):
    """The model as it is before the first step (prepared by other techniques, without the engines'
    hooks): the reference's starting point."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = copy.deepcopy(pl_module)
        for module in self.initial.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
                hooks.clear()
            module._is_full_backward_hook = None


# ---------------------------------------------------------------------------- time-major models

T = 24  # time steps: far from any Poisson batch size of these runs (mean 8)


class TimeMajorClassifier(pl.LightningModule):
    """A token classifier whose layers run on ``(T, B, D)`` tensors, as models built on ``nn.RNN`` or
    ``nn.Transformer`` (``batch_first=False``) do; the head sees the pooled ``(B, D)`` features.
    With ``gate`` a custom layer without an Opacus rule (computed by functorch) joins them."""

    def __init__(self, vocab: int = 32, dim: int = 16, gate: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.gate = Gate(dim) if gate else None
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(self.embed(ids.t()))))  # (T, B, D)
        if self.gate is not None:
            h = self.gate(h)
        return self.head(h.mean(0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Gate(nn.Module):
    """``x * sigmoid(w)`` over the last dimension: a layer only functorch can differentiate per example."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.w)


def token_data(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, T), generator=g)
    return DataLoader(TensorDataset(ids, (ids[:, 0] > 15).long()), batch_size=batch_size)


@pytest.mark.parametrize("mode", ENGINES)
def test_time_major_layers_with_the_default_batch_first_are_refused_before_any_update(mode: str) -> None:
    model = TimeMajorClassifier()
    before = copy.deepcopy(model.state_dict())
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode)
    match = (
        rf"grad_sample_mode='{mode}'\): layer 'embed' \(Embedding\) got an input of shape \({T}, \d+\), "
        rf"whose batch dimension 0 \(batch_first=True\) holds {T} entries, but the batch has \d+ "
        r"example\(s\)"
    )
    with pytest.raises(PrivacyError, match=match + ".*pass batch_first=False"):
        fit(model, token_data(), dp, max_steps=2)
    assert dp.plugin.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ENGINES)
def test_time_major_layers_are_clipped_per_example_with_batch_first_false(mode: str) -> None:
    model = TimeMajorClassifier(gate=mode == "hooks")
    initial = copy.deepcopy(model)
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, accountant="rdp", grad_sample_mode=mode, batch_first=False
    )
    recorder = fit(model, token_data(), dp, max_steps=1)
    assert dp.plugin.grad_sample_mode == mode and dp.plugin.steps == 1
    assert len(dp.plugin.last_per_sample_norms) == len(recorder.batches[0][1]) != T  # one norm per example
    assert_matches_reference(dp, recorder, initial)


# ---------------------------------------------------------------------------- empty Poisson batches


@pytest.mark.parametrize("mode", ENGINES)
def test_an_empty_poisson_batch_is_a_noise_only_step_and_is_accounted(mode: str) -> None:
    from opacus.accountants import create_accountant

    # batch_size 1 of 64 examples: q = 1/64, so about a third of the batches are empty
    torch.manual_seed(0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, accountant="rdp", grad_sample_mode=mode)
    recorder = fit(
        TinyClassifier(), DataLoader(random_classification_data(64), batch_size=1), dp, max_steps=12
    )
    assert dp.plugin.steps == 12
    accountant = create_accountant("rdp")
    accountant.history = [(1.0, 1 / 64, 12)]
    assert dp.epsilon == accountant.get_epsilon(delta=dp.plugin.delta)
    empty = [i for i, (x, y) in enumerate(recorder.batches) if not x.abs().sum()]
    assert empty, "the seed gives empty batches"
    for i in empty:
        x, y = recorder.batches[i]
        assert x.shape == (1, 16) and y.shape == (1,)  # the all-zero stand-in example
        assert all(not s.any() for s in recorder.summed[i].values())  # its gradient is discarded
        noise = torch.cat([g.flatten() for g in recorder.grads[i].values()])  # expected batch size 1
        assert noise.std().item() == pytest.approx(1.0 * 0.5, rel=0.2)


def test_a_transformer_runs_the_stand_in_of_an_empty_batch() -> None:
    torch.manual_seed(0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    recorder = fit(
        TinyTransformerClassifier(tiny_bert), token_dataloader(n=32, batch_size=1), dp, max_steps=6
    )
    empty = [i for i, b in enumerate(recorder.batches) if not b["input_ids"].any()]
    assert empty and dp.plugin.steps == 6
    assert all(not s.any() for i in empty for s in recorder.summed[i].values())


# ---------------------------------------------------------------------------- what other hooks see


def test_later_hooks_never_see_the_raw_gradients() -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode="hooks")
    recorder = fit(
        TinyClassifier(), DataLoader(random_classification_data(64), batch_size=8), dp, max_steps=2
    )
    assert recorder.after_backward and all(g is None for step in recorder.after_backward for g in step)
    assert all(g.abs().sum() > 0 for g in recorder.grads[0].values())  # privatized ones are there


class WithBareParameter(TinyClassifier):
    """A bare ``nn.Parameter`` registered on a ``Linear``, used in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.net(x)) * self.classifier.scale


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        (
            "ghost",
            r"no ghost clipping for the trainable layers \[\"classifier \(Linear, parameters \['scale'\]",
        ),
        ("hooks", r"classifier \(Linear\) has trainable parameters \['scale'\] besides its weight and bias"),
        ("auto", r"classifier \(Linear\) has trainable parameters \['scale'\] besides its weight and bias"),
    ],
)
def test_a_parameter_no_per_layer_rule_computes_is_refused_at_fit_start(mode: str, match: str) -> None:
    model = WithBareParameter()
    before = copy.deepcopy(model.state_dict())
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode)
    with pytest.raises(PrivacyError, match=match):
        fit(model, DataLoader(random_classification_data(64), batch_size=8), dp, max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- quantization-aware training


@pytest.mark.parametrize("mode", ENGINES)
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_clipping_through_fake_quantized_layers_equals_a_torch_func_reference(mode: str) -> None:
    model = TinyClassifier()
    # Weight-only: a dynamic activation scale is per tensor (as the deployed int8 kernel computes it),
    # so it mixes the examples of a batch and is refused under DP (see the test below).
    qat = QuantizationAwareTraining(weight_bits=4, group_size=8, activations=None)
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, accountant="rdp", grad_sample_mode=mode
    )

    snapshot = Snapshot()
    recorder = fit(
        model, DataLoader(random_classification_data(64), batch_size=8), dp, qat, snapshot, max_steps=1
    )
    assert dp.plugin.grad_sample_mode == mode
    assert type(snapshot.initial.net[0]).__name__ == "FakeQuantLinear"
    assert_matches_reference(dp, recorder, snapshot.initial)
    # the reference really quantizes: a float model's per-example gradients differ
    float_norms, _ = reference(_unprepared(snapshot.initial), recorder.batches[0], 0.05)
    assert not torch.allclose(float_norms, dp.plugin.last_per_sample_norms, rtol=1e-3)


def _unprepared(model: nn.Module) -> nn.Module:
    from lightning_shrink.quantization import is_prepared, unprepare_module

    model = copy.deepcopy(model)
    for module in model.modules():
        if is_prepared(module):
            unprepare_module(module)
    return model


class ConvClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.conv(x.unsqueeze(1)).squeeze(1))


@pytest.mark.parametrize(
    ("model", "qat", "match"),
    [
        (
            TinyClassifier,
            dict(activations="static"),
            r"net.0 is fake-quantized with static activation ranges .* observed from the private training",
        ),
        (
            ConvClassifier,
            dict(activations="dynamic"),
            r"conv \(FakeQuantConv1d\) fake-quantizes its input with one",
        ),
        (
            TinyClassifier,
            dict(activations="dynamic"),
            r"net.0 \(FakeQuantLinear\) fake-quantizes its input with one dynamic scale per tensor",
        ),
    ],
    ids=["static-ranges", "per-tensor-scale", "per-tensor-linear"],
)
def test_fake_quantization_that_reads_or_mixes_examples_is_refused(
    model: type, qat: dict, match: str
) -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(PrivacyError, match=match):
        fit(
            model(),
            DataLoader(random_classification_data(64), batch_size=8),
            dp,
            QuantizationAwareTraining(**qat),
        )


# ---------------------------------------------------------------------------- configure_model


class BuiltInConfigureModel(TinyClassifier):
    """The layers are created in ``configure_model``, as Lightning recommends for large models."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
            self.classifier = nn.Linear(32, 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("mode", ENGINES)
def test_a_model_built_in_configure_model_is_clipped_per_example(mode: str) -> None:
    model = BuiltInConfigureModel()
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, accountant="rdp", grad_sample_mode=mode
    )

    snapshot = Snapshot()
    recorder = fit(model, DataLoader(random_classification_data(64), batch_size=8), dp, snapshot, max_steps=1)
    assert dp.plugin.steps == 1
    assert_matches_reference(dp, recorder, snapshot.initial)
