"""lightning_shrink.convert / export / load: round trips, architectures, atomic writes, errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

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
    out = ls.export(converted, tmp_path / "int8", format="native")
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", CONFIG_NAME, WEIGHTS_NAME])
    loaded = ls.load(out)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded), logits(converted))  # same int8 layers, same kernels
    assert sum(is_converted(m) for m in loaded.modules()) == sum(is_converted(m) for m in converted.modules())

    # Exporting the trained (fake-quantized, unconverted) model writes the same int8 model.
    loaded2 = ls.load(ls.export(model, tmp_path / "prepared", format="native"))
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
    out = ls.export(model, tmp_path / "m", format="native")
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
    # A LightningModule with saved hyperparameters is rebuilt from them, if the directory is trusted.
    lm = ls.export(classifier, tmp_path / "lm")
    with pytest.raises(
        ValueError, match=r"model=MyModel\(\.\.\.\)\), or trust_remote_code=True if you trust"
    ):
        ls.load(lm)
    loaded = ls.load(lm, trust_remote_code=True)
    assert isinstance(loaded, TinyClassifier) and isinstance(loaded.classifier, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    # A plain module: `init_args` at export, or an instance at load.
    seq = nn.Sequential(nn.Linear(8, 4))
    prepare_qat(seq)
    out = ls.export(seq, tmp_path / "seq")
    for trust in (False, True):
        with pytest.raises(ValueError, match=r"load\(directory, model=MyModel"):
            ls.load(out, trust_remote_code=trust)
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
    out = ls.export(model, tmp_path / "fp32", format="native")
    _, metadata = read_export(out)
    assert metadata["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = ls.load(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)

    # Quantized: the embedding becomes int8 and the tied head computes with the same int8 table,
    # written once (tests/test_quantization_export.py covers Llama, Qwen2 and GPT-2).
    prepare_qat(model)
    loaded = ls.load(ls.export(model, tmp_path / "int8", format="native"))
    assert isinstance(loaded.transformer.wte, Int8Embedding) and isinstance(loaded.lm_head, Int8Linear)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


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
        model,
        tmp_path / "dense",
        pluginmanager=ls.get_plugin_manager(block_plugins=["pruning-export"]),
        format="native",
    )
    sparse = ls.export(model, tmp_path / "sparse", format="native")
    assert (sparse / WEIGHTS_NAME).stat().st_size < (dense / WEIGHTS_NAME).stat().st_size
    _, metadata = read_export(sparse)
    assert "quantization" in metadata and "pruning" in json.dumps(metadata)
    loaded = ls.load(sparse)
    assert torch.equal(logits(loaded), logits(ls.convert(model)))
    query = loaded.bert.encoder.layer[0].attention.self.query
    assert float((query.weight == 0).float().mean()) > 0.7


# ------------------------------------------------------------------ loading runs no code from the export


def crafted(tmp_path, name: str = "crafted", **architecture) -> Path:
    """A real export of ``nn.Sequential(nn.Linear(4, 4))`` whose ``architecture`` is then rewritten."""
    out = ls.export(nn.Sequential(nn.Linear(4, 4)), tmp_path / name, init_args={})
    config = json.loads((out / CONFIG_NAME).read_text())
    config["architecture"] = architecture
    (out / CONFIG_NAME).write_text(json.dumps(config))
    return out


def marker_module(marker: Path, base: str = "nn.Sequential") -> str:
    """Source of a module that leaves ``marker`` when executed and defines ``Evil``, a model class."""
    return (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('executed')\n"
        "from torch import nn\n"
        f"class Evil({base}):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Linear(4, 4))\n"
    )


def test_load_never_calls_os_system_named_by_an_export(tmp_path):
    marker = tmp_path / "pwned"
    out = crafted(tmp_path, kind="module", class_path="os:system", init_args={"command": f"touch {marker}"})
    with pytest.raises(
        ValueError, match=r"load\(directory, model=MyModel\(\.\.\.\)\), or trust_remote_code=True"
    ):
        ls.load(out)
    # Trusting the directory imports `os` (harmless), but `system` is not an nn.Module class.
    with pytest.raises(
        ValueError, match=r"'os:system' named by the export is not a torch.nn.Module subclass"
    ):
        ls.load(out, trust_remote_code=True)
    assert not marker.exists()
    with pytest.raises(TypeError, match="trust_remote_code"):
        ls.load(out, trust_remote_code="yes")


def test_load_never_executes_a_module_shipped_in_the_export(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    name = "shrink_shipped_export"
    out = crafted(tmp_path, name, kind="module", class_path="evil_mod:Evil", init_args={})
    (out / "evil_mod.py").write_text(marker_module(marker))

    def refused(class_path: str) -> None:
        config = json.loads((out / CONFIG_NAME).read_text())
        config["architecture"]["class_path"] = class_path
        (out / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(ValueError, match="or trust_remote_code=True if you trust the directory"):
            ls.load(out)
        with pytest.raises(ValueError, match=r"inside the export directory.*load\(directory, model=MyModel"):
            ls.load(out, trust_remote_code=True)

    # '' on sys.path with the export as working directory (python started inside it).
    with monkeypatch.context() as m:
        m.chdir(out)
        m.syspath_prepend("")
        refused("evil_mod:Evil")
    # The directory and its parent on sys.path: the module, or the directory as a namespace package.
    monkeypatch.syspath_prepend(str(out))
    monkeypatch.syspath_prepend(str(tmp_path))
    refused("evil_mod:Evil")
    refused(f"{name}.evil_mod:Evil")
    sys.modules.pop(name, None)  # the namespace package (no code) imported on the way
    # The directory as a regular package: its __init__.py is refused as well.
    (out / "__init__.py").write_text(marker_module(marker))
    refused(f"{name}:Evil")
    assert not marker.exists() and "evil_mod" not in sys.modules and name not in sys.modules

    # A trusted module outside the directory that imports one from inside: refused on the way.
    outside = tmp_path / "code"
    outside.mkdir()
    (outside / "shrink_outside_mod.py").write_text("import evil_mod\nEvil = evil_mod.Evil\n")
    monkeypatch.syspath_prepend(str(outside))
    refused("shrink_outside_mod:Evil")
    assert not marker.exists() and "evil_mod" not in sys.modules

    # A module from inside the directory that is already imported is refused too.
    (out / "shrink_planted.py").write_text(marker_module(tmp_path / "planted"))
    monkeypatch.delitem(sys.modules, "shrink_planted", raising=False)  # so that teardown removes it
    importlib.import_module("shrink_planted")  # imported by the test itself, not by load()
    refused("shrink_planted:Evil")

    # The export reached through a symlink: the module's real path is inside it all the same.
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    out = tmp_path / "link"
    refused("evil_mod:Evil")
    assert not marker.exists()

    # The same export loads into a given instance: nothing is rebuilt from the directory.
    loaded = ls.load(out, model=nn.Sequential(nn.Linear(4, 4)))
    assert type(loaded) is nn.Sequential and not marker.exists()


def test_transformers_exports_are_rebuilt_from_transformers_classes_only(tmp_path):
    torch.manual_seed(0)
    out = ls.export(tiny_bert(), tmp_path / "bert")
    config = json.loads((out / CONFIG_NAME).read_text())
    for name in ("AutoConfig", "set_seed", "NoSuchModelForAnything", "__class__"):
        config["architecture"] = {"kind": "transformers", "class": name, "class_path": "os:system"}
        (out / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"architecture '{name}', which is not a PreTrainedModel class"):
            ls.load(out)
        with pytest.raises(
            ValueError, match=r"'os:system' named by the export is not a transformers\.PreTrainedModel"
        ):
            ls.load(out, trust_remote_code=True)
    # A PreTrainedModel class that takes another configuration than config.json's.
    config["architecture"] = {"kind": "transformers", "class": "GPT2Model", "class_path": "x:y"}
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'bert', but GPT2Model takes a GPT2Config"):
        ls.load(out)


def test_a_transformers_subclass_of_your_own_needs_trust_remote_code(tmp_path, monkeypatch):
    code = tmp_path / "code"  # installed code, outside the export
    code.mkdir()
    (code / "shrink_custom_bert.py").write_text(
        "from transformers import BertForSequenceClassification\n"
        "class CustomBert(BertForSequenceClassification):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "shrink_custom_bert", raising=False)  # so that teardown removes it
    from shrink_custom_bert import CustomBert

    torch.manual_seed(0)
    model = CustomBert(tiny_bert().config).eval()
    out = ls.export(model, tmp_path / "custom")
    with pytest.raises(ValueError, match=r"architecture 'CustomBert', which is not a PreTrainedModel class"):
        ls.load(out)
    loaded = ls.load(out, trust_remote_code=True)
    assert type(loaded) is CustomBert
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_json_auto_map_and_hub_kernels_are_never_used(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_bert().eval()
    out = ls.export(model, tmp_path / "bert")
    marker = tmp_path / "executed"
    (out / "evil_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class EvilConfig(BertConfig):\n    pass\n"
        "class EvilModel(BertForSequenceClassification):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(out))
    raw = json.loads((out / "config.json").read_text())
    raw["auto_map"] = {
        "AutoConfig": "evil_config.EvilConfig",
        "AutoModelForSequenceClassification": "evil_config.EvilModel",
    }
    (out / "config.json").write_text(json.dumps(raw))
    ids = torch.randint(0, 64, (2, 8))
    for loaded in (ls.load(out), ls.load(out, trust_remote_code=True)):
        assert type(loaded) is type(model) and not hasattr(loaded.config, "auto_map")
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Without a model_type transformers knows, AutoConfig would reach for the remote code: refused.
    raw["model_type"] = "evil_custom"
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="model_type 'evil_custom', but BertForSequenceClassification"):
        ls.load(out)
    with pytest.raises(ValueError, match="model_type 'evil_custom', but BertForSequenceClassification"):
        ls.load(out, trust_remote_code=True)
    assert not marker.exists() and "evil_config" not in sys.modules

    # An attention or experts implementation that names a kernel on the Hub (code transformers would fetch).
    raw["model_type"] = "bert"
    for key in ("attn_implementation", "experts_implementation"):
        (out / "config.json").write_text(json.dumps({**raw, key: "some-org/flash-attn"}))
        with pytest.raises(
            ValueError, match=rf"{key} = 'some-org/flash-attn', a kernel from the Hugging Face Hub"
        ):
            ls.load(out)


# ------------------------------------------------------------------------------- damaged exports


def test_a_truncated_or_inconsistent_weights_file_is_a_value_error(tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    out = ls.export(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m", init_args={})
    weights = out / WEIGHTS_NAME
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    for read in (read_export, lambda d: ls.load(d, model=nn.Sequential(nn.Linear(4, 4)))):
        with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}' is not a readable safetensors file") as info:
            read(out)
        assert isinstance(info.value.__cause__, SafetensorError)

    # A header that parses, with tensors that are not what the model holds.
    weights.write_bytes(intact)
    tensors = load_file(str(weights))
    save_file({**tensors, "0.weight": tensors["0.weight"].to(torch.int32)}, str(weights))
    with pytest.raises(
        ValueError, match=r"tensor '0.weight' .* is torch.int32, but Sequential holds torch.float32"
    ):
        ls.load(out, model=nn.Sequential(nn.Linear(4, 4)))
    save_file({**tensors, "0.weight": tensors["0.weight"][:2]}, str(weights))
    with pytest.raises(ValueError, match="does not fit Sequential"):
        ls.load(out, model=nn.Sequential(nn.Linear(4, 4)))
    save_file(tensors, str(weights))
    config = json.loads((out / CONFIG_NAME).read_text())
    config["aliases"] = {"0.bias": "1.weight"}
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"aliases '0\.bias' to '1\.weight', which is not in model\.safetensors"
    ):
        ls.load(out, model=nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------------------------------- replacing an export


ROOT = Path(__file__).resolve().parents[1]
KILLED_EXPORT = Path(__file__).parent / "scripts" / "export_killed.py"


def linear(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(value)
        model[0].bias.fill_(value)
    return model


def weight_of(directory: Path) -> float:
    return ls.load(directory, model=nn.Sequential(nn.Linear(4, 4)))[0].weight[0, 0].item()


def others(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def killed_export(target: Path, moment: str, value: float) -> str:
    """Run ``export(overwrite=True)`` in a child process that SIGKILLs itself at ``moment``."""
    import signal

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(KILLED_EXPORT), str(target), moment, str(value)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment, survivor",
    [("weights", 1.0), ("between-renames", 1.0), ("after-exchange", 2.0)],
)
def test_an_export_killed_while_replacing_leaves_an_export_and_the_next_one_cleans_up(
    tmp_path, moment, survivor
):
    target = ls.export(linear(1.0), tmp_path / "out", init_args={})
    stdout = killed_export(target, moment, 2.0)
    if moment == "between-renames":
        # No atomic swap: killed with the old export renamed away and the new one complete beside it.
        assert not target.exists() and len(others(target)) == 2
        with pytest.warns(
            UserWarning, match=r"was missing: an export\(\) replacing it was interrupted; restored"
        ):
            assert weight_of(target) == survivor
        assert target.is_dir()
    else:
        # Half-written weights in the temporary, or the old export in it after the swap.
        assert len(others(target)) == 1
        assert moment != "after-exchange" or "swapped" in stdout
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert weight_of(target) == survivor
    with pytest.warns(UserWarning, match=r"removed 1 stale temporary directory of an interrupted export"):
        ls.export(linear(3.0), target, init_args={}, overwrite=True)
    assert others(target) == []
    assert weight_of(target) == 3.0


def test_recovery_and_cleanup_concern_only_the_target(tmp_path):
    target = ls.export(linear(1.0), tmp_path / "out", init_args={})
    # A backup in the layout of lightning-shrink 0.1 (`.out.XXXXXXXX.old/x`), an unfinished temporary,
    # and the temporaries of two other targets, "out2" and "out.b".
    (tmp_path / ".out.abcd1234.old").mkdir()
    os.replace(target, tmp_path / ".out.abcd1234.old" / "x")
    for name in (".out.efgh5678.tmp", ".out2.abcd1234.tmp", ".out.b.abcd1234.tmp"):
        (tmp_path / name).mkdir()
    with pytest.warns(UserWarning, match=r"restored the previous export from '\.out\.abcd1234\.old/x'"):
        assert weight_of(target) == 1.0
    with pytest.warns(UserWarning, match=r"removed 2 stale temporary directories.*'\.out\.abcd1234\.old'"):
        ls.export(linear(2.0), target, init_args={}, overwrite=True)
    assert others(target) == [".out.b.abcd1234.tmp", ".out2.abcd1234.tmp"]
    assert weight_of(target) == 2.0

    # overwrite=True replaces an export, never a directory that is something else.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"refusing to replace .* not a lightning-shrink export"):
        ls.export(linear(1.0), notes, init_args={}, overwrite=True)
    assert (notes / "a.txt").read_text() == "keep" and others(notes) == sorted(
        [".out.b.abcd1234.tmp", ".out2.abcd1234.tmp", "out"]
    )


@pytest.mark.slow
def test_an_export_holds_the_lock_of_its_folder_while_it_writes(tmp_path):
    import fcntl

    target = ls.export(linear(1.0), tmp_path / "out", init_args={})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        [sys.executable, str(KILLED_EXPORT), str(target), "hold", "2.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while not (tmp_path / "writing").exists():  # the child wrote its weights and waits
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            # Another export or a recovery would wait here: the stale-temporary cleanup never sees
            # the temporary of a live write.
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        (tmp_path / "go").touch()
        _, stderr = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr[-3000:]
    assert weight_of(target) == 2.0


def test_a_config_that_is_not_json_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    from lightning_shrink.serve.model_info import read_model_info

    (tmp_path / CONFIG_NAME).write_text("{not json")
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"load: '.*{CONFIG_NAME}' is not valid JSON: "):
        ls.load(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"serve: '.*config\.json' is not valid JSON: "):
        read_model_info(tmp_path)
