"""QuantizationAwareTraining in real ``Trainer.fit`` runs: preparation in place (kwargs forwards,
GPT-2 Conv1D, bf16), models built in ``configure_model``, schedules in steps and fractions,
checkpoints and re-runs, two instances on disjoint layers, and pruning composed with it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_shrink as ls
from lightning_shrink.quantization import Int8Conv, Int8Embedding, Int8Linear, is_prepared
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    tiny_gpt2,
    token_dataloader,
)

# The converted model against the fake-quantized one: equal up to float rounding.
CONVERSION_TOLERANCE = 1e-5

ATTENTION = "*attention*"
MLP = dict(modules=["*intermediate.dense", "*output.dense"], exclude_modules=["*attention*"])


def assert_converted_matches(prepared: nn.Module, batch: dict[str, Any]) -> nn.Module:
    prepared.eval()
    with torch.no_grad():
        expected = prepared(**batch).logits
        converted = ls.convert(prepared)
        got = converted(**batch).logits
    assert float((got - expected).abs().max()) <= CONVERSION_TOLERANCE, float((got - expected).abs().max())
    return converted


def test_qat_on_tiny_bert_with_kwargs_forward_then_convert():
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    keys = list(module.state_dict())
    query = module.model.bert.encoder.layer[0].attention.self.query
    weight = query.weight
    seen_params: list[set[int]] = []

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen_params.append({id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]})

    trainer = cpu_trainer(max_steps=4, callbacks=[ls.QuantizationAwareTraining(), Spy()])
    before = weight.detach().clone()
    trainer.fit(module, token_dataloader())
    # Prepared in place: same module, same Parameter, same state-dict keys, optimizer sees it.
    assert type(query).__name__ == "FakeQuantLinear" and query.weight is weight
    assert list(module.state_dict()) == keys
    assert id(weight) in seen_params[0]
    assert not torch.equal(weight, before)  # it trained
    n_linear = sum(type(m) is nn.Linear for m in tiny_bert().modules())
    n_embedding = sum(type(m) is nn.Embedding for m in tiny_bert().modules())
    assert sum(is_prepared(m) for m in module.modules()) == n_linear + n_embedding
    report = ls.report(trainer)
    assert report.select("quantization", "fake-quantized layers")[0].value == n_linear + n_embedding
    assert report.select("quantization", "activations")[0].value == "dynamic"
    assert trainer.callback_metrics["quantization/fake_quant_enabled"] == 1.0

    batch = next(iter(token_dataloader(n=8)))
    converted = assert_converted_matches(module.model, batch)
    assert sum(isinstance(m, Int8Linear) for m in converted.modules()) == n_linear
    assert sum(isinstance(m, Int8Embedding) for m in converted.modules()) == n_embedding
    assert converted.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.int8
    assert is_prepared(query)  # convert() copied: the trained model stays trainable
    assert ls.report(model=converted).select("quantization", "int8 layers")[0].value == n_linear + n_embedding


def test_qat_on_gpt2_conv1d_with_bf16_mixed_precision():
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_gpt2)
    trainer = cpu_trainer(max_steps=3, precision="bf16-mixed", callbacks=[ls.QuantizationAwareTraining()])
    trainer.fit(module, token_dataloader())
    attn = module.model.transformer.h[0].attn.c_attn
    assert type(attn).__name__ == "FakeQuantConv1D"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    converted = assert_converted_matches(module.model, next(iter(token_dataloader(n=8))))
    c_attn = converted.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Int8Linear) and c_attn.weight.shape == (attn.nf, attn.weight.shape[0])


class BuiltInConfigureModel(TinyTransformerClassifier):
    """Builds its transformers model in ``configure_model`` (Lightning's place for large models)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.model: nn.Module | None = None
        self.lr = 1e-3

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = tiny_bert()


def test_qat_prepares_a_model_built_in_configure_model(tmp_path):
    module = BuiltInConfigureModel()
    trainer = cpu_trainer(max_steps=3, callbacks=[ls.QuantizationAwareTraining(embeddings=False)])
    trainer.fit(module, token_dataloader())
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert is_prepared(query) and not is_prepared(module.model.bert.embeddings.word_embeddings)
    assert ls.report(trainer).select("quantization", "fake-quantized layers")[0].value == 14
    assert_converted_matches(module.model, next(iter(token_dataloader(n=8))))


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_static_observers_and_schedules_in_steps_and_fractions():
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 1, 6, 6), torch.randint(0, 2, (64,))), batch_size=4)
    module = ConvNet()
    record: list[tuple[int, bool, float, bool]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            record.append(
                (
                    trainer.global_step,
                    pl_module.conv.shrink_qat.fake_quant_enabled,
                    float(pl_module.head.input_max),
                    pl_module.bn.training,
                )
            )

    # 8 steps: start_step=0.25 -> step 2, freeze_observers_step=0.5 -> step 4, freeze_bn_step=3.
    qat = ls.QuantizationAwareTraining(
        activations="static",
        start_step=0.25,
        freeze_observers_step=0.5,
        freeze_bn_step=3,
        averaging_constant=0.5,
    )
    trainer = cpu_trainer(max_steps=8, callbacks=[qat, Spy()])
    trainer.fit(module, data)
    steps = {s - 1: (fq, obs, bn) for s, fq, obs, bn in record}  # keyed by the step the batch ran at
    assert [steps[s][0] for s in range(8)] == [False, False, True, True, True, True, True, True]
    assert [steps[s][2] for s in range(8)] == [True, True, True, False, False, False, False, False]
    observed = [steps[s][1] for s in range(8)]
    assert observed[0] != observed[3] and len(set(observed[4:])) == 1  # frozen at 4
    assert "conv.input_min" in module.state_dict()

    x = torch.randn(3, 1, 6, 6)
    module.eval()
    with torch.no_grad():
        expected = module(x)
        converted = ls.convert(module)
        got = converted(x)
    assert isinstance(converted.conv, Int8Conv) and isinstance(converted.head, Int8Linear)
    torch.testing.assert_close(got, expected, atol=CONVERSION_TOLERANCE, rtol=0)


def test_fractional_steps_need_a_known_run_length():
    data = DataLoader(random_classification_data(16), batch_size=8)
    qat = ls.QuantizationAwareTraining(start_step=0.5)
    trainer = cpu_trainer(max_epochs=-1, max_steps=-1, callbacks=[qat])
    with pytest.raises(ValueError, match=r"`start_step=0.5` is a fraction of the run's optimizer steps"):
        trainer.fit(TinyClassifier(), data)


# --------------------------------------------------------------------- checkpoints and re-runs


def test_resume_from_checkpoint_test_ckpt_path_and_a_second_fit(tmp_path):
    torch.manual_seed(0)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = TinyTransformerClassifier(tiny_bert)
    trainer = cpu_trainer(
        max_steps=3, enable_checkpointing=True, callbacks=[ls.QuantizationAwareTraining(), ckpt_cb]
    )
    trainer.fit(module, token_dataloader())
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, weights_only=False)["lightning_shrink"]["quantization"]
    assert saved["version"] == 2 and saved["layers"] and saved["scheme"]["activations"] == "dynamic"

    # Resume: a fresh model and callback; layers are prepared before the weights load.
    resumed = TinyTransformerClassifier(tiny_bert)
    trainer2 = cpu_trainer(max_steps=5, max_epochs=3, callbacks=[ls.QuantizationAwareTraining()])
    trainer2.fit(resumed, token_dataloader(), ckpt_path=last)
    assert trainer2.global_step == 5
    assert is_prepared(resumed.model.classifier)

    # Trainer.test(ckpt_path=...) on a fresh model.
    tested = TinyTransformerClassifier(tiny_bert)
    trainer3 = cpu_trainer(callbacks=[ls.QuantizationAwareTraining()])
    (metrics,) = trainer3.test(tested, token_dataloader(n=16), ckpt_path=last, verbose=False)
    assert 0.0 <= metrics["test_acc"] <= 1.0
    torch.testing.assert_close(tested.model.classifier.weight, module.model.classifier.weight)

    # A second fit of the same (already prepared) model, with a new Trainer and callback.
    trainer4 = cpu_trainer(max_steps=2, callbacks=[ls.QuantizationAwareTraining()])
    trainer4.fit(module, token_dataloader())
    assert trainer4.global_step == 2 and is_prepared(module.model.classifier)
    assert not any(type(m).__name__.startswith("FakeQuantFakeQuant") for m in module.modules())

    # Resuming with another configuration is refused, naming the problem.
    with pytest.raises(ValueError, match="'quantization': the checkpoint was trained with a different"):
        mismatch = cpu_trainer(max_steps=5, callbacks=[ls.QuantizationAwareTraining(activations=None)])
        mismatch.fit(TinyTransformerClassifier(tiny_bert), token_dataloader(), ckpt_path=last)


def test_a_model_prepared_with_other_settings_is_refused():
    module = TinyClassifier()
    cpu_trainer(max_steps=1, callbacks=[ls.QuantizationAwareTraining()]).fit(
        module, DataLoader(random_classification_data(8), batch_size=8)
    )
    with pytest.raises(ValueError, match="already prepared"):
        cpu_trainer(max_steps=1, callbacks=[ls.QuantizationAwareTraining(activations="static")]).fit(
            module, DataLoader(random_classification_data(8), batch_size=8)
        )


# ------------------------------------------------------------------------- two instances


def two_instances(**mlp: Any) -> list[ls.QuantizationAwareTraining]:
    return [
        ls.QuantizationAwareTraining(modules=ATTENTION, activations="dynamic", embeddings=False),
        ls.QuantizationAwareTraining(
            **{**MLP, **mlp}, weight_bits=4, group_size=16, activations=None, start_step=2, embeddings=False
        ),
    ]


def test_two_instances_own_their_layers_metrics_state_and_rows(tmp_path):
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    switched: list[tuple[int, bool, bool]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            layer = pl_module.model.bert.encoder.layer[0]
            switched.append(
                (
                    trainer.global_step,
                    layer.attention.self.query.shrink_qat.fake_quant_enabled,
                    layer.intermediate.dense.shrink_qat.fake_quant_enabled,
                )
            )

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = cpu_trainer(max_steps=4, enable_checkpointing=True, callbacks=[*two_instances(), Spy(), ckpt])
    trainer.fit(module, token_dataloader())
    layer = module.model.bert.encoder.layer[1]
    attention, mlp = layer.attention.self.query, layer.intermediate.dense
    assert attention.shrink_qat.owner == "quantization" and mlp.shrink_qat.owner == "quantization-2"
    assert (attention.shrink_qat.weight_bits, mlp.shrink_qat.weight_bits) == (8, 4)
    assert not is_prepared(module.model.classifier) and not is_prepared(module.model.bert.pooler.dense)
    # Each its own schedule and metrics: the MLP layers start at step 2.
    assert [(a, b) for _, a, b in switched] == [(True, False), (True, False), (True, True), (True, True)]
    assert trainer.callback_metrics["quantization/fake_quant_enabled"] == 1.0
    assert trainer.callback_metrics["quantization-2/fake_quant_enabled"] == 1.0
    report = ls.report(trainer)
    assert report.select("quantization", "fake-quantized layers")[0].value == 8
    assert report.select("quantization-2", "fake-quantized layers")[0].value == 4
    assert report.select("quantization-2", "weight bits")[0].value == 4
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["lightning_shrink"]
    assert len(state["quantization"]["layers"]) == 8 and len(state["quantization-2"]["layers"]) == 4
    assert state["quantization-2"]["scheme"]["group_size"] == 16

    # Convert, export and load: each layer keeps its own arithmetic.
    batch = next(iter(token_dataloader(n=8)))
    converted = assert_converted_matches(module.model, batch)
    assert converted.bert.encoder.layer[0].intermediate.dense.weight_scale.shape == (64, 2)
    out = ls.export(converted, tmp_path / "export")
    loaded = ls.load(out)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, converted(**inputs).logits)
    assert loaded.bert.encoder.layer[0].output.dense.weight_bits == 4
    assert loaded.bert.encoder.layer[0].attention.output.dense.weight_bits == 8

    # Resume restores both; a changed second instance is refused, by its name.
    resumed = TinyTransformerClassifier(tiny_bert)
    again = cpu_trainer(max_steps=6, max_epochs=3, callbacks=two_instances())
    again.fit(resumed, token_dataloader(), ckpt_path=tmp_path / "last.ckpt")
    assert again.global_step == 6
    assert resumed.model.bert.encoder.layer[1].intermediate.dense.shrink_qat.owner == "quantization-2"
    with pytest.raises(ValueError, match="'quantization-2': the checkpoint was trained with a different"):
        changed = cpu_trainer(
            max_steps=6, max_epochs=3, callbacks=two_instances(exclude_modules=["*attention*", "*layer.1*"])
        )
        changed.fit(
            TinyTransformerClassifier(tiny_bert), token_dataloader(), ckpt_path=tmp_path / "last.ckpt"
        )


def test_overlapping_instances_are_refused_naming_both():
    callbacks = [
        ls.QuantizationAwareTraining(modules=ATTENTION),
        ls.QuantizationAwareTraining(weight_bits=4, name="everything"),
    ]
    with pytest.raises(
        ValueError,
        match=r"QuantizationAwareTraining '(quantization|everything)' and "
        r"QuantizationAwareTraining '(quantization|everything)' both select",
    ):
        cpu_trainer(max_steps=1, callbacks=callbacks).fit(
            TinyTransformerClassifier(tiny_bert), token_dataloader()
        )


# --------------------------------------------------------------------------------- with pruning


def test_pruned_zeros_stay_zero_through_fake_quant_and_conversion():
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    callbacks = [
        ls.QuantizationAwareTraining(),
        ls.GradualMagnitudePruning(0.6, start_step=0, end_step=3, frequency=1, scope="layer"),
    ]
    trainer = cpu_trainer(max_steps=5, callbacks=callbacks)
    trainer.fit(module, token_dataloader())
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert is_prepared(query)
    zeros = query.weight == 0
    assert 0.55 < float(zeros.float().mean()) < 0.65
    assert torch.equal(query._fake_weight()[zeros], torch.zeros(int(zeros.sum())))
    converted = ls.convert(module.model)
    int8_query = converted.bert.encoder.layer[0].attention.self.query
    assert bool((int8_query.weight[zeros] == 0).all())
