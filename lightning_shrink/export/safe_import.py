"""Imports that never reach inside an export directory, while `load` runs."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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
