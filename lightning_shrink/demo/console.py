"""What the demo prints while it runs: its own lines, training progress without progress bars, and
nothing from the libraries under ``--quiet``."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["Printer", "StepPrinter", "quiet_libraries"]

#: The loggers whose information lines (Lightning's "GPU available", torchao's failed optional
#: kernels, torch's deprecation notices) ``--quiet`` silences.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "torch", "torchao", "transformers")
#: The packages whose warnings ``--quiet`` silences (lightning-shrink's own warnings still show).
_LIBRARY_MODULES = r"(lightning|torch|torchao|transformers|opacus|jsonargparse)(\..*)?\Z"


class Printer:
    """Prints the demo's progress lines, stamped with the seconds since the run started.

    Args:
        verbose: ``False``: print nothing.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.verbose:
            elapsed = time.perf_counter() - self.start
            print(f"[demo {elapsed:6.1f}s] {message}", flush=True)


class StepPrinter(Callback):
    """Prints a line every tenth of a fine-tune's optimizer steps (and at its last step): what the
    demo shows when progress bars are hidden, so a long run is never silent.

    Args:
        say: Where the lines go (a :class:`Printer`).
        label: What is being trained (``"teacher"``, ``"student"``).
        total: The fine-tune's optimizer steps.
    """

    def __init__(self, say: Callable[[str], None], label: str, total: int) -> None:
        self.say = say
        self.label = label
        self.total = total
        self.every = max(1, total // 10)
        self._last = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last or (step % self.every and step != self.total):
            return
        self._last = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        text = f", loss {float(loss):.4f}" if loss is not None else ""
        self.say(f"  {self.label}: step {step}/{self.total}{text}")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, the libraries' information lines and warnings are not shown (``--quiet``);
    errors still are, and so are lightning-shrink's own warnings."""
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
