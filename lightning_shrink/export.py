"""Conversion, export and loading of compressed models.

:func:`convert` turns a model trained with lightning-shrink callbacks into its inference form
(int8 layers); :func:`export` writes a model (prepared or converted) as a directory; :func:`load`
reads it back without the training code. All three go through the plugin hooks
``shrink_convert``, ``shrink_export``, ``shrink_load`` and ``shrink_load_model``, so third-party
plugins can add their own encodings.

An export directory holds:

``model.safetensors``
    The encoded tensors (int8 weights and their scales, sparse encodings, float tensors).
``config.json``
    For transformers models only: the model's ``PretrainedConfig``.
``shrink_config.json``
    ``format``, ``format_version``, how to rebuild the architecture (``architecture``), tensor
    aliases of tied weights (``aliases``), and one section per plugin that encoded something (for
    example ``quantization``, ``pruning``). Written last: its presence marks a complete export.

An export directory is data, never code: :func:`load` does not import or call anything the
directory names unless the caller opts in with ``trust_remote_code=True`` (see its docstring for
the threat model), and :func:`export` replaces an existing export so that a complete export is
at the target path at every instant.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import functools
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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
TRANSFORMERS_CONFIG_NAME = "config.json"


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


# ------------------------------------------------------------------ imports that never reach inside


def _inside(path: str | os.PathLike[str], directory: Path) -> bool:
    """Whether ``path`` lies in ``directory`` (or is it), literally or once symlinks are resolved."""
    roots = {os.path.normcase(os.path.abspath(directory)), os.path.normcase(os.path.realpath(directory))}
    for candidate in {os.path.normcase(os.path.abspath(path)), os.path.normcase(os.path.realpath(path))}:
        for root in roots:
            try:
                if os.path.commonpath([candidate, root]) == root:
                    return True
            except ValueError:  # different drives
                continue
    return False


class _RefusedImport(ImportError):
    """An import that would have run a file from inside an export directory."""


class _ImportGuard(importlib.abc.MetaPathFinder):
    """First entry of ``sys.meta_path`` while a :func:`load` runs: finds each module with the
    other finders and refuses (``ImportError``) one whose file lies inside an export directory
    being loaded (several, when loads run in several threads).

    Returning the spec it checked (rather than letting the import system search again) means
    the file that is executed is the file that was checked. Namespace packages have no file and
    no code; their portions inside a directory are reached only through submodules, which are
    checked one by one.
    """

    def __init__(self) -> None:
        self.directories: list[Path] = []
        self.lock = threading.Lock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        directories = list(self.directories)
        if not directories:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.origin and spec.has_location:
                for directory in directories:
                    if _inside(spec.origin, directory):
                        raise _RefusedImport(
                            f"load: refusing to import {fullname!r} from {spec.origin!r}, which lies inside "
                            f"the export directory {str(directory)!r}: load() never runs code shipped in an "
                            "export",
                            name=fullname,
                            path=spec.origin,
                        )
            return spec
        return None


_GUARD = _ImportGuard()


@contextlib.contextmanager
def _imports_guarded(directory: Path) -> Iterator[None]:
    """Refuse every import of a module file inside ``directory`` (whatever ``sys.path`` holds:
    ``''`` with the directory as working directory, the directory itself, or its parent, which
    makes the directory a package)."""
    with _GUARD.lock:
        _GUARD.directories.append(directory)
        if not any(finder is _GUARD for finder in sys.meta_path):
            sys.meta_path.insert(0, _GUARD)
    try:
        yield
    finally:
        with _GUARD.lock:
            _GUARD.directories.remove(directory)
            if not _GUARD.directories:
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(_GUARD)


def _module_file(module: Any) -> str | None:
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin and getattr(spec, "has_location", False):
        return origin
    return getattr(module, "__file__", None)


_IDENTIFIERS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _trusted_class(class_path: Any, directory: Path, base: type, base_name: str) -> type:
    """Import the ``"module:QualName"`` an export records (``trust_remote_code=True`` only).

    Runs under :func:`_imports_guarded`: nothing is imported from inside ``directory``. The
    resolved object must be a subclass of ``base`` (a class, never a function such as
    ``os.system``); a module already imported from inside the directory is refused too.
    """
    if not isinstance(class_path, str):
        raise ValueError(f"load: the export's `class_path` must be a string, got {class_path!r}")
    module_name, sep, qualname = class_path.partition(":")
    if not sep or not _IDENTIFIERS.fullmatch(module_name) or not _IDENTIFIERS.fullmatch(qualname):
        raise ValueError(
            f"load: the export's `class_path` {class_path!r} is not of the form 'package.module:Class'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except _RefusedImport:
        raise
    except ImportError as exc:
        raise ValueError(
            f"load: cannot import {module_name!r} named by the export's `class_path`: {exc}"
        ) from exc
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        file = _module_file(sys.modules.get(".".join(parts[:i])))
        if file and _inside(file, directory):
            raise _RefusedImport(
                f"load: module {'.'.join(parts[:i])!r} was imported from {file!r}, inside the export "
                f"directory {str(directory)!r}: load() never uses code shipped in an export"
            )
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"load: {class_path!r} named by the export does not exist")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ValueError(
            f"load: {class_path!r} named by the export is not a {base_name} "
            f"subclass (it is {type(obj).__name__} {obj!r}); load() only constructs model classes"
        )
    file = _module_file(sys.modules.get(obj.__module__))
    if file and _inside(file, directory):
        raise _RefusedImport(
            f"load: {class_path!r} is defined in {file!r}, inside the export directory {str(directory)!r}: "
            "load() never uses code shipped in an export"
        )
    return obj


# --------------------------------------------------------------------------------- rebuilding


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
    directory: Path, arch: Mapping[str, Any], trust_remote_code: bool
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
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load: {str(config_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"load: {str(config_path)!r} does not hold a JSON object")
    data = _sanitize_transformers_config(raw, "", config_path)
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


# --------------------------------------------------------------------- replacing a directory


_STALE_SUFFIXES = ("tmp", "old")


def _sibling_pattern(target: Path) -> re.Pattern[str]:
    # `tempfile.mkdtemp(prefix=".name.", suffix=".tmp")` names: eight characters of its alphabet.
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.({'|'.join(_STALE_SUFFIXES)})")


def _siblings(target: Path) -> list[Path]:
    """Temporaries and backups that writes of ``target`` (and only of ``target``) leave."""
    pattern = _sibling_pattern(target)
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return sorted(target.parent / n for n in names if pattern.fullmatch(n))


def _is_complete(path: Path) -> bool:
    """A complete export: ``shrink_config.json`` (written last) parses, next to the weights."""
    if path.is_symlink() or not path.is_dir() or not (path / WEIGHTS_NAME).is_file():
        return False
    try:
        metadata = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """An advisory lock on ``parent`` (POSIX ``flock``): writes of a target and the recovery of
    an interrupted one never interleave. Released by the kernel when a process dies, so holding it
    means that every temporary of the target is left by a dead write. Where ``flock`` is not
    available, writes of one target must not run concurrently."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a directory that cannot be opened
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recover(target: Path, caller: str) -> Path:
    """Put back the export an interrupted replacement took away (call with the parent locked).

    Only the non-atomic replacement leaves ``target`` missing: after renaming the old export to a
    ``.old`` backup and before renaming the new one into place. The backup, the last complete export
    at ``target``, is renamed back. Returns where the export to read is.
    """
    if os.path.lexists(target):
        return target
    backups = []
    for path in _siblings(target):
        if path.name.endswith(".old"):
            for candidate in (path, path / "x"):  # "x": the layout of lightning-shrink 0.1's backups
                if _is_complete(candidate):
                    backups.append(candidate)
    if not backups:
        return target
    backup = max(backups, key=lambda p: p.stat().st_mtime_ns)
    try:
        os.rename(backup, target)
    except OSError as exc:  # e.g. a read-only location: read the backup where it is
        warnings.warn(
            f"{caller}: {str(target)!r} is missing: an export() replacing it was interrupted; the previous "
            f"export is still complete in {str(backup)!r} but could not be renamed back ({exc}); reading it "
            "from there",
            UserWarning,
            stacklevel=3,
        )
        return backup
    _fsync_dir(target.parent)
    warnings.warn(
        f"{caller}: {str(target)!r} was missing: an export() replacing it was interrupted; restored the "
        f"previous export from {str(backup.relative_to(target.parent))!r}",
        UserWarning,
        stacklevel=3,
    )
    return target


def _clean_stale(target: Path) -> None:
    """Remove what interrupted writes of ``target`` left (call with the parent locked)."""
    stale = _siblings(target)
    if not stale:
        return
    for path in stale:
        _remove(path)
    warnings.warn(
        f"export: removed {len(stale)} stale temporary director{'y' if len(stale) == 1 else 'ies'} of an "
        f"interrupted export to {str(target)!r}: {[p.name for p in stale]}",
        UserWarning,
        stacklevel=3,
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened or synced everywhere
        _fsync(path)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where
    the platform or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _commit(tmp: Path, target: Path) -> None:
    """Move the complete export ``tmp`` to ``target``, replacing what is there."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        _remove(tmp)  # now the old export; a kill here leaves it as a stale temporary
    else:
        backup = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(backup, target)
            raise
        _remove(backup)
    _fsync_dir(target.parent)


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
    layers as int8 weights plus scales; pruning writes sparse tensors where that is smaller.

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

    Returns:
        The directory.

    Raises:
        FileExistsError: ``directory`` holds something and ``overwrite`` is false, or it holds
            something that is not an export.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"export: `model` must be a torch.nn.Module, got {type(model).__name__}")
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

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if metadata["architecture"]["kind"] == "transformers":
                model.config.save_pretrained(tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            for path in tmp.iterdir():
                _fsync(path)
            _fsync_dir(tmp)
            _commit(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
    return target


# -------------------------------------------------------------------------------------------- load


def _read_metadata(path: Path) -> dict[str, Any]:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        raise FileNotFoundError(
            f"load: {str(path)!r} is not a lightning-shrink export (missing {', '.join(missing)}); "
            "write one with lightning_shrink.export(model, directory)"
        )
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load: {str(config_path)!r} is not valid JSON: {exc}") from exc
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
    metadata = _read_metadata(path)
    build = None if model is not None else _builder(path, metadata, trust_remote_code)
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
    """Make aliased float parameters one Parameter again (``load_state_dict`` copies values)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in metadata.get("aliases", {}).items():
        if alias in params and source in params and params[alias] is not params[source]:
            module_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            setattr(owner, attr, params[source])
