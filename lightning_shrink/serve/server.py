""":func:`serve`: an export behind an HTTP endpoint on LitServe, and the checks of its arguments."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_shrink.config import check_choice, check_number
from lightning_shrink.serve.model_info import (
    BACKENDS,
    choose_backend,
    has_tokenizer,
    is_export,
    read_model_info,
)

__all__ = ["HOSTS", "check_serve_arguments", "serve"]

#: The addresses LitServe binds to: this machine only, every IPv4 interface, every IPv6 interface.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
_EXTRA = 'pip install "lightning-shrink[serve]"'


def check_serve_arguments(
    directory: str | os.PathLike[str],
    port: int,
    host: str,
    workers: int,
    max_batch_size: int,
    batch_timeout: float,
    backend: str,
    owner: str = "serve",
    spell: Callable[[str], str] = lambda name: name,
) -> str:
    """Check the arguments of :func:`serve` before anything starts; return the backend that will run.

    ``spell`` gives the name an argument has for the caller (``"--port"`` on the command line).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a bad value: ``directory`` missing or not an export (or of a model the endpoint
            cannot serve), a port outside [1024, 65535], a host LitServe cannot bind, fewer than one
            worker, a batch size below 1, a negative batch timeout, an unknown backend, or ``"onnx"``
            for a directory without ``model.onnx``.
    """
    check_number(owner, spell("port"), port, low=1024, high=65535, integer=True)
    check_choice(owner, spell("host"), host, HOSTS)
    check_number(owner, spell("workers"), workers, low=1, integer=True)
    check_number(owner, spell("max_batch_size"), max_batch_size, low=1, integer=True)
    check_number(owner, spell("batch_timeout"), batch_timeout, low=0)
    check_choice(owner, spell("backend"), backend, BACKENDS)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{owner}: `{spell('directory')}` must be a path, got {type(directory).__name__}")
    path = Path(directory)
    if not path.exists():
        raise ValueError(f"{owner}: `{spell('directory')}` {str(path)!r} does not exist")
    if not is_export(path):
        raise ValueError(
            f"{owner}: `{spell('directory')}` {str(path)!r} is not a lightning-shrink export (no "
            "shrink_config.json, config.json or model.onnx); write one with lightning_shrink.export(model, "
            "directory)"
        )
    try:
        read_model_info(path)
        return choose_backend(path, backend)
    except ValueError as exc:
        raise ValueError(f"{owner}: `{spell('directory')}`: {str(exc).removeprefix('serve: ')}") from exc


_MAIN_PID: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server as Ctrl-C does (LitServe shuts its workers down on KeyboardInterrupt);
    in the processes LitServe forks, it keeps its default action."""
    if os.getpid() in _MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def serve(
    directory: str | os.PathLike[str],
    port: int = 8000,
    host: str = "127.0.0.1",
    workers: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.005,
    backend: str = "auto",
    timeout: float = 30.0,
) -> None:
    """Serve an export over HTTP on LitServe until interrupted (Ctrl-C or SIGTERM).

    Routes: ``POST /predict`` (see :class:`~lightning_shrink.serve.api.ShrinkAPI` for the request
    and answer formats) and ``GET /health`` (200 ``ok`` once the workers are ready). Inference runs
    on the CPU, in ``workers`` processes that share its cores; requests arriving within
    ``batch_timeout`` seconds are run as one batch of up to ``max_batch_size``.

    Args:
        directory: An export written by :func:`lightning_shrink.export` (with the tokenizer's files,
            ``tokenizer.save_pretrained(directory)``, for ``text`` requests), or a directory with
            ``model.onnx`` and ``config.json``.
        port: TCP port, 1024 to 65535.
        host: ``"127.0.0.1"`` (this machine only, the default), ``"0.0.0.0"`` or ``"::"``.
        workers: Inference worker processes (at least 1).
        max_batch_size: Most requests per batch (1 turns batching off).
        batch_timeout: Seconds to wait for a batch to fill.
        backend: ``"auto"`` (ONNX Runtime when the directory has ``model.onnx``, else PyTorch),
            ``"torch"`` or ``"onnx"``.
        timeout: Seconds a request may wait for its answer (504 after that).

    Raises:
        ImportError: LitServe is not installed (``pip install "lightning-shrink[serve]"``).
        TypeError, ValueError: a bad argument (see :func:`check_serve_arguments`).
    """
    chosen = check_serve_arguments(directory, port, host, workers, max_batch_size, batch_timeout, backend)
    check_number("serve", "timeout", timeout, low=0, low_inclusive=False)
    if batch_timeout >= timeout:
        raise ValueError(
            f"serve: `batch_timeout` must be less than `timeout` ({timeout}), got {batch_timeout}"
        )
    try:
        import litserve as ls
    except ImportError as exc:
        raise ImportError(f"`lightning-shrink serve` needs LitServe: {_EXTRA}") from exc
    from lightning_shrink.serve.api import ShrinkAPI

    api = ShrinkAPI(
        directory, backend=chosen, workers=workers, max_batch_size=max_batch_size, batch_timeout=batch_timeout
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=workers, timeout=timeout)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {str(directory)!r} ({api.info.architecture}, {chosen} backend, "
        f"{'text or token ids' if has_tokenizer(Path(directory)) else 'token ids'}) at "
        f"http://{shown}:{port}/predict with {workers} worker(s), batches of up to {max_batch_size}; "
        f"health at http://{shown}:{port}/health",
        flush=True,
    )
    _MAIN_PID[:] = [os.getpid()]
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and sys.platform != "win32"
