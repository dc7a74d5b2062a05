"""Export and load of quantized models: int4 packing, tied embeddings written once and kept tied,
and damaged exports reported as ValueError naming the layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lightning_shrink as ls
from lightning_shrink.export import read_export
from lightning_shrink.quantization import Int8Embedding, Int8Linear, QuantizationConfig, prepare_qat
from lightning_shrink.quantization.hooks import pack_int4, unpack_int4
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

# The converted model against the fake-quantized one: equal up to float rounding.
CONVERSION_TOLERANCE = 1e-5


def export_bytes(directory: Path) -> int:
    return (Path(directory) / "model.safetensors").stat().st_size


def test_int4_grouped_weights_convert_and_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    prepare_qat(model, QuantizationConfig(weight_bits=4, group_size=8))
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
        converted = ls.convert(model)
        got = converted(x)
    first = converted[0]
    assert isinstance(first, Int8Linear) and first.weight_scale.shape == (16, 4)
    assert int(first.weight.abs().max()) <= 7
    torch.testing.assert_close(got, expected, atol=CONVERSION_TOLERANCE, rtol=0)
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
    config = QuantizationConfig(weight_bits=4, group_size=16, embedding_bits=4, embedding_group_size=8)
    prepare_qat(model, config)
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
    torch.testing.assert_close(got, expected, atol=CONVERSION_TOLERANCE, rtol=0)

    int4_dir = ls.export(converted, tmp_path / "int4")
    loaded = ls.load(int4_dir, model=build())
    with torch.no_grad():
        assert torch.equal(loaded(ids), got)
    assert torch.equal(loaded[0].weight, table8.weight)

    # Two values per byte: the int4 table's weight takes half the bytes of an int8 one.
    with safe_open(str(Path(int4_dir) / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("0.weight")
        assert packed.dtype == torch.uint8 and packed.numel() == 50 * 16 // 2
        assert f.get_tensor("2.weight").numel() == 4 * 48 // 2
    layers = json.loads((Path(int4_dir) / "shrink_config.json").read_text())["quantization"]["layers"]
    assert layers["0"]["int4_shape"] == [50, 16] and layers["2"]["int4_shape"] == [4, 48]


def test_int4_pack_roundtrip_and_a_damaged_packed_weight(tmp_path):
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:47]  # odd length: one pad nibble
    assert torch.equal(unpack_int4(pack_int4(values), [47]), values)
    with pytest.raises(ValueError, match="does not hold shape"):
        unpack_int4(pack_int4(values), [48, 2])

    model = nn.Sequential(nn.Linear(8, 4))
    prepare_qat(model, QuantizationConfig(weight_bits=4))
    directory = ls.export(ls.convert(model), tmp_path / "int4")
    config = json.loads((directory / "shrink_config.json").read_text())
    config["quantization"]["layers"]["0"]["int4_shape"] = [4, 9]
    (directory / "shrink_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized layer '0'.*does not hold shape \[4, 9\]"):
        ls.load(directory, model=nn.Sequential(nn.Linear(8, 4)))


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
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    module.model.eval()
    with torch.no_grad():
        expected = module.model(**inputs).logits
        converted = ls.convert(module.model)
        torch.testing.assert_close(converted(**inputs).logits, expected, atol=CONVERSION_TOLERANCE, rtol=0)
    int4 = converted.bert.embeddings.word_embeddings
    assert isinstance(int4, Int8Embedding) and int4.weight_bits == 4 and int4.group_size == 16

    module8 = TinyTransformerClassifier(tiny_bert)
    prepare_qat(module8.model)
    size4 = export_bytes(ls.export(converted, tmp_path / "int4"))
    size8 = export_bytes(ls.export(ls.convert(module8.model), tmp_path / "int8"))
    assert size4 < size8
    loaded = ls.load(tmp_path / "int4")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, converted(**inputs).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------ tied embeddings


def causal_lm(family: str, tie: bool) -> nn.Module:
    import transformers

    common = dict(vocab_size=256, max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(config)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like, **common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like, **common))


@pytest.mark.parametrize(
    ("family", "embedding_bits"), [("llama", 8), ("qwen2", 8), ("gpt2", 8), ("llama", 4)], ids=str
)
def test_tied_embeddings_are_written_once_and_stay_tied(family, embedding_bits, tmp_path):
    config = QuantizationConfig(
        embedding_bits=embedding_bits, embedding_group_size=16 if embedding_bits == 4 else None
    )
    torch.manual_seed(0)
    tied = causal_lm(family, tie=True)
    table_name = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "qwen2": "model.embed_tokens"}[
        family
    ]
    assert tied.lm_head.weight is tied.get_submodule(table_name).weight
    prepare_qat(tied, config)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    tied.eval()
    with torch.no_grad():
        fake = tied(ids).logits
        converted = ls.convert(tied)
        assert float((converted(ids).logits - fake).abs().max()) <= CONVERSION_TOLERANCE

    # The head computes with the very int8 table of the embedding.
    head, table = converted.lm_head, converted.get_submodule(table_name)
    assert isinstance(head, Int8Linear) and isinstance(table, Int8Embedding)
    assert head.weight is table.weight and head.weight_scale is table.weight_scale

    # Written once (prepared or converted), tied again after load.
    for name, model in (("prepared", tied), ("converted", converted)):
        out = ls.export(model, tmp_path / name, format="native")
        _, metadata = read_export(out)
        assert metadata["aliases"] == {
            "lm_head.weight": f"{table_name}.weight",
            "lm_head.weight_scale": f"{table_name}.weight_scale",
        }
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert not any(k.startswith("lm_head.") for k in f.keys())  # noqa: SIM118
        loaded = ls.load(out)
        assert loaded.lm_head.weight is loaded.get_submodule(table_name).weight
        assert loaded.lm_head.weight_scale is loaded.get_submodule(table_name).weight_scale
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, converted(ids).logits)

    torch.manual_seed(0)
    untied = causal_lm(family, tie=False)
    assert untied.lm_head.weight is not untied.get_submodule(table_name).weight
    prepare_qat(untied, config)
    untied_dir = ls.export(ls.convert(untied), tmp_path / "untied", format="native")
    assert export_bytes(tmp_path / "converted") < export_bytes(untied_dir)
    assert export_bytes(untied_dir) - export_bytes(tmp_path / "converted") >= 256 * 32 * embedding_bits // 8


# -------------------------------------------------------------------------------- damaged exports


def damaged(tmp_path: Path, edit) -> Path:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    prepare_qat(model, modules=["0"])
    directory = ls.export(model, tmp_path / "export", overwrite=True)
    config = json.loads((directory / "shrink_config.json").read_text())
    edit(config["quantization"])
    (directory / "shrink_config.json").write_text(json.dumps(config))
    return directory


def rebuild() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda q: q["layers"]["0"].update({"class": "Int3Linear"}),
            r"'0': unknown quantized class 'Int3Linear'",
        ),
        (lambda q: q["layers"]["0"].pop("class"), r"'0': unknown quantized class None"),
        (lambda q: q["layers"]["0"].pop("config"), r"'0': its `config` must be an object"),
        (lambda q: q["layers"].update({"0": [1, 2]}), r"'0': its entry must be an object"),
        (lambda q: q["layers"]["0"]["config"].update({"kernel": "x"}), r"'0': its config .* does not build"),
        (lambda q: q["layers"]["0"]["config"].pop("in_features"), r"'0': its config .* does not build"),
        (lambda q: q["layers"]["0"].update({"int4_shape": "4x8"}), r"'0': `int4_shape` must be a list"),
        (
            lambda q: q["layers"].update({"2": q["layers"]["0"]}),
            r"'2': the tensor '2.weight_scale' is missing",
        ),
        (
            lambda q: q["layers"]["0"]["config"].update({"activations": "static"}),
            r"'0.input_scale' is missing",
        ),
        (lambda q: q.pop("layers"), r"`quantization.layers` in shrink_config.json must map layer names"),
    ],
    ids=[
        "class",
        "no class",
        "no config",
        "entry",
        "config key",
        "config field",
        "int4 shape",
        "tensor",
        "static",
        "layers",
    ],
)
def test_damaged_exports_are_value_errors_naming_the_layer(tmp_path, edit, match):
    directory = damaged(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        ls.load(directory, model=rebuild())


def test_shrink_load_reports_missing_tensors_of_a_layer(tmp_path):
    directory = damaged(tmp_path, lambda q: None)
    tensors, metadata = read_export(directory)
    pm = ls.get_plugin_manager(autoload=False)
    for key in ("0.weight", "0.weight_scale", "0.bias"):
        broken = {k: v for k, v in tensors.items() if k != key}
        with pytest.raises(ValueError, match=f"quantized layer '0': the tensor '{key}' is missing"):
            pm.hook.shrink_load(tensors=broken, metadata=metadata)
    with pytest.raises(ValueError, match=r"quantized layer '0' does not exist in the rebuilt Sequential"):
        pm.hook.shrink_load_model(model=nn.Sequential(), metadata=metadata)
