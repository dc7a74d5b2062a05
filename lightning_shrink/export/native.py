"""The native format: ``model.safetensors`` + ``shrink_config.json`` (+ ``config.json``)."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_shrink.adapters.export import SECTION as PEFT_SECTION
from lightning_shrink.adapters.export import merge_adapters as merge_lora
from lightning_shrink.adapters.export import peft_builder, peft_section, resolve_merge, restore_lora
from lightning_shrink.config import check_choice
from lightning_shrink.export.architecture import _architecture, _builder
from lightning_shrink.export.atomic import (
    _clean_stale,
    _fsync,
    _fsync_dir,
    _parent_locked,
    _recover,
    _siblings,
    staged_directory,
)
from lightning_shrink.export.hf import HF_FORMAT, find_transformers_model, hf_unsupported, write_hf
from lightning_shrink.export.layout import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    FORMATS,
    ONNX_FORMAT,
    WEIGHTS_NAME,
    read_json,
)
from lightning_shrink.export.safe_import import _imports_guarded, _RefusedImport
from lightning_shrink.manager import ShrinkPluginManager, get_plugin_manager


def export(
    model: nn.Module,
    directory: str | os.PathLike[str],
    init_args: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    pluginmanager: ShrinkPluginManager | None = None,
    merge_adapters: bool | None = None,
    *,
    format: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` in its compressed form to ``directory``.

    Three formats (``format``):

    ``"hf"`` (the default for transformers models, bare or inside a LightningModule)
        A Hugging Face directory that ``transformers.AutoModelFor<Task>.from_pretrained`` loads
        with ``compressed-tensors`` installed, lightning-shrink not needed: quantized layers are
        stored quantized in the compressed-tensors layout (see :mod:`lightning_shrink.export.hf`).
    ``"native"`` (the default for other modules)
        Plugins encode the tensors (``shrink_export``): quantization writes prepared or converted
        layers as int8 weights plus scales; pruning writes sparse tensors where that is smaller.
    ``"onnx"``
        ``model.onnx`` for ONNX Runtime on CPU, with integer matrix products that use the learned
        weight scales, plus ``config.json`` (see :mod:`lightning_shrink.export.onnx`).

    :func:`load` reads ``"hf"`` and ``"native"`` directories. The tokenizer (``tokenizer=``, or the
    LightningModule's ``tokenizer`` attribute) is saved into the directory with its
    ``save_pretrained``, and a generative model's generation config with it.

    The export is written into a temporary sibling, ``.<name>.XXXXXXXX.tmp`` (weights, then
    ``config.json``, then ``shrink_config.json``, each synced to disk), and moved into place once
    complete, so a failure or a kill never leaves a half-written ``directory``. Replacing an existing
    export (``overwrite=True``) keeps a complete export at ``directory`` at every instant: on Linux
    the two directories are swapped in one atomic step (``renameat2(RENAME_EXCHANGE)``) and the old
    one is deleted afterwards. Where the file system cannot swap, the old export is renamed to a
    backup sibling ``.<name>.XXXXXXXX.old`` and the new one renamed into place; if the process dies
    between the two renames, the next :func:`export` or :func:`load` of ``directory`` renames the
    backup back and says so in a warning. The swap is preferred because the fallback needs that
    recovery, while a swap never leaves ``directory`` missing, even for a reader that does not
    recover. Temporaries and backups left by interrupted writes of this ``directory`` (and of no
    other) are removed by the next :func:`export` to it, with a warning. Writes of one target, and
    the recovery, are serialized by an advisory lock on the parent directory (POSIX).

    Args:
        model: A transformers ``PreTrainedModel``, a LightningModule or any ``nn.Module``,
            prepared by a technique (fake-quantized) or already converted.
        directory: Target directory; it must not exist or be empty unless ``overwrite``.
        init_args: JSON-serializable keyword arguments that rebuild the architecture,
            ``type(model)(**init_args)``, for a plain ``nn.Module``. LightningModules default to
            their saved hyperparameters; transformers models are rebuilt from ``config.json``.
            :func:`load` uses them only with ``trust_remote_code=True``.
        overwrite: Replace an existing export in ``directory``. Only an export is replaced: a
            non-empty directory without ``shrink_config.json``, or a file, is refused.
        pluginmanager: The manager whose plugins encode; default :func:`get_plugin_manager`.
        merge_adapters: For a model with peft LoRA adapters: write the merged model (``True``: a copy
            with the adapters folded into the base weights, written like the plain base architecture,
            in any format) or the compressed base weights plus the float adapters (``False``; native
            format only: a ``PeftModel`` records its ``LoraConfig`` fields and :func:`load` rebuilds it
            with ``peft.get_peft_model``). ``None``
            follows ``QuantizationAwareTraining(adapters=...)`` (``"merged"`` merges). See docs/peft.md.
        format: ``"hf"``, ``"native"`` or ``"onnx"``; ``None`` picks ``"hf"`` for a transformers
            model that it can express and ``"native"`` for anything else (with a ``UserWarning``
            saying why, for a transformers model: a class that is not transformers' own, a
            quantized ``Conv1D`` or convolution, an int4 embedding table).
        tokenizer: A transformers tokenizer (anything with ``save_pretrained``) to save with the
            model; default: ``model.tokenizer`` when the LightningModule has one.

    Returns:
        The directory.

    Raises:
        FileExistsError: ``directory`` holds something and ``overwrite`` is false, or it holds
            something that is not an export.
        ValueError: ``format`` is unknown, or ``"hf"``/``"onnx"`` for a model that holds no
            transformers model, or a layer the format cannot express (the message names it).
        ImportError: the optional dependencies of the format are missing (the message names the
            extra to install).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"export: `model` must be a torch.nn.Module, got {type(model).__name__}")
    if format is not None:
        check_choice("export", "format", format, FORMATS)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"export: `tokenizer` must be a transformers tokenizer (with save_pretrained), got "
            f"{type(tokenizer).__name__}"
        )
    # LoRA adapters are merged (a copy) before the format is chosen: a merged model is a plain
    # transformers model; base layers with float adapters are written in the native format only.
    lora: dict[str, Any] | None = None
    merge = resolve_merge(model, merge_adapters, "export")
    if merge:
        model = merge_lora(copy.deepcopy(model))
    elif merge is False:
        if format in ("hf", "onnx"):
            raise ValueError(
                f"export: format={format!r} cannot hold float LoRA adapters over compressed base layers "
                '(merge_adapters=False); pass merge_adapters=True or format="native"'
            )
        format = "native"
        lora = peft_section(model)
    found = find_transformers_model(model) if format != "native" else None
    if format != "native" and found is None:
        if format is not None:
            raise ValueError(
                f"export: format={format!r} writes transformers models, and {type(model).__name__} holds "
                'none; use format="native"'
            )
        format = "native"
    if format == "hf" or format is None:
        assert found is not None
        reason = hf_unsupported(found[1], default=format is None)
        if reason is not None and format == "hf":
            raise ValueError(f'export: format="hf" cannot express this model: {reason}; use format="native"')
        if reason is not None:
            warnings.warn(
                f"export: writing the native lightning-shrink format (read by lightning_shrink.load), not "
                f"the Hugging Face-native one: {reason}",
                UserWarning,
                stacklevel=2,
            )
        format = "hf" if reason is None else "native"
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _parent_locked(target.parent):
        _recover(target, "export")
        _clean_stale(target)
        if os.path.lexists(target):
            empty = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
            if not empty and not overwrite:
                raise FileExistsError(f"export: {str(target)!r} exists and is not empty; pass overwrite=True")
            if not empty and not (target.is_dir() and (target / CONFIG_NAME).is_file()):
                raise FileExistsError(
                    f"export: refusing to replace {str(target)!r}: it is not a lightning-shrink export (it "
                    f"has no {CONFIG_NAME}); choose another directory or remove it yourself"
                )
        if format != "native":
            assert found is not None
            with staged_directory(target) as tmp:
                if format == "hf":
                    info = write_hf(found[1], tmp, tokenizer)
                else:
                    from lightning_shrink.export.onnx import write_onnx

                    info = write_onnx(found[1], tmp, tokenizer)
                (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
                _sync_tree(tmp)
            return target
        pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
        built = model.get_base_model() if lora is not None and "lora_config" in lora else model
        metadata: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": _architecture(built, init_args),
        }
        if lora is not None:
            metadata[PEFT_SECTION] = lora
        tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in model.state_dict().items()}
        pm.hook.shrink_export(model=model, tensors=tensors, metadata=metadata)
        # Tied weights (embeddings and LM heads) are written once; the others are recorded as aliases.
        aliases: dict[str, str] = {}
        seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"export: state entry {key!r} is a {type(value).__name__}, not a tensor")
            ident = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.dtype,
            )
            if value.numel() and ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
            out[key] = value.contiguous().cpu()
        metadata["aliases"] = aliases

        with staged_directory(target) as tmp:
            save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if metadata["architecture"]["kind"] == "transformers":
                built.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            _sync_tree(tmp)
    return target


def _sync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    for path in [*[p for p in directory.rglob("*") if p.is_dir()], directory]:
        _fsync_dir(path)


def _declared_format(path: Path) -> Any:
    """The ``format`` that ``shrink_config.json`` declares (``None`` when unreadable: the native
    reader reports the problem)."""
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _read_metadata(path: Path) -> dict[str, Any]:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        raise FileNotFoundError(
            f"load: {str(path)!r} is not a lightning-shrink export (missing {', '.join(missing)}); "
            "write one with lightning_shrink.export(model, directory)"
        )
    metadata = read_json(config_path, "load")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"load: {str(config_path)!r} is not a lightning-shrink export configuration")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load: export format version {metadata.get('format_version')!r} is not supported "
            f"(this lightning-shrink reads version {FORMAT_VERSION})"
        )
    aliases = metadata.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ValueError(f"load: `aliases` in {str(config_path)!r} must map tensor names to tensor names")
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = path / WEIGHTS_NAME
    try:
        return load_file(str(weights_path))
    except SafetensorError as exc:
        raise ValueError(
            f"load: {str(weights_path)!r} is not a readable safetensors file (truncated or damaged): {exc}"
        ) from exc


def read_export(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw (still encoded) tensors and the metadata of an export directory.

    Raises:
        FileNotFoundError: ``directory`` is not an export.
        ValueError: ``shrink_config.json`` or ``model.safetensors`` is damaged, or of another
            format version.
    """
    path = Path(directory)
    with _imports_guarded(path):
        declared = _declared_format(path)
        if declared in (HF_FORMAT, ONNX_FORMAT) and (path / WEIGHTS_NAME).is_file():
            return _read_tensors(path), json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        metadata = _read_metadata(path)
        return _read_tensors(path), metadata


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def load(
    directory: str | os.PathLike[str],
    model: nn.Module | None = None,
    pluginmanager: ShrinkPluginManager | None = None,
    *,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Read an export back as a ready-to-run model, without the training code.

    Reads native directories and Hugging Face-native ones (``export(..., format="hf")``, the
    default for transformers models): the latter's compressed-tensors layers become the int8 layers
    :func:`convert` makes, and the transformers model is returned (not the LightningModule that
    held it). An ONNX export is refused with a ``ValueError`` (run it with ONNX Runtime).

    The architecture is rebuilt from the export unless ``model`` is given; plugins decode the
    tensors (``shrink_load``) and restore their compressed layers (``shrink_load_model``, e.g.
    int8 layers); then the tensors are loaded with ``strict=True`` (a float tensor may differ in
    precision from the model's, any other dtype must match). The model is returned in eval mode.

    Loading runs no code from the directory. An export directory may come from anyone, so it is
    treated as data: ``load`` reads ``shrink_config.json`` and ``config.json`` as JSON and
    ``model.safetensors`` with ``safetensors`` (no pickle), and

    * never imports a module or calls an object that the directory names, except the two cases
      below; no import made while ``load`` runs (its own, transformers', a plugin's or a trusted
      module's) may execute a file inside the directory, whatever ``sys.path`` holds (``''`` with
      the directory as working directory, the directory, its parent);
    * rebuilds a transformers model by class name from the installed ``transformers`` package only
      (``getattr(transformers, name)``, which must be a ``PreTrainedModel`` subclass), with the
      configuration class that model takes, filled from ``config.json``; ``auto_map`` entries
      (transformers' remote code) are dropped and a kernel from the Hub named as an attention or
      experts implementation is refused;
    * rebuilds any other architecture only from ``model=`` (an instance you built) or with
      ``trust_remote_code=True``.

    ``trust_remote_code=True`` (named as in transformers) trusts the directory's *choice of
    installed code*: the recorded ``class_path`` (``"package.module:Class"``) is imported, which
    runs that module's top-level code, but never from a file inside the directory; the object must
    be an ``nn.Module`` subclass (a ``PreTrainedModel`` subclass for a transformers export whose
    class is not in ``transformers``), never a function such as ``os.system``, and it is called with
    the recorded ``init_args`` as keyword arguments only. Pass it for exports you made yourself.

    If ``directory`` is missing because an :func:`export` replacing it was killed between its two
    renames (file systems without an atomic swap), the previous export is renamed back from its
    backup first, with a warning.

    Args:
        directory: A directory written by :func:`export`.
        model: An instance of the exported architecture (with its original float layers) to
            load into; nothing is rebuilt from the export then.
        pluginmanager: The manager whose plugins decode; default :func:`get_plugin_manager`.
        trust_remote_code: Rebuild a non-transformers architecture by importing the class the
            export records and calling it with its ``init_args`` (see above). Default ``False``.

    Raises:
        FileNotFoundError: ``directory`` is not an export.
        ValueError: The export is damaged (including a truncated ``model.safetensors``), of
            another format version, does not fit ``model``, or would need code: an architecture
            that is not a transformers model, without ``model=`` or ``trust_remote_code=True``, or
            a module inside the directory.
        TypeError: ``model`` is not an ``nn.Module`` or ``trust_remote_code`` not a bool.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"load: `model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"load: `trust_remote_code` must be a bool, got {type(trust_remote_code).__name__}")
    path = Path(directory)
    if not os.path.lexists(path) and any(p.name.endswith(".old") for p in _siblings(path)):
        with _parent_locked(path.parent):
            path = _recover(path, "load")
    with _imports_guarded(path):
        try:
            return _load(path, model, pluginmanager, trust_remote_code)
        except _RefusedImport as exc:
            raise ValueError(
                f"{exc}. Pass an instance of the architecture: load(directory, model=MyModel(...))"
            ) from exc


def _load(
    path: Path, model: nn.Module | None, pluginmanager: ShrinkPluginManager | None, trust_remote_code: bool
) -> nn.Module:
    declared = _declared_format(path)
    if declared == ONNX_FORMAT:
        raise ValueError(
            f"load: {str(path)!r} is an ONNX export; run it with ONNX Runtime, "
            f"onnxruntime.InferenceSession({str(path / 'model.onnx')!r}), or export the model again with "
            'format="hf" or "native" for lightning_shrink.load'
        )
    if declared == HF_FORMAT:
        from lightning_shrink.export.hf_load import load_hf

        return load_hf(
            path, json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")), model, trust_remote_code
        )
    metadata = _read_metadata(path)
    build = None if model is not None else _builder(path, metadata, trust_remote_code)
    section = metadata.get(PEFT_SECTION)
    if build is not None and isinstance(section, dict) and "lora_config" in section:
        build = peft_builder(build, metadata[PEFT_SECTION], repr(str(path / CONFIG_NAME)))
    tensors = _read_tensors(path)
    pm = pluginmanager if pluginmanager is not None else get_plugin_manager()
    pm.hook.shrink_load(tensors=tensors, metadata=metadata)
    for alias, source in metadata.get("aliases", {}).items():
        if source not in tensors:
            raise ValueError(
                f"load: {CONFIG_NAME} in {str(path)!r} aliases {alias!r} to {source!r}, which is not in "
                f"{WEIGHTS_NAME}"
            )
        tensors[alias] = tensors[source]
    if build is not None:
        model = build()
    assert model is not None
    pm.hook.shrink_load_model(model=model, metadata=metadata)
    if PEFT_SECTION in metadata:
        restore_lora(model, metadata[PEFT_SECTION], repr(str(path / CONFIG_NAME)))
    expected = model.state_dict(keep_vars=True)
    for key, value in tensors.items():
        ref = expected.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(ref, torch.Tensor)
            and not _same_kind(value.dtype, ref.dtype)
        ):
            raise ValueError(
                f"load: tensor {key!r} in {str(path / WEIGHTS_NAME)!r} is {value.dtype}, but "
                f"{type(model).__name__} holds {ref.dtype} there: the export does not fit the model"
            )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"load: the export in {str(path)!r} does not fit {type(model).__name__}: {exc}"
        ) from exc
    _retie(model, metadata)
    return model.eval()


def _retie(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Make aliased tensors one tensor again (``load_state_dict`` copies values): float Parameters,
    and buffers such as the int8 table a tied language-model head shares with its embedding."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for alias, source in metadata.get("aliases", {}).items():
        for tensors in (params, buffers):
            if alias in tensors and source in tensors and tensors[alias] is not tensors[source]:
                module_name, _, attr = alias.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                setattr(owner, attr, tensors[source])
