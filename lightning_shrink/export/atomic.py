"""Writing and replacing an export directory so that a complete export is at the target path at
every instant, recovering from a killed write on the next `export` or `load`.

:func:`staged_directory` is the one way this package, and the demo's output directory, write a
directory: into a temporary sibling, moved into place when complete."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_shrink.export.layout import CONFIG_NAME, FORMAT, WEIGHTS_NAME

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


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield a new empty directory beside ``target`` (``.<name>.XXXXXXXX.tmp``) to write into; when
    the block ends without an exception, move it to ``target``, replacing what is there (an atomic
    swap where the platform can, see :func:`_commit`); when the block raises (an interrupt
    included), remove it.

    A process killed inside the block leaves the temporary behind, as a sibling that
    :func:`_siblings` recognizes (the next :func:`~lightning_shrink.export` of ``target`` removes it).
    The parent directory must exist.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _commit(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
