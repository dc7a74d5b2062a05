"""Conversion, export and loading of compressed models.

:func:`convert` turns a model trained with lightning-shrink callbacks into its inference form
(int8 layers); :func:`export` writes a model (prepared or converted) as a directory; :func:`load`
reads it back without the training code. All three go through the plugin hooks
``shrink_convert``, ``shrink_export``, ``shrink_load`` and ``shrink_load_model``, so third-party
plugins can add their own encodings.

An export directory holds:

``model.safetensors``
    The encoded tensors (int8 weights and their scales, sparse encodings, float tensors).
``shrink_config.json``
    ``format``, ``format_version``, how to rebuild the architecture (``architecture``), tensor
    aliases of tied weights (``aliases``), and one section per plugin that encoded something (for
    example ``quantization``, ``pruning``).
``config.json``
    For transformers models only: the model's ``PretrainedConfig``.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_shrink.manager import ShrinkPluginManager, get_plugin_manager

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "convert", "export", "load"]

FORMAT = "lightning-shrink"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "shrink_config.json"


def _signature(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def convert(
    model: nn.Module, inplace: bool = False, pluginmanager: ShrinkPluginManager | None = None
) -> nn.Module:
    """Convert a trained model into its compressed inference form.

    Calls ``shrink_convert``: quantization replaces every fake-quantized layer by an int8 layer
    (see :mod:`lightning_shrink.quantization`). Conversion is never done by ``fit``.

    Args:
        model: The trained model (a LightningModule or any ``nn.Module`` inside it).
        inplace: Convert ``model`` itself; by default a deep copy is converted and ``model``
            stays trainable.
        pluginmanager: The manager whose plugins convert; default :func:`get_plugin_manager`.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Raises:
        ValueError: If no plugin converted anything, e.g. the model was never prepared by
            ``QuantizationAwareTraining`` or is already converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: `model` must be a torch.nn.Module, got {type(model).__name__}")
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    target = model if inplace else copy.deepcopy(model)
    before = _signature(target)
    pm.hook.shrink_convert(model=target)
    if _signature(target) == before:
        plugins = sorted({impl.plugin_name for impl in pm.hook.shrink_convert.get_hookimpls()})
        raise ValueError(
            f"convert: nothing to convert in {type(model).__name__}: it has no layer prepared by a "
            f"lightning-shrink technique (was it trained with QuantizationAwareTraining? is it already "
            f"converted?); plugins that convert: {plugins}"
        )
    return target


# ------------------------------------------------------------------------------------ architecture


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _architecture(model: nn.Module, init_args: Mapping[str, Any] | None) -> dict[str, Any]:
    if _is_transformers(model):
        return {"kind": "transformers", "class": type(model).__name__, "class_path": _class_path(model)}
    arch: dict[str, Any] = {"kind": "module", "class_path": _class_path(model)}
    if init_args is None:
        hparams = getattr(model, "hparams", None)
        if hparams is not None and len(hparams) and _json_ok(dict(hparams)):
            init_args = dict(hparams)
    if init_args is not None:
        if not _json_ok(dict(init_args)):
            raise TypeError("export: `init_args` must be JSON-serializable")
        arch["init_args"] = dict(init_args)
    return arch


def _rebuild(directory: Path, arch: Mapping[str, Any]) -> nn.Module:
    if arch.get("kind") == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(directory)
        cls = getattr(transformers, arch["class"], None) or _import(arch["class_path"])
        return cls(config)
    if "init_args" not in arch:
        raise ValueError(
            f"load: the export of {arch.get('class_path')} does not record how to construct it (it was "
            "not a transformers model, had no saved hyperparameters and export() got no `init_args`); "
            "pass an instance of the architecture: load(directory, model=MyModel(...))"
        )
    return _import(arch["class_path"])(**arch["init_args"])


# ------------------------------------------------------------------------------------------ export


def export(
    model: nn.Module,
    directory: str | os.PathLike[str],
    init_args: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    pluginmanager: ShrinkPluginManager | None = None,
) -> Path:
    """Write ``model`` in its compressed form to ``directory``.

    Plugins encode the tensors (``shrink_export``): quantization writes prepared or converted
    layers as int8 weights plus scales; pruning writes sparse tensors where that is smaller. The
    directory is written atomically: into a temporary sibling directory that is renamed at the
    end, so a failure leaves nothing half-written.

    Args:
        model: A transformers ``PreTrainedModel``, a LightningModule or any ``nn.Module``,
            prepared by a technique (fake-quantized) or already converted.
        directory: Target directory; it must not exist or be empty unless ``overwrite``.
        init_args: JSON-serializable keyword arguments that rebuild the architecture,
            ``type(model)(**init_args)``, for a plain ``nn.Module``. LightningModules default to
            their saved hyperparameters; transformers models are rebuilt from ``config.json``.
        overwrite: Replace an existing export in ``directory``.
        pluginmanager: The manager whose plugins encode; default :func:`get_plugin_manager`.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"export: `model` must be a torch.nn.Module, got {type(model).__name__}")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"export: {str(target)!r} exists and is not empty; pass overwrite=True")
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": _architecture(model, init_args),
    }
    tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in model.state_dict().items()}
    pm.hook.shrink_export(model=model, tensors=tensors, metadata=metadata)
    # Tied weights (embeddings and LM heads) are written once; the others are recorded as aliases.
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"export: state entry {key!r} is a {type(value).__name__}, not a tensor")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = value.contiguous().cpu()
    metadata["aliases"] = aliases

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if metadata["architecture"]["kind"] == "transformers":
            model.config.save_pretrained(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -------------------------------------------------------------------------------------------- load


def read_export(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw (still encoded) tensors and the metadata of an export directory."""
    from safetensors.torch import load_file

    path = Path(directory)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        raise FileNotFoundError(
            f"load: {str(path)!r} is not a lightning-shrink export (missing {', '.join(missing)}); "
            "write one with lightning_shrink.export(model, directory)"
        )
    try:
        metadata = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"load: {str(config_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"load: {str(config_path)!r} is not a lightning-shrink export configuration")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load: export format version {metadata.get('format_version')!r} is not supported "
            f"(this lightning-shrink reads version {FORMAT_VERSION})"
        )
    return load_file(str(weights_path)), metadata


def load(
    directory: str | os.PathLike[str],
    model: nn.Module | None = None,
    pluginmanager: ShrinkPluginManager | None = None,
) -> nn.Module:
    """Read an export back as a ready-to-run model, without the training code.

    The architecture is rebuilt from the export (transformers: its class and ``config.json``;
    other modules: ``class(**init_args)``) unless ``model`` is given. Plugins decode the tensors
    (``shrink_load``) and restore their compressed layers (``shrink_load_model``, e.g. int8 layers);
    then the tensors are loaded with ``strict=True``. The model is returned in eval mode.

    Args:
        directory: A directory written by :func:`export`.
        model: An instance of the exported architecture (with its original float layers) to
            load into, for plain modules exported without ``init_args``.
        pluginmanager: The manager whose plugins decode; default :func:`get_plugin_manager`.

    Raises:
        FileNotFoundError: ``directory`` is not an export.
        ValueError: The export is damaged, of another format version, or does not fit ``model``.
    """
    tensors, metadata = read_export(directory)
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    pm.hook.shrink_load(tensors=tensors, metadata=metadata)
    for alias, source in metadata.get("aliases", {}).items():
        tensors[alias] = tensors[source]
    if model is None:
        model = _rebuild(Path(directory), metadata.get("architecture", {}))
    pm.hook.shrink_load_model(model=model, metadata=metadata)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"load: the export in {str(directory)!r} does not fit {type(model).__name__}: {exc}"
        ) from exc
    _retie(model, metadata)
    return model.eval()


def _retie(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Make aliased float parameters one Parameter again (``load_state_dict`` copies values)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in metadata.get("aliases", {}).items():
        if alias in params and source in params and params[alias] is not params[source]:
            module_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            setattr(owner, attr, params[source])
