"""The Hugging Face-native export: ``transformers.from_pretrained`` in a process that cannot import
lightning_shrink, outputs against ``convert()``'s; ``lightning_shrink.load`` of the same directory;
sizes; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining, convert, export, load
from lightning_shrink.quantization.int8_layers import Int8Embedding, Int8Linear
from lightning_shrink.testing.models import TinyTransformerClassifier, cpu_trainer, token_dataloader

pytest.importorskip("compressed_tensors")

#: Run in a fresh interpreter, outside the repository, where ``import lightning_shrink`` fails:
#: ``argv`` = pairs of (directory, transformers Auto class); each directory's ``../inputs.pt`` is
#: run and its logits saved to ``../outputs.pt``.
ISOLATED = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lightning_shrink" or name.startswith("lightning_shrink."):
                raise ImportError("lightning_shrink is not importable here")
    sys.meta_path.insert(0, _Block())
    try:
        import lightning_shrink  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("lightning_shrink was importable")
    import torch, transformers
    args = sys.argv[1:]
    for directory, task in zip(args[::2], args[1::2]):
        model = getattr(transformers, task).from_pretrained(directory)
        inputs = torch.load(directory + "/../inputs.pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        try:
            tokens = transformers.AutoTokenizer.from_pretrained(directory)("a b c")["input_ids"]
        except (OSError, ValueError):
            tokens = None
        torch.save({"logits": logits, "tokens": tokens}, directory + "/../outputs.pt")
    """
)

VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(ord("a") + i) for i in range(26)]
    + [f"w{i}" for i in range(33)]
)


def from_pretrained_isolated(runs: list[tuple[Path, str]]) -> list[dict[str, Any]]:
    """``transformers.<task>.from_pretrained(directory)`` of each run on its ``../inputs.pt``, in one
    subprocess whose cwd and ``sys.path`` hold no repository and where importing lightning_shrink
    raises ImportError."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    args = [str(a) for run in runs for a in run]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, *args],
        cwd=runs[0][0].parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(directory.parent / "outputs.pt") for directory, _ in runs]


def from_pretrained(directory: Path, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """In this process: what transformers alone computes from the directory."""
    import transformers

    torch.save(inputs, directory.parent / "inputs.pt")
    model = getattr(transformers, task).from_pretrained(str(directory))
    with torch.no_grad():
        return model(**inputs).logits


def tiny_tokenizer(tmp_path: Path) -> Any:
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def fit(module: pl.LightningModule, *callbacks: Any, steps: int = 4) -> pl.LightningModule:
    torch.manual_seed(0)
    cpu_trainer(max_steps=steps, callbacks=list(callbacks)).fit(module, token_dataloader(n=32))
    return module


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    converted = convert(model).eval()
    with torch.no_grad():
        return converted(**inputs).logits


class CausalLM(pl.LightningModule):
    """A tiny Llama trained on next-token prediction."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


INPUTS = {
    "input_ids": torch.tensor([[2, 5, 9, 3, 4, 7, 3, 0], [2, 8, 8, 30, 3, 1, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]]),
}


def test_qat_bert_classifier_loads_with_transformers_alone(tmp_path: Path) -> None:
    module = fit(TinyTransformerClassifier(), QuantizationAwareTraining())
    module.tokenizer = tiny_tokenizer(tmp_path)
    expected = reference(module.model, INPUTS)
    directory = export(module, tmp_path / "export")
    config = json.loads((directory / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert {g["format"] for g in quantization["config_groups"].values()} == {"int-quantized"}
    logits = from_pretrained(directory, "AutoModelForSequenceClassification", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(str(directory))("a b c")["input_ids"]
        == module.tokenizer("a b c")["input_ids"]
    )
    # lightning_shrink.load reads it back into int8 layers, with convert()'s outputs.
    loaded = load(directory)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query, Int8Linear)
    assert isinstance(loaded.bert.embeddings.word_embeddings, Int8Embedding)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**INPUTS).logits, expected, atol=1e-5, rtol=1e-4)


def test_pruned_qat_bert_classifier_keeps_its_zeros(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    module = fit(
        TinyTransformerClassifier(),
        GradualMagnitudePruning(target_sparsity=0.5, frequency=1, end_step=2),
        QuantizationAwareTraining(),
    )
    expected = reference(module.model, INPUTS)
    directory = export(module.model, tmp_path / "export")
    weights = load_file(str(directory / "model.safetensors"))
    query = weights["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.dtype == torch.int8 and (query == 0).float().mean() >= 0.3
    logits = from_pretrained(directory, "AutoModelForSequenceClassification", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    native = export(module.model, tmp_path / "native", format="native")
    with torch.no_grad():
        torch.testing.assert_close(load(native)(**INPUTS).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_llama_causal_lm_loads_with_transformers_alone(tmp_path: Path, weight_bits: int) -> None:
    qat = (
        QuantizationAwareTraining()
        if weight_bits == 8
        else QuantizationAwareTraining(weight_bits=4, group_size=16, embeddings=False)
    )
    module = fit(CausalLM(), qat)
    expected = reference(module.model, INPUTS)
    directory = export(module, tmp_path / "export")
    assert (directory / "generation_config.json").is_file()
    config = json.loads((directory / "config.json").read_text())
    formats = {g["format"] for g in config["quantization_config"]["config_groups"].values()}
    assert formats == ({"int-quantized"} if weight_bits == 8 else {"pack-quantized"})
    logits = from_pretrained(directory, "AutoModelForCausalLM", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load(directory)(**INPUTS).logits, expected, atol=1e-4, rtol=1e-4)


def test_int4_embedding_tables(tmp_path: Path) -> None:
    """An int4 grouped table loads in transformers from format="hf" (one value per byte, as
    int-quantized); the default format keeps the native one for it, with a warning saying why."""
    qat = QuantizationAwareTraining(embedding_bits=4, embedding_group_size=16)
    module = fit(TinyTransformerClassifier(), qat)
    expected = reference(module.model, INPUTS)
    with pytest.warns(UserWarning, match="int4 embedding 'bert.embeddings.word_embeddings'"):
        native = export(module, tmp_path / "native")
    assert json.loads((native / "shrink_config.json").read_text())["format"] == "lightning-shrink"
    directory = export(module, tmp_path / "export", format="hf")
    groups = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]
    table = next(g for g in groups.values() if any("word_embeddings" in t for t in g["targets"]))
    assert table["format"] == "int-quantized"
    weights = table["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 16)
    logits = from_pretrained(directory, "AutoModelForSequenceClassification", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    loaded = load(directory)
    word = loaded.bert.embeddings.word_embeddings
    assert isinstance(word, Int8Embedding) and (word.weight_bits, word.group_size) == (4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**INPUTS).logits, expected, atol=1e-5, rtol=1e-4)


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_hf_export_is_no_larger_than_the_native_one(tmp_path: Path) -> None:
    module = fit(TinyTransformerClassifier(), QuantizationAwareTraining(), steps=1)
    hf = export(module, tmp_path / "hf")
    native = export(module, tmp_path / "native", format="native")
    assert json.loads((native / "shrink_config.json").read_text())["format"] == "lightning-shrink"
    assert directory_size(hf) <= directory_size(native)


def test_non_transformers_modules_keep_the_native_format(tmp_path: Path) -> None:
    from lightning_shrink.testing.models import TinyClassifier

    directory = export(TinyClassifier(), tmp_path / "export")
    assert json.loads((directory / "shrink_config.json").read_text())["format"] == "lightning-shrink"
    with pytest.raises(ValueError, match="holds none"):
        export(TinyClassifier(), tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="`format` must be one of"):
        export(TinyClassifier(), tmp_path / "x", format="gguf")
    with pytest.raises(TypeError, match="`tokenizer`"):
        export(TinyClassifier(), tmp_path / "y", tokenizer="bert")


def test_loading_an_hf_export_runs_no_code(tmp_path: Path) -> None:
    module = fit(TinyTransformerClassifier(), QuantizationAwareTraining(), steps=1)
    directory = export(module, tmp_path / "export")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    # auto_map (remote code) is dropped; the class is resolved from transformers by name only.
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model"}
    (directory / "evil.py").write_text("raise SystemExit('ran code from the export')\n")
    config_path.write_text(json.dumps(config))
    assert isinstance(load(directory).bert.pooler.dense, Int8Linear)
    shrink = json.loads((directory / "shrink_config.json").read_text())
    shrink["architecture"]["class"] = "os.system"
    (directory / "shrink_config.json").write_text(json.dumps(shrink))
    with pytest.raises(ValueError, match="not a PreTrainedModel class"):
        load(directory)
    shrink["architecture"]["class"] = "BertForSequenceClassification"
    (directory / "shrink_config.json").write_text(json.dumps(shrink))
    config["attn_implementation"] = "kernels-community/flash-attn"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kernel from the Hugging Face Hub"):
        load(directory)
    # A pickle is never read: only model.safetensors is.
    config.pop("attn_implementation")
    config_path.write_text(json.dumps(config))
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        load(directory)


@pytest.mark.slow
def test_from_pretrained_in_a_process_without_lightning_shrink(tmp_path: Path) -> None:
    """A QAT'd and a pruned+QAT'd BERT classifier, an int8 and int4 Llama and a BERT classifier
    with int4 grouped embedding tables, each loaded by transformers in a process that cannot import
    lightning_shrink, compute convert()'s outputs."""
    cases = [
        (TinyTransformerClassifier(), [QuantizationAwareTraining()], "AutoModelForSequenceClassification"),
        (
            TinyTransformerClassifier(),
            [
                GradualMagnitudePruning(target_sparsity=0.5, frequency=1, end_step=2),
                QuantizationAwareTraining(),
            ],
            "AutoModelForSequenceClassification",
        ),
        (CausalLM(), [QuantizationAwareTraining()], "AutoModelForCausalLM"),
        (
            CausalLM(),
            [QuantizationAwareTraining(weight_bits=4, group_size=16, embeddings=False)],
            "AutoModelForCausalLM",
        ),
        (
            TinyTransformerClassifier(),
            [QuantizationAwareTraining(embedding_bits=4, embedding_group_size=16)],
            "AutoModelForSequenceClassification",
        ),
    ]
    runs, expected = [], []
    for i, (module, callbacks, task) in enumerate(cases):
        fit(module, *callbacks, steps=3)
        if i == 0:
            module.tokenizer = tiny_tokenizer(tmp_path)
        expected.append(reference(module.model, INPUTS))
        directory = export(module, tmp_path / f"case{i}" / "export", format="hf")
        torch.save(INPUTS, directory.parent / "inputs.pt")
        runs.append((directory, task))
    results = from_pretrained_isolated(runs)
    for result, want in zip(results, expected, strict=True):
        torch.testing.assert_close(result["logits"], want, atol=1e-4, rtol=1e-4)
    assert results[0]["tokens"] == cases[0][0].tokenizer("a b c")["input_ids"]


def test_static_activations_and_tied_heads(tmp_path: Path) -> None:
    """Static (observed) activation ranges load as compressed-tensors' static per-tensor scheme; a
    head tied to a quantized embedding is written untied and computes the same."""
    module = fit(TinyTransformerClassifier(), QuantizationAwareTraining(activations="static"))
    expected = reference(module.model, INPUTS)
    directory = export(module, tmp_path / "static")
    logits = from_pretrained(directory, "AutoModelForSequenceClassification", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)

    tied = CausalLM()
    tied.model.config.tie_word_embeddings = True
    tied.model.lm_head.weight = tied.model.model.embed_tokens.weight
    fit(tied, QuantizationAwareTraining(), steps=2)
    expected = reference(tied.model, INPUTS)
    directory = export(tied, tmp_path / "tied")
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is False
    logits = from_pretrained(directory, "AutoModelForCausalLM", INPUTS)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(load(directory)(**INPUTS).logits, expected, atol=1e-4, rtol=1e-4)
