"""Quantization numerics and configuration: fake quantization against torch's reference operators
and the x86 int8 kernel, straight-through gradients, the validated configuration, layer selection,
and conversion (the converted model computes what the fake-quantized one simulated)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import lightning_shrink as ls
from lightning_shrink.quantization import (
    Int8Conv,
    Int8Linear,
    LayerSettings,
    QuantizationConfig,
    _kernels,
    is_prepared,
    prepare_qat,
    select_layers,
)
from lightning_shrink.quantization.fake_quant import (
    activation_qparams,
    fake_quantize_activation_dynamic,
    fake_quantize_activation_static,
    fake_quantize_rows,
    fake_quantize_weight,
    static_qparams,
)
from lightning_shrink.testing.models import TinyTransformerClassifier, tiny_bert, tiny_gpt2, token_dataloader

# The converted model against the fake-quantized one: equal up to float rounding (the int8 kernel
# accumulates in int32, the simulation in float32). Observed on the tiny models: <= 6e-8.
CONVERSION_TOLERANCE = 1e-5


def zero_point(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32)


def kernel_readback(x: torch.Tensor, activations: str, scale: float = 1.0, zp: int = 0) -> torch.Tensor:
    """The activations the x86 int8 kernel computes with, read back through an identity weight."""
    k = x.shape[-1]
    eye = torch.eye(k).to(torch.int8)
    packed = _kernels.pack(eye, torch.ones(k), None)
    assert packed is not None, "the native x86 int8 kernel should be available in torch 2.13"
    return _kernels.linear(
        x, eye, torch.ones(k), None, packed, activations, torch.tensor(scale), torch.tensor(zp)
    )


# ------------------------------------------------------------------------------------- numerics


def test_fake_quant_weights_match_torch_reference_operators():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    w[3] = 0.0  # a fully pruned row
    w[5, ::2] = 0.0
    s0 = (w.abs().amax(1) / 127).clamp(min=1e-8)
    ref0 = torch.fake_quantize_per_channel_affine(w, s0, zero_point(24), 0, -127, 127)
    assert torch.equal(fake_quantize_weight(w, axis=0), ref0)
    assert torch.equal(fake_quantize_rows(w), ref0)  # an embedding table's rows
    s1 = (w.abs().amax(0) / 127).clamp(min=1e-8)
    ref1 = torch.fake_quantize_per_channel_affine(w, s1, zero_point(40), 1, -127, 127)
    assert torch.equal(fake_quantize_weight(w, axis=1), ref1)
    # Zeros stay zero (symmetric: zero point 0), also in an all-zero row.
    fq = fake_quantize_weight(w)
    assert torch.equal(fq[w == 0], torch.zeros(int((w == 0).sum())))
    assert int(torch.unique(fq[0]).numel()) <= 255

    # int4, groups of 8 along the input: at most 15 levels per group, each group's max is exact.
    w4 = fake_quantize_weight(w, axis=0, bits=4, group_size=8)
    groups = w.reshape(24, 5, 8)
    s4 = (groups.abs().amax(-1) / 7).clamp(min=1e-8).reshape(-1)
    ref4 = torch.fake_quantize_per_channel_affine(groups.reshape(-1, 8), s4, zero_point(120), 0, -7, 7)
    assert torch.equal(w4, ref4.reshape(24, 40))
    assert max(int(torch.unique(gr).numel()) for gr in w4.reshape(-1, 8)) <= 15


@pytest.mark.parametrize(
    "case",
    ["normal", "shifted", "non-negative", "non-positive", "tiny range", "all zero", "one value", "3-d"],
)
def test_dynamic_activations_are_bit_exact_with_the_x86_kernel(case):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g) * 3
    x = {
        "normal": x,
        "shifted": x + 7.5,
        "non-negative": x.relu(),
        "non-positive": -x.relu(),
        "tiny range": x * 1e-5,
        "all zero": torch.zeros(5, 96),
        "one value": torch.full((2, 96), -0.25),
        "3-d": x.reshape(1, 37, 96),
    }[case]
    got = fake_quantize_activation_dynamic(x)
    assert torch.equal(got, kernel_readback(x, "dynamic").reshape(x.shape))
    lo, hi = torch.aminmax(x)
    scale, zp = activation_qparams(lo, hi)
    assert 0 <= int(zp) <= 127
    assert int(torch.unique(torch.round(got / scale)).numel()) <= 128  # 7-bit values


def test_static_activations_are_bit_exact_with_the_x86_kernel_also_when_clipped():
    g = torch.Generator().manual_seed(2)
    scale, zp = static_qparams(torch.tensor(-1.0), torch.tensor(2.0))
    assert int(zp) == 42 and abs(float(scale) - 3 / 127) < 1e-7
    x = torch.randn(64, 96, generator=g) * 2  # about 15 % outside [-1, 2]: clipped
    got = fake_quantize_activation_static(x, scale, zp)
    assert torch.equal(got, kernel_readback(x, "static", float(scale), int(zp)))
    step = float(scale)  # the nudged zero point moves the grid by less than a step
    assert abs(float(got.max()) - 2.0) < step and abs(float(got.min()) + 1.0) < step
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 127)
    assert float((got - ref).abs().max()) <= float(scale) + 1e-7  # the same grid, at most a tie apart


def test_seven_bit_activations_keep_the_kernel_exact_where_eight_bits_saturate():
    # All weights at +127 and activations at the top of the range: with 8-bit activations the
    # AVX2 multiply-add's int16 pair sums saturate (2 * 255 * 127 > 32767); with 7 bits they cannot.
    weight = torch.full((4, 64), 127, dtype=torch.int8)
    scale = torch.full((4,), 0.01)
    packed = _kernels.pack(weight, scale, None)
    assert packed is not None
    x = torch.full((3, 64), 2.0)
    x[1] = torch.linspace(-1, 2, 64)
    x[2] = 5.0  # clipped
    s, zp = static_qparams(torch.tensor(-1.0), torch.tensor(2.0))
    dequantized = weight.float() * scale.unsqueeze(1)
    for activations, x_fq in (
        ("static", fake_quantize_activation_static(x, s, zp)),
        ("dynamic", fake_quantize_activation_dynamic(x)),
    ):
        native = _kernels.linear(x, weight, scale, None, packed, activations, s, zp)
        torch.testing.assert_close(native, x_fq @ dequantized.T, rtol=1e-6, atol=1e-4)


def test_straight_through_gradients():
    w = torch.randn(6, 5, requires_grad=True)
    (fake_quantize_weight(w) * torch.arange(30.0).reshape(6, 5)).sum().backward()
    assert torch.equal(w.grad, torch.arange(30.0).reshape(6, 5))  # identity: nothing is clipped

    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    scale, zp = static_qparams(torch.tensor(-1.0), torch.tensor(1.0))
    fake_quantize_activation_static(x, scale, zp).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped values get no gradient

    t = torch.randn(3, 4, requires_grad=True)
    fake_quantize_activation_dynamic(t).pow(2).sum().backward()
    torch.testing.assert_close(t.grad, 2 * fake_quantize_activation_dynamic(t.detach()))

    r = torch.randn(3, 4, requires_grad=True, dtype=torch.bfloat16)
    out = fake_quantize_activation_dynamic(r)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.equal(r.grad, torch.ones_like(r))


# -------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight_bits=3), ValueError, r"`weight_bits` must be one of \[8, 4\], got 3"),
        (dict(weight_bits=True), TypeError, "`weight_bits` must be an int"),
        (dict(activations="per_token"), ValueError, "`activations`"),
        (dict(activations=8), TypeError, "`activations`"),
        (dict(start_step=-1), ValueError, "`start_step` must be >= 0"),
        (dict(start_step=1.5), ValueError, "`start_step` as a float is a fraction"),
        (dict(start_step="10"), TypeError, "`start_step` must be an int"),
        (dict(freeze_bn_step=2.0), ValueError, "`freeze_bn_step`"),
        (
            dict(freeze_observers_step=5),
            ValueError,
            "`freeze_observers_step` applies to activations='static'",
        ),
        (dict(group_size=32), ValueError, "`group_size` is for weight_bits=4"),
        (dict(weight_bits=4, group_size=0), ValueError, "`group_size` must be an int in"),
        (dict(weight_bits=4, group_size=8.0), TypeError, "`group_size` must be an int"),
        (dict(averaging_constant=0.0), ValueError, "`averaging_constant`"),
        (dict(embeddings="yes"), TypeError, "`embeddings` must be a bool"),
        (dict(embedding_bits=2), ValueError, "`embedding_bits` must be one of"),
        (dict(embedding_bits=4, embeddings=False), ValueError, "`embedding_bits=4` has no effect"),
        (dict(embedding_group_size=32), ValueError, "`embedding_group_size` is for embedding_bits=4"),
        (
            dict(embedding_bits=4, embedding_group_size=-1),
            ValueError,
            "`embedding_group_size` must be an int",
        ),
        (dict(modules=[]), ValueError, "`modules` is empty"),
        (dict(modules=3), TypeError, "`modules` must be a module name"),
        (dict(exclude_modules=[""]), ValueError, "`exclude_modules` holds an empty pattern"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match) as excinfo:
        ls.QuantizationAwareTraining(**kwargs)
    assert str(excinfo.value).startswith("QuantizationAwareTraining: ")
    with pytest.raises(error, match=match):
        QuantizationConfig(**kwargs)


def test_the_callback_builds_a_frozen_config():
    qat = ls.QuantizationAwareTraining(
        weight_bits=4, group_size=16, start_step=0.25, modules="*.query", exclude_modules=["*layer.1*"]
    )
    config = qat.config
    assert config == QuantizationConfig(
        weight_bits=4, group_size=16, start_step=0.25, modules=("*.query",), exclude_modules=("*layer.1*",)
    )
    assert config.modules == ("*.query",) and config.exclude_modules == ("*layer.1*",)
    with pytest.raises(AttributeError):
        config.weight_bits = 8  # type: ignore[misc]
    assert config.scheme() == {
        "weight_bits": 4,
        "group_size": 16,
        "activations": "dynamic",
        "embedding_bits": 8,
        "embedding_group_size": None,
        "averaging_constant": 0.01,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert qat.settings is config
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


# ------------------------------------------------------------------------------------ selection


def test_selection_strictness_and_tied_heads():
    model = TinyTransformerClassifier(tiny_bert)
    ln = "model.bert.embeddings.LayerNorm"
    with pytest.raises(TypeError, match=f"`modules` names '{ln}', which cannot be selected"):
        select_layers(model, QuantizationConfig(modules=[ln]))
    with pytest.raises(ValueError, match="`modules` pattern '\\*decoder\\*' matches no module"):
        select_layers(model, QuantizationConfig(modules="*decoder*"))
    with pytest.raises(ValueError, match="`exclude_modules` pattern 'nothing' matches no module"):
        select_layers(model, QuantizationConfig(exclude_modules="nothing"))
    assert set(select_layers(model, QuantizationConfig(modules="*embeddings*"))) == {
        f"model.bert.embeddings.{n}"
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    no_tables = select_layers(model, QuantizationConfig(embeddings=False))
    assert no_tables and not any(isinstance(m, nn.Embedding) for m in no_tables.values())
    with pytest.raises(TypeError, match="embeddings=False"):
        select_layers(
            model, QuantizationConfig(modules=["model.bert.embeddings.word_embeddings"], embeddings=False)
        )
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match="subclasses are not"):
        prepare_qat(nn.Sequential(mha), modules=["0.out_proj"])

    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert "lm_head" in select_layers(lm)  # selected with its table
    with pytest.raises(
        ValueError, match=r"'lm_head' computes with the table of the embedding 'transformer.wte'"
    ):
        select_layers(lm, QuantizationConfig(exclude_modules=["lm_head"]))
    with pytest.raises(ValueError, match="select or exclude 'lm_head' as well"):
        select_layers(lm, QuantizationConfig(modules=["transformer.wte", "transformer.h.*"]))
    kept = select_layers(lm, QuantizationConfig(exclude_modules=["lm_head", "transformer.wte"]))
    assert "lm_head" not in kept and "transformer.wte" not in kept


def test_group_sizes_must_divide_and_nothing_is_half_prepared():
    model = nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"embedding_group_size=8.*dimension 12 of layer '0'"):
        prepare_qat(model, QuantizationConfig(embedding_bits=4, embedding_group_size=8))
    assert not any(is_prepared(m) for m in model.modules())
    with pytest.raises(ValueError, match=r"group_size=5.*12 input features of layer '1'"):
        prepare_qat(model, QuantizationConfig(weight_bits=4, group_size=5))
    assert not any(is_prepared(m) for m in model.modules())


def test_prepare_adopts_equal_settings_and_refuses_others():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert prepare_qat(model) == ["0", "2"]
    first = model[0].shrink_qat
    assert prepare_qat(model, QuantizationConfig(start_step=5)) == ["0", "2"]  # same arithmetic: adopted
    assert model[0].shrink_qat is not first and model[0].shrink_qat is model[2].shrink_qat
    with pytest.raises(ValueError, match=r"layer '0' is already prepared.*with \{'weight_bits': 8"):
        prepare_qat(model, QuantizationConfig(activations="static"))
    peer = LayerSettings(QuantizationConfig(), owner="a")
    prepare_qat(model, owner="a", settings=peer)  # as if a plugin "a" of the same Trainer had
    with pytest.raises(ValueError, match="'b' and QuantizationAwareTraining 'a' both select '0'"):
        prepare_qat(model, owner="b", peers=[peer])
    assert prepare_qat(model, owner="b") == ["0", "2"]  # "a" is not active: its layers are adopted
    assert model[0].shrink_qat.owner == "b"


# ----------------------------------------------------------------------------------- conversion


def test_shrink_convert_refuses_a_never_prepared_model():
    with pytest.raises(ValueError, match=r"nothing to convert.*QuantizationAwareTraining"):
        ls.convert(tiny_bert())


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("activations", ["dynamic", "static", None])
def test_converted_outputs_equal_the_fake_quantized_outputs(build, activations):
    torch.manual_seed(0)
    model = build()
    prepare_qat(model, QuantizationConfig(activations=activations))
    batch = next(iter(token_dataloader(n=8)))
    if activations == "static":
        with torch.no_grad():
            model.train()(**batch)  # observe a range
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        converted = ls.convert(model)
        got = converted(**batch).logits
    assert sum(isinstance(m, Int8Linear) for m in converted.modules()) >= 8
    assert converted is not model and is_prepared(next(m for m in model.modules() if is_prepared(m)))
    diff = float((got - expected).abs().max())
    assert diff <= CONVERSION_TOLERANCE, diff
    assert not torch.equal(expected, build().eval()(**batch).logits)  # it is not the float model
    with pytest.raises(ValueError, match="nothing to convert"):
        ls.convert(converted)


def test_kernel_and_reference_path_agree(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    prepare_qat(nn.Sequential(lin))
    x = torch.randn(5, 64) * 4 + 1
    with torch.no_grad():
        fq = lin(x)
        native_layer = Int8Linear.from_prepared(lin)
        native = native_layer(x)
        assert native_layer._packed is not False, "the native x86 int8 kernel should be available"
        monkeypatch.setenv(_kernels.ENV_KERNEL, "reference")
        assert _kernels.kernel_name() == "reference"
        reference_layer = Int8Linear.from_prepared(lin)
        reference = reference_layer(x)
        assert reference_layer._packed is False
    torch.testing.assert_close(native, fq, atol=CONVERSION_TOLERANCE, rtol=0)
    torch.testing.assert_close(reference, fq, atol=CONVERSION_TOLERANCE, rtol=0)


def test_other_quantized_engines_use_the_reference_path():
    previous = torch.backends.quantized.engine
    assert previous in ("x86", "fbgemm") and _kernels.native_available()
    engines = [e for e in torch.backends.quantized.supported_engines if e not in ("x86", "fbgemm")]
    if not engines:
        pytest.skip("this torch build has only fbgemm engines")
    torch.backends.quantized.engine = engines[0]
    try:
        assert not _kernels.native_available() and _kernels.kernel_name() == "reference"
    finally:
        torch.backends.quantized.engine = previous
    assert os.environ.get(_kernels.ENV_KERNEL) is None


def test_convolutions_convert_with_the_simulated_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    prepare_qat(model, QuantizationConfig(weight_bits=4))
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        expected = model(x)
        converted = ls.convert(model)
        got = converted(x)
    assert isinstance(converted[0], Int8Conv) and isinstance(converted[3], Int8Linear)
    assert int(converted[0].weight.abs().max()) <= 7
    torch.testing.assert_close(got, expected, atol=CONVERSION_TOLERANCE, rtol=0)


def test_the_names_of_the_old_modules_module_still_import_with_a_warning():
    import lightning_shrink.quantization.modules as old

    with pytest.warns(
        DeprecationWarning, match="import is_prepared from lightning_shrink.quantization.fake_layers"
    ):
        assert old.is_prepared is is_prepared
    with pytest.warns(
        DeprecationWarning, match="import Int8Linear from lightning_shrink.quantization.int8_layers"
    ):
        assert old.Int8Linear is Int8Linear
    with pytest.raises(AttributeError, match="no attribute 'select_everything'"):
        old.select_everything  # noqa: B018
