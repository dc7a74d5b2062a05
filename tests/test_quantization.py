"""QuantizationAwareTraining: fake-quant numerics, preparation, training (kwargs forwards, GPT-2
Conv1D, convolutions, bf16), conversion to int8, checkpoints, DDP, and pruning composed with it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_shrink as ls
from lightning_shrink.quantization import (
    Int8Conv,
    Int8Embedding,
    Int8Linear,
    _kernels,
    is_prepared,
)
from lightning_shrink.quantization.fake_quant import (
    fake_quantize_activation_per_token,
    fake_quantize_activation_static,
    fake_quantize_weight,
    static_qparams,
)
from lightning_shrink.testing.distributed import run_multiprocess_script
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    tiny_gpt2,
    token_dataloader,
)

# Converted (x86 int8 kernel, dynamic per-tensor 7-bit activations) vs fake-quantized logits of the
# tiny models: the kernel quantizes activations per tensor while training simulated per token.
KERNEL_TOLERANCE = 0.05
# The reference kernel reproduces the fake-quant numerics; only float summation order differs.
REFERENCE_TOLERANCE = 1e-4


def zero_point(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32)


# ------------------------------------------------------------------------------------- numerics


def test_fake_quant_numerics_match_torch_reference_operators():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    w[3] = 0.0  # a fully pruned row
    w[5, ::2] = 0.0
    s0 = (w.abs().amax(1) / 127).clamp(min=1e-8)
    ref0 = torch.fake_quantize_per_channel_affine(w, s0, zero_point(24), 0, -127, 127)
    assert torch.equal(fake_quantize_weight(w, axis=0), ref0)
    s1 = (w.abs().amax(0) / 127).clamp(min=1e-8)
    ref1 = torch.fake_quantize_per_channel_affine(w, s1, zero_point(40), 1, -127, 127)
    assert torch.equal(fake_quantize_weight(w, axis=1), ref1)
    # Zeros stay zero (symmetric: zero point 0), also in an all-zero row.
    fq = fake_quantize_weight(w)
    assert torch.equal(fq[w == 0], torch.zeros(int((w == 0).sum())))
    assert int(torch.unique(fq[0]).numel()) <= 255

    x = torch.randn(2, 7, 40, generator=g) * 3
    rows = x.reshape(-1, 40)
    st = rows.abs().amax(1) / 127
    ref_tok = torch.fake_quantize_per_channel_affine(rows, st, zero_point(14), 0, -127, 127)
    assert torch.equal(fake_quantize_activation_per_token(x), ref_tok.reshape(x.shape))

    scale, zp = static_qparams(torch.tensor(-1.0), torch.tensor(2.0))
    assert int(zp) == 85 and abs(float(scale) - 3 / 255) < 1e-7
    ref_static = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 255)
    assert torch.equal(fake_quantize_activation_static(x, scale, zp), ref_static)

    # int4, groups of 8 along the input: at most 15 levels per group, each group's max is exact.
    w4 = fake_quantize_weight(w, axis=0, bits=4, group_size=8)
    groups = w.reshape(24, 5, 8)
    s4 = (groups.abs().amax(-1) / 7).clamp(min=1e-8).reshape(-1)
    ref4 = torch.fake_quantize_per_channel_affine(groups.reshape(-1, 8), s4, zero_point(120), 0, -7, 7)
    assert torch.equal(w4, ref4.reshape(24, 40))
    assert max(int(torch.unique(gr).numel()) for gr in w4.reshape(-1, 8)) <= 15


def test_straight_through_gradients():
    w = torch.randn(6, 5, requires_grad=True)
    (fake_quantize_weight(w) * torch.arange(30.0).reshape(6, 5)).sum().backward()
    assert torch.equal(w.grad, torch.arange(30.0).reshape(6, 5))  # identity: nothing is clipped

    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    scale, zp = static_qparams(torch.tensor(-1.0), torch.tensor(1.0))
    fake_quantize_activation_static(x, scale, zp).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped values get no gradient

    t = torch.randn(3, 4, requires_grad=True)
    fake_quantize_activation_per_token(t).pow(2).sum().backward()
    torch.testing.assert_close(t.grad, 2 * fake_quantize_activation_per_token(t.detach()))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(weight_bits=3), "weight_bits=3"),
        (dict(weight_bits=True), "weight_bits"),
        (dict(activations="per_token"), "`activations`"),
        (dict(start_step=-1), "`start_step`"),
        (dict(freeze_observers_step=5), "`freeze_observers_step`"),
        (dict(group_size=32), "`group_size` is for weight_bits=4"),
        (dict(weight_bits=4, group_size=0), "`group_size` must be a positive int"),
        (dict(averaging_constant=0.0), "`averaging_constant`"),
        (dict(embedding_bits=2), "embedding_bits=2"),
        (dict(embedding_bits=4, embeddings=False), "`embedding_bits=4` has no effect"),
        (dict(embedding_group_size=32), "`embedding_group_size` is for embedding_bits=4"),
        (dict(embedding_bits=4, embedding_group_size=-1), "`embedding_group_size` must be a positive"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ls.QuantizationAwareTraining(**kwargs)


def test_selected_layers_that_cannot_be_quantized_fail_at_setup():
    model = TinyTransformerClassifier(tiny_bert)
    data = token_dataloader(n=8)
    ln = "model.bert.embeddings.LayerNorm"
    with pytest.raises(TypeError, match=f"selected layer '{ln}' cannot be quantized"):
        cpu_trainer(max_steps=1, callbacks=[ls.QuantizationAwareTraining(modules=[ln])]).fit(model, data)
    with pytest.raises(ValueError, match="matches no module"):
        cpu_trainer(max_steps=1, callbacks=[ls.QuantizationAwareTraining(modules="*decoder*")]).fit(
            model, data
        )
    with pytest.raises(ValueError, match="does not divide"):
        qat = ls.QuantizationAwareTraining(weight_bits=4, group_size=5)
        cpu_trainer(max_steps=1, callbacks=[qat]).fit(TinyTransformerClassifier(tiny_bert), data)
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match="subclasses are not"):
        ls.quantization.prepare_qat(nn.Sequential(mha), modules=["0.out_proj"])


def test_shrink_convert_refuses_a_never_prepared_model():
    with pytest.raises(ValueError, match=r"nothing to convert.*QuantizationAwareTraining"):
        ls.convert(tiny_bert())


# ------------------------------------------------------------------------ training + convert


def assert_converted_matches(prepared: nn.Module, batch: dict[str, Any], tolerance: float) -> nn.Module:
    prepared.eval()
    with torch.no_grad():
        expected = prepared(**batch).logits
        converted = ls.convert(prepared)
        got = converted(**batch).logits
    assert torch.allclose(got, expected, atol=tolerance, rtol=0), float((got - expected).abs().max())
    return converted


def test_qat_on_tiny_bert_with_kwargs_forward_then_convert(monkeypatch):
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    keys = list(module.state_dict())
    query = module.model.bert.encoder.layer[0].attention.self.query
    weight = query.weight
    seen_params: list[set[int]] = []

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen_params.append({id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]})

    qat = ls.QuantizationAwareTraining()
    trainer = cpu_trainer(max_steps=4, callbacks=[qat, Spy()])
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
    assert (
        ls.report(trainer).select("quantization", "fake-quantized layers")[0].value == n_linear + n_embedding
    )

    batch = next(iter(token_dataloader(n=8)))
    converted = assert_converted_matches(module.model, batch, KERNEL_TOLERANCE)
    assert sum(isinstance(m, Int8Linear) for m in converted.modules()) == n_linear
    assert sum(isinstance(m, Int8Embedding) for m in converted.modules()) == n_embedding
    assert converted.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.int8
    assert is_prepared(query)  # convert() copied: the trained model stays trainable
    with pytest.raises(ValueError, match="nothing to convert"):
        ls.convert(converted)

    # The reference kernel (the fallback when torch.ao's operators are gone) reproduces the
    # fake-quantized model's numerics.
    monkeypatch.setenv(_kernels.ENV_KERNEL, "reference")
    assert _kernels.kernel_name() == "reference"
    assert_converted_matches(module.model, batch, REFERENCE_TOLERANCE)


def test_int8_linear_kernel_and_fallback_agree():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    ls.quantization.prepare_qat(nn.Sequential(lin))
    int8 = Int8Linear.from_prepared(lin)
    x = torch.randn(5, 64)
    with torch.no_grad():
        fq = lin(x)
        native = int8(x)
        assert int8._packed is not False, "the native x86 int8 kernel should be available in torch 2.13"
        os.environ[_kernels.ENV_KERNEL] = "reference"
        try:
            reference = Int8Linear.from_prepared(lin)(x)
        finally:
            del os.environ[_kernels.ENV_KERNEL]
    torch.testing.assert_close(reference, fq, atol=1e-5, rtol=0)
    assert (native - fq).abs().max() < 0.02 * fq.abs().max()


def test_qat_on_gpt2_conv1d_with_bf16_mixed_precision():
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_gpt2)
    trainer = cpu_trainer(max_steps=3, precision="bf16-mixed", callbacks=[ls.QuantizationAwareTraining()])
    trainer.fit(module, token_dataloader())
    attn = module.model.transformer.h[0].attn.c_attn
    assert type(attn).__name__ == "FakeQuantConv1D"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    batch = next(iter(token_dataloader(n=8)))
    converted = assert_converted_matches(module.model, batch, KERNEL_TOLERANCE)
    c_attn = converted.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Int8Linear) and c_attn.weight.shape == (attn.nf, attn.weight.shape[0])


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


def test_static_observers_schedules_and_convolutions():
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(48, 1, 6, 6), torch.randint(0, 2, (48,))), batch_size=4)
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

    qat = ls.QuantizationAwareTraining(
        activations="static", start_step=2, freeze_observers_step=4, freeze_bn_step=3, averaging_constant=0.5
    )
    trainer = cpu_trainer(max_steps=7, callbacks=[qat, Spy()])
    trainer.fit(module, data)
    steps = {s - 1: (fq, obs, bn) for s, fq, obs, bn in record}  # keyed by the step the batch ran at
    assert [steps[s][0] for s in range(7)] == [False, False, True, True, True, True, True]
    assert [steps[s][2] for s in range(7)] == [True, True, True, False, False, False, False]
    observed = [steps[s][1] for s in range(7)]
    assert observed[0] != observed[3] and observed[4] == observed[5] == observed[6]  # frozen at 4
    assert "input_min" in module.state_dict() or "conv.input_min" in module.state_dict()

    x = torch.randn(3, 1, 6, 6)
    module.eval()
    with torch.no_grad():
        expected = module(x)
        converted = ls.convert(module)
        got = converted(x)
    assert isinstance(converted.conv, Int8Conv) and isinstance(converted.head, Int8Linear)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)


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
    assert last.exists()
    assert torch.load(last, weights_only=False)["lightning_shrink"]["quantization"]["layers"]

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
    with pytest.raises(ValueError, match="different quantization configuration"):
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


# ----------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_qat_under_ddp_two_processes(tmp_path):
    script = Path(__file__).parent / "scripts" / "quantization_ddp.py"
    run_multiprocess_script(script, tmp_path, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["global_step"] == 4 and r["prepared"] > 10
        assert all(abs(v) < float("inf") for v in r["observed"])
    # Same weights and (broadcast) observer ranges on both ranks.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    assert ranks[0]["observed"] == ranks[1]["observed"]
    assert ranks[0]["fake_quant_weight_sum"] == pytest.approx(ranks[1]["fake_quant_weight_sum"], rel=1e-9)


def test_int4_grouped_weights_convert_and_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    qat = ls.QuantizationAwareTraining(weight_bits=4, group_size=8)
    ls.quantization.prepare_qat(model, qat.settings)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
        converted = ls.convert(model)
        got = converted(x)
    first = converted[0]
    assert isinstance(first, Int8Linear) and first.weight_scale.shape == (16, 4)
    assert int(first.weight.abs().max()) <= 7
    torch.testing.assert_close(got, expected, atol=REFERENCE_TOLERANCE, rtol=0)
    loaded = ls.load(
        ls.export(converted, tmp_path / "int4"),
        model=nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)),
    )
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


def test_int4_embeddings_fake_quant_convert_and_export_packed(tmp_path):
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(48, 4))

    model = build()
    with torch.no_grad():  # let the two groups of each row differ in range
        model[0].weight[:, 8:] *= 10
    qat = ls.QuantizationAwareTraining(weight_bits=4, group_size=16, embedding_bits=4, embedding_group_size=8)
    ls.quantization.prepare_qat(model, qat.settings)
    ids = torch.randint(0, 50, (5, 3))

    # Reference: int4 symmetric per group of 8 along each row, computed on the whole table.
    table = model[0].weight.detach()
    groups = table.reshape(50, 2, 8)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    reference = (torch.round(groups / scale) * scale).reshape(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(model[0](ids), reference[ids], atol=1e-6, rtol=0)
        expected = model(ids)
    converted = ls.convert(model)
    table8 = converted[0]
    assert isinstance(table8, Int8Embedding) and table8.weight_scale.shape == (50, 2)
    assert int(table8.weight.abs().max()) == 7
    with torch.no_grad():
        got = converted(ids)
    torch.testing.assert_close(got, expected, atol=REFERENCE_TOLERANCE, rtol=0)

    int4_dir = ls.export(converted, tmp_path / "int4")
    loaded = ls.load(int4_dir, model=build())
    with torch.no_grad():
        assert torch.equal(loaded(ids), got)
    assert torch.equal(loaded[0].weight, table8.weight)

    # Two values per byte: the int4 table's weight takes half the bytes of an int8 one.
    from safetensors import safe_open

    with safe_open(str(Path(int4_dir) / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("0.weight")
        assert packed.dtype == torch.uint8 and packed.numel() == 50 * 16 // 2
        assert f.get_tensor("2.weight").numel() == 4 * 48 // 2
    layers = json.loads((Path(int4_dir) / "shrink_config.json").read_text())["quantization"]["layers"]
    assert layers["0"]["int4_shape"] == [50, 16] and layers["2"]["int4_shape"] == [4, 48]


def test_int4_pack_roundtrip_and_a_damaged_packed_weight(tmp_path):
    from lightning_shrink.quantization.hooks import pack_int4, unpack_int4

    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:47]  # odd length: one pad nibble
    assert torch.equal(unpack_int4(pack_int4(values), [47]), values)
    with pytest.raises(ValueError, match="does not hold shape"):
        unpack_int4(pack_int4(values), [48, 2])

    model = nn.Sequential(nn.Linear(8, 4))
    ls.quantization.prepare_qat(model, ls.QuantizationAwareTraining(weight_bits=4).settings)
    directory = ls.export(ls.convert(model), tmp_path / "int4")
    config = json.loads((directory / "shrink_config.json").read_text())
    config["quantization"]["layers"]["0"]["int4_shape"] = [4, 9]
    (directory / "shrink_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized layer '0'.*does not hold shape \[4, 9\]"):
        ls.load(directory, model=nn.Sequential(nn.Linear(8, 4)))


def test_embedding_group_size_must_divide_the_embedding_dimension():
    model = nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 2))
    qat = ls.QuantizationAwareTraining(embedding_bits=4, embedding_group_size=8)
    with pytest.raises(ValueError, match=r"embedding_group_size=8.*dimension 12 of layer '0'"):
        ls.quantization.prepare_qat(model, qat.settings)
    assert not any(is_prepared(m) for m in model.modules())  # nothing half-prepared


def test_qat_with_int4_embeddings_on_tiny_bert_trains_converts_and_exports(tmp_path):
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    table = module.model.bert.embeddings.word_embeddings
    qat = ls.QuantizationAwareTraining(embedding_bits=4, embedding_group_size=16)
    trainer = cpu_trainer(max_steps=3, callbacks=[qat])
    before = table.weight.detach().clone()
    trainer.fit(module, token_dataloader())
    assert not torch.equal(table.weight, before)  # gradients reach the table through the STE
    assert ls.report(trainer).select("quantization", "embedding bits")[0].value == 4

    batch = next(iter(token_dataloader(n=8)))
    converted = assert_converted_matches(module.model, batch, KERNEL_TOLERANCE)
    int4 = converted.bert.embeddings.word_embeddings
    assert isinstance(int4, Int8Embedding) and int4.weight_bits == 4 and int4.group_size == 16
    assert int(int4.weight.abs().max()) <= 7

    int8_table = ls.QuantizationAwareTraining()
    module8 = TinyTransformerClassifier(tiny_bert)
    ls.quantization.prepare_qat(module8.model, int8_table.settings)
    size4 = sum(f.stat().st_size for f in ls.export(converted, tmp_path / "int4").iterdir())
    size8 = sum(f.stat().st_size for f in ls.export(ls.convert(module8.model), tmp_path / "int8").iterdir())
    assert size4 < size8
    loaded = ls.load(tmp_path / "int4")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, converted(**inputs).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_qat_under_fsdp2_two_processes(tmp_path):
    script = Path(__file__).parent / "scripts" / "quantization_fsdp2.py"
    run_multiprocess_script(script, tmp_path, cwd=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    # Prepared before sharding, then sharded: 36 output rows split 18/18, all 3 Linear layers fake-quantized.
    assert r0["sharded"] and r0["local_rows"] == r1["local_rows"] == 18
    assert r0["prepared"] == r1["prepared"] == 3
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    for r in (r0, r1):
        # The sharded model computes exactly what an unsharded copy with the same settings computes,
        # and that is fake-quantized (not the float output).
        torch.testing.assert_close(r["sharded_out"], r["reference_out"], atol=1e-6, rtol=0)
        assert not torch.allclose(r["sharded_out"], r["float_out"], atol=1e-6)
        torch.testing.assert_close(r["converted_out"], r["reference_out"], atol=KERNEL_TOLERANCE, rtol=0)
