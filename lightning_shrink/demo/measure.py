"""What the demo measures: accuracy, batch-1 latency, sparsity, file sizes, and the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["directory_size", "evaluate_accuracy", "machine_info", "measure_latency", "sparsity_of_linears"]


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of a transformers classifier (or a converted one) on ``loader``, in eval mode and
    under ``torch.inference_mode``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = _logits(model(**inputs))
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct / total if total else 0.0


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    return output.logits


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    inputs: Sequence[Mapping[str, torch.Tensor]],
    repetitions: int = 20,
    warmup: int = 3,
    threads: int | None = 2,
) -> dict[str, float]:
    """Median batch-1 latency in milliseconds of each model, interleaved.

    Every repetition runs each model once on each of ``inputs`` (in turn, so that a noisy
    neighbour affects all models alike); a model's time for a repetition is the mean over the
    inputs, and the median over repetitions is returned. Models run in eval mode under
    ``torch.inference_mode`` (no autograd graph, no version counters), as a server runs them.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for model in models.values():
            model.eval()
            for x in inputs[:warmup]:
                model(**x)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repetitions):
            for name, model in models.items():
                start = time.perf_counter()
                for x in inputs:
                    model(**x)
                times[name].append((time.perf_counter() - start) / len(inputs) * 1e3)
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        torch.set_num_threads(previous)


def sparsity_of_linears(model: nn.Module) -> float:
    """Fraction of zeros in the weights of the model's Linear layers (float, fake-quantized or
    converted to int8), embeddings excluded."""
    zeros = total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if callable(weight):  # torch.ao quantized Linear: weight() returns a quantized tensor
            weight = weight()
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or "Embedding" in type(module).__name__:
            continue
        w = weight.dequantize() if weight.is_quantized else weight
        if hasattr(w, "dequantize") and not isinstance(w, torch.nn.Parameter) and type(w) is not torch.Tensor:
            w = w.dequantize()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def directory_size(path: Path) -> int:
    """Bytes of a file, or of every file below a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine_info() -> dict[str, Any]:
    """CPU model, core count and library versions, for results and benchmark pages."""
    import lightning
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }
