"""Run multi-process (DDP, FSDP2) Trainer scripts from tests.

A test writes (or points to) a script that builds a ``Trainer(strategy="ddp", devices=2,
accelerator="cpu")`` and has every rank save what it saw under an output directory; this helper
launches it in a subprocess, as Lightning needs, and fails with the script's own output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["run_multiprocess_script"]


def run_multiprocess_script(
    script: str | os.PathLike[str],
    *args: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """Run ``python script *args`` and return the finished process.

    Entry-point plugins are not loaded (``LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD=1``) and each
    process uses one thread (``OMP_NUM_THREADS=1``) unless ``env`` says otherwise. The script
    imports the same ``lightning_shrink`` as the calling process (its directory is put first on
    ``PYTHONPATH``). Raises ``AssertionError`` with the tail of the script's output when it exits
    non-zero.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    environ = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(cwd) if cwd is not None else None,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{Path(script).name} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )
    return proc
