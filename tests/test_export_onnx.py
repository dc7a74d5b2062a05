"""The ONNX export: ONNX Runtime on CPU computes convert()'s outputs, with integer matrix products,
the learned weight scales and pruned zeros, on dynamic batch and sequence sizes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining, convert, export, load
from lightning_shrink.testing.models import TinyTransformerClassifier

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_export_hf import CausalLM, fit, tiny_tokenizer  # noqa: E402

#: The largest difference to convert()'s logits that the tests accept (float32 rounding of the
#: rescaling; the integer products are exact). Measured: below 1e-7 on these models.
TOLERANCE = 1e-5


def run(directory: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], feeds)[0])


def batches(token_types: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch, length in ((1, 5), (3, 12)):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(2, 64, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, -2:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        out.append(inputs)
    return out


def ops(directory: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(directory / "model.onnx")).graph.node)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_qat_bert_runs_in_onnx_runtime_with_integer_matmuls(tmp_path: Path, activations: str) -> None:
    module = fit(
        TinyTransformerClassifier(),
        GradualMagnitudePruning(target_sparsity=0.5, frequency=1, end_step=2),
        QuantizationAwareTraining(activations=activations),
    )
    module.tokenizer = tiny_tokenizer(tmp_path)
    converted = convert(module.model).eval()
    directory = export(module, tmp_path / "onnx", format="onnx")
    # 14 Linear layers (12 in the encoder, pooler, classifier) multiply in int8; the float MatMuls
    # left are attention's (activations by activations).
    assert ops(directory)["MatMulInteger"] == 14 and ops(directory)["MatMul"] == 4
    proto = onnx.load(str(directory / "model.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8 = [w for w in weights.values() if w.dtype.name == "int8" and w.ndim == 2]
    assert len(int8) == 14 + 3  # the Linear weights and the three embedding tables
    assert all(w.dtype.name != "float32" or w.size < 4096 for w in weights.values())  # no float copies
    query = converted.bert.encoder.layer[0].attention.self.query.weight
    assert any((w == query.t().numpy()).all() for w in int8 if w.shape == tuple(query.t().shape))
    assert sum(int((w == 0).sum()) for w in int8) >= 0.3 * sum(w.size for w in int8)  # pruned zeros
    for inputs in batches(token_types=True):
        with torch.no_grad():
            expected = converted(**inputs).logits
        torch.testing.assert_close(run(directory, inputs), expected, atol=TOLERANCE, rtol=0)
    # A servable directory: config, tokenizer, and a format record that load() refuses clearly.
    assert json.loads((directory / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    assert (directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()
    assert json.loads((directory / "shrink_config.json").read_text())["format"] == "lightning-shrink-onnx"
    with pytest.raises(ValueError, match="is an ONNX export; run it with ONNX Runtime"):
        load(directory)


@pytest.mark.parametrize(
    "qat",
    [
        lambda: QuantizationAwareTraining(),
        lambda: QuantizationAwareTraining(weight_bits=4, group_size=16, embeddings=False),
        lambda: QuantizationAwareTraining(activations=None),
    ],
    ids=["int8-dynamic", "int4-grouped", "weight-only"],
)
def test_llama_causal_lm_runs_in_onnx_runtime(tmp_path: Path, qat) -> None:
    module = fit(CausalLM(), qat(), steps=3)
    converted = convert(module.model).eval()
    directory = export(module, tmp_path / "onnx", format="onnx")
    for inputs in batches(token_types=False):
        with torch.no_grad():
            expected = converted(**inputs).logits
        got = run(directory, inputs)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_onnx_export_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    from lightning_shrink.testing.models import TinyClassifier

    with pytest.raises(ValueError, match="holds none"):
        export(TinyClassifier(), tmp_path / "x", format="onnx")
