"""How an export records its architecture, and how `load` rebuilds it without running what the
directory names (transformers classes by name from transformers only; anything else only with
``model=`` or ``trust_remote_code=True``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_shrink.export.layout import CONFIG_NAME, TRANSFORMERS_CONFIG_NAME, read_json
from lightning_shrink.export.safe_import import _RefusedImport, _trusted_class


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


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


def _refusal(directory: Path, what: str, trusted: str) -> str:
    return (
        f"load: the export in {str(directory)!r} {what}, and load() never imports or calls what an export "
        "directory names: pass an instance of the architecture, load(directory, model=MyModel(...)), or "
        f"trust_remote_code=True if you trust the directory ({trusted})"
    )


_KERNEL_REFERENCE = re.compile(r"[^/:\s]+/[^/:\s]+")  # transformers' hub kernels: "org/repo[@rev][:name]"


def _sanitize_transformers_config(value: Any, path: str, where: Path) -> Any:
    """``config.json`` without ``auto_map`` (remote code) anywhere; a hub kernel named as an
    attention or experts implementation (code transformers would download) is refused."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "auto_map":
                continue
            if isinstance(key, str) and (
                key.endswith("_implementation") or key.endswith("_implementation_internal")
            ):
                values = item.values() if isinstance(item, dict) else [item]
                for v in values:
                    if isinstance(v, str) and _KERNEL_REFERENCE.match(v):
                        raise ValueError(
                            f"load: {str(where)!r} sets {path}{key} = {v!r}, a kernel from the Hugging Face "
                            "Hub (code transformers would download and run); load() builds only from code "
                            "that is installed. Remove it from config.json"
                        )
            out[key] = _sanitize_transformers_config(item, f"{path}{key}.", where)
        return out
    if isinstance(value, list):
        return [_sanitize_transformers_config(item, path, where) for item in value]
    return value


def _transformers_builder(
    directory: Path, arch: Mapping[str, Any], trust_remote_code: bool, drop: tuple[str, ...] = ()
) -> Callable[[], nn.Module]:
    import transformers

    name = arch.get("class")
    cls: Any = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except _RefusedImport:
            raise
        except (ImportError, RuntimeError):  # a class whose backend is not installed
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        if not trust_remote_code:
            raise ValueError(
                _refusal(
                    directory,
                    f"names the transformers architecture {name!r}, which is not a PreTrainedModel class of "
                    "the installed transformers package (transformers exports are rebuilt by class name from "
                    "it only)",
                    f"it then imports {arch.get('class_path')!r}, never from a file inside the directory",
                )
            )
        cls = _trusted_class(
            arch.get("class_path"), directory, transformers.PreTrainedModel, "transformers.PreTrainedModel"
        )
    config_path = directory / TRANSFORMERS_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"load: {str(directory)!r} is a transformers export without {TRANSFORMERS_CONFIG_NAME}"
        )
    raw = read_json(config_path, "load")
    if not isinstance(raw, dict):
        raise ValueError(f"load: {str(config_path)!r} does not hold a JSON object")
    data = _sanitize_transformers_config(raw, "", config_path)
    for key in drop:  # top-level keys the caller handles itself (a quantization_config)
        data.pop(key, None)
    config_cls = getattr(cls, "config_class", None)
    model_type = data.get("model_type")
    expected = getattr(config_cls, "model_type", "") if isinstance(config_cls, type) else ""
    if not expected:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"load: {str(config_path)!r} has model_type {model_type!r}, which the installed transformers "
                "does not know"
            )
        config_cls = CONFIG_MAPPING[model_type]
    elif model_type != expected:
        raise ValueError(
            f"load: {str(config_path)!r} has model_type {model_type!r}, but {cls.__name__} takes a "
            f"{config_cls.__name__} (model_type {expected!r})"
        )
    decode = getattr(config_cls, "_decode_special_floats", None)
    if callable(decode):
        data = decode(data)
    config = config_cls.from_dict(data)
    return lambda: cls(config)


def _module_builder(
    directory: Path, arch: Mapping[str, Any], trust_remote_code: bool
) -> Callable[[], nn.Module]:
    class_path = arch.get("class_path")
    if "init_args" not in arch:
        raise ValueError(
            f"load: the export of {class_path} does not record how to construct it (it was not a "
            "transformers model, had no saved hyperparameters and export() got no `init_args`); pass an "
            "instance of the architecture: load(directory, model=MyModel(...))"
        )
    if not trust_remote_code:
        raise ValueError(
            _refusal(
                directory,
                f"records a {class_path}(**init_args)",
                f"it then imports {class_path!r}, never from a file inside the directory, and calls it with "
                "the recorded init_args",
            )
        )
    init_args = arch["init_args"]
    if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
        raise ValueError(f"load: the export's `init_args` must be a JSON object, got {init_args!r}")
    cls = _trusted_class(class_path, directory, nn.Module, "torch.nn.Module")

    def build() -> nn.Module:
        try:
            return cls(**init_args)
        except TypeError as exc:
            raise ValueError(
                f"load: {class_path}(**init_args) failed with the export's init_args {init_args!r}: {exc}"
            ) from exc

    return build


def _builder(
    directory: Path, metadata: Mapping[str, Any], trust_remote_code: bool
) -> Callable[[], nn.Module]:
    arch = metadata.get("architecture")
    if not isinstance(arch, dict):
        raise ValueError(
            f"load: the export in {str(directory)!r} has no `architecture` object in {CONFIG_NAME}"
        )
    kind = arch.get("kind")
    if kind == "transformers":
        return _transformers_builder(directory, arch, trust_remote_code)
    if kind == "module":
        return _module_builder(directory, arch, trust_remote_code)
    raise ValueError(f"load: the export in {str(directory)!r} has an unknown architecture kind {kind!r}")
