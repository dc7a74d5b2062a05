"""Run by tests/test_export.py in a subprocess: ``export(overwrite=True)`` that dies by SIGKILL.

``python export_killed.py TARGET MOMENT VALUE`` exports ``nn.Sequential(nn.Linear(4, 4))`` with
every weight equal to VALUE over the export in TARGET and SIGKILLs itself at MOMENT:

``weights``
    after half of ``model.safetensors`` is written (the rest never is);
``between-renames``
    on a file system without an atomic swap (``RENAME_EXCHANGE`` reported unsupported), right
    after the old export was renamed away and before the new one is renamed into place;
``after-exchange``
    right after the atomic swap, before the old export (now in the temporary) is deleted.

``hold``
    no kill: after the weights are written, create ``<parent>/writing`` and wait for
    ``<parent>/go`` before finishing the export (exit 0).

It exits 3 if the moment never came. The kill is a real SIGKILL: nothing in the process runs after it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import lightning_shrink as ls

# `lightning_shrink.export` the attribute is the function; the package and its modules are in sys.modules.
export_module = importlib.import_module("lightning_shrink.export.atomic")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(target: Path, moment: str, value: float) -> int:
    if moment == "weights":
        save_file = safetensors.torch.save_file

        def save_half(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            die()

        safetensors.torch.save_file = save_half
    elif moment == "between-renames":
        replace = os.replace

        def unsupported(a, b):
            return False  # a file system that cannot swap two directories

        def replace_then_die(src, dst):
            replace(src, dst)
            if Path(src) == target:  # the old export was just renamed away
                die()

        export_module._exchange = unsupported
        os.replace = replace_then_die
    elif moment == "after-exchange":
        rmtree = shutil.rmtree

        def rmtree_after_exchange(path, *args, **kwargs):
            path = Path(path)
            if (
                path.parent == target.parent
                and path.name.endswith(".tmp")
                and (path / export_module.CONFIG_NAME).is_file()
            ):
                print(f"swapped: the temporary holds the old export {path.name}")
                die()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree_after_exchange
    elif moment == "hold":
        save_file = safetensors.torch.save_file

        def save_and_wait(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            (target.parent / "writing").touch()
            while not (target.parent / "go").exists():
                time.sleep(0.05)

        safetensors.torch.save_file = save_and_wait
    else:
        raise SystemExit(f"unknown moment {moment!r}")
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(value)
        model[0].bias.fill_(value)
    ls.export(model, target, init_args={}, overwrite=True)
    if moment == "hold":
        return 0
    print("export returned: the kill never happened")
    return 3


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
