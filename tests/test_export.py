"""lightning_shrink.convert / export / load: round trips, architectures, atomic writes, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lightning_shrink as ls
from lightning_shrink import hookimpl
from lightning_shrink.export import CONFIG_NAME, WEIGHTS_NAME, read_export
from lightning_shrink.quantization import Int8Embedding, Int8Linear, is_converted, prepare_qat
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    tiny_gpt2,
    token_dataloader,
)


def trained(make=tiny_bert, steps: int = 2) -> nn.Module:
    torch.manual_seed(0)
    module = TinyTransformerClassifier(make)
    cpu_trainer(max_steps=steps, callbacks=[ls.QuantizationAwareTraining()]).fit(module, token_dataloader())
    return module.model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    batch = next(iter(token_dataloader(n=8)))
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_export_load_round_trip_of_a_transformers_model(make, tmp_path):
    model = trained(make)
    converted = ls.convert(model)
    out = ls.export(converted, tmp_path / "int8")
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", CONFIG_NAME, WEIGHTS_NAME])
    loaded = ls.load(out)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded), logits(converted))  # same int8 layers, same kernels
    assert sum(is_converted(m) for m in loaded.modules()) == sum(is_converted(m) for m in converted.modules())

    # Exporting the trained (fake-quantized, unconverted) model writes the same int8 model.
    loaded2 = ls.load(ls.export(model, tmp_path / "prepared"))
    assert torch.equal(logits(loaded2), logits(converted))

    tensors, metadata = read_export(out)
    layers = metadata["quantization"]["layers"]
    assert {v["class"] for v in layers.values()} == {"Int8Linear", "Int8Embedding"}
    for name in layers:
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
    assert metadata["architecture"]["kind"] == "transformers"

    # How transformers users get the config; the int8 size is about a quarter of FP32.
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).model_type == model.config.model_type
    fp32 = ls.export(make(), tmp_path / "fp32")
    ratio = (fp32 / WEIGHTS_NAME).stat().st_size / (out / WEIGHTS_NAME).stat().st_size
    assert ratio > 2.5, ratio


def test_load_without_training_code_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = trained()
    out = ls.export(model, tmp_path / "m")
    torch.save(logits(ls.convert(model)), tmp_path / "expected.pt")
    code = (
        "import sys, torch, lightning_shrink as ls\n"
        "from lightning_shrink.testing.models import token_dataloader\n"
        "m = ls.load(sys.argv[1])\n"
        "b = next(iter(token_dataloader(n=8))); b.pop('labels')\n"
        "with torch.no_grad(): got = m(**b).logits\n"
        "assert torch.equal(got, torch.load(sys.argv[2])), (got - torch.load(sys.argv[2])).abs().max()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_plain_modules_lightning_hparams_init_args_or_a_given_instance(tmp_path):
    torch.manual_seed(0)
    classifier = TinyClassifier(in_features=8, hidden=16)
    prepare_qat(classifier)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = ls.convert(classifier)(x)
    # A LightningModule with saved hyperparameters is rebuilt from them.
    loaded = ls.load(ls.export(classifier, tmp_path / "lm"))
    assert isinstance(loaded, TinyClassifier) and isinstance(loaded.classifier, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    # A plain module: `init_args` at export, or an instance at load.
    seq = nn.Sequential(nn.Linear(8, 4))
    prepare_qat(seq)
    out = ls.export(seq, tmp_path / "seq")
    with pytest.raises(ValueError, match=r"load\(directory, model=MyModel"):
        ls.load(out)
    loaded = ls.load(out, model=nn.Sequential(nn.Linear(8, 4)))
    assert isinstance(loaded[0], Int8Linear)
    with pytest.raises(ValueError, match="does not fit"):
        ls.load(out, model=nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)))
    lin = nn.Linear(8, 4)
    prepare_qat(nn.Sequential(lin))
    with pytest.raises(TypeError, match="JSON"):
        ls.export(lin, tmp_path / "bad", init_args={"x": object()})


def test_tied_weights_are_written_once_and_retied(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    out = ls.export(model, tmp_path / "fp32")
    _, metadata = read_export(out)
    assert metadata["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = ls.load(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)

    # Quantized: the embedding becomes int8, the tied head stays float (it shares the tensor).
    prepare_qat(model)
    assert not hasattr(model.lm_head, "shrink_qat")
    loaded = ls.load(ls.export(model, tmp_path / "int8"))
    assert isinstance(loaded.transformer.wte, Int8Embedding) and type(loaded.lm_head) is nn.Linear


def test_shrink_export_failure_leaves_nothing_and_overwrite_is_explicit(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))

    class Broken:
        @hookimpl
        def shrink_export(self, tensors):
            raise RuntimeError("encoder failed")

    pm = ls.get_plugin_manager(plugins=[Broken()], autoload=False)
    with pytest.raises(RuntimeError, match="encoder failed"):
        ls.export(model, tmp_path / "out", init_args={}, pluginmanager=pm)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left

    ls.export(model, tmp_path / "out", init_args={})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ls.export(model, tmp_path / "out")
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ls.export(model, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = ls.load(tmp_path / "out", model=nn.Sequential(nn.Linear(4, 4)))
    assert torch.equal(reloaded[0].weight, torch.ones(4, 4))


def test_load_of_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a lightning-shrink export"):
        ls.load(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a lightning-shrink export configuration"):
        ls.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "lightning-shrink", "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        ls.load(tmp_path)


def test_shrink_load_model_rebuilds_int8_layers_and_checks_tensors(tmp_path):
    seq = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    prepare_qat(seq, modules=["0"])
    out = ls.export(seq, tmp_path / "m", init_args=None)
    tensors, metadata = read_export(out)
    rebuilt = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    pm = ls.get_plugin_manager(autoload=False)
    pm.hook.shrink_load_model(model=rebuilt, metadata=metadata)
    assert isinstance(rebuilt[0], Int8Linear) and type(rebuilt[2]) is nn.Linear
    rebuilt.load_state_dict(tensors, strict=True)

    # A damaged export is reported by the quantization plugin's shrink_load.
    tensors["0.weight"] = tensors["0.weight"].float()
    with pytest.raises(ValueError, match=r"needs an int8 .0\.weight."):
        pm.hook.shrink_load(tensors=tensors, metadata=metadata)


def test_pruned_int8_export_is_sparse_encoded_and_loads(tmp_path):
    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert)
    callbacks = [
        ls.QuantizationAwareTraining(),
        ls.GradualMagnitudePruning(0.8, start_step=0, end_step=2, frequency=1),
    ]
    cpu_trainer(max_steps=3, callbacks=callbacks).fit(module, token_dataloader())
    model = module.model.eval()
    dense = ls.export(
        model, tmp_path / "dense", pluginmanager=ls.get_plugin_manager(block_plugins=["pruning-export"])
    )
    sparse = ls.export(model, tmp_path / "sparse")
    assert (sparse / WEIGHTS_NAME).stat().st_size < (dense / WEIGHTS_NAME).stat().st_size
    _, metadata = read_export(sparse)
    assert "quantization" in metadata and "pruning" in json.dumps(metadata)
    loaded = ls.load(sparse)
    assert torch.equal(logits(loaded), logits(ls.convert(model)))
    query = loaded.bert.encoder.layer[0].attention.self.query
    assert float((query.weight == 0).float().mean()) > 0.7
