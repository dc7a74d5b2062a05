"""The demo: fine-tune a pretrained transformer dense, then compressed, convert, export, report.

Steps (each printed as it starts):

1. load the data (Rotten Tomatoes snippets split by movie, a CSV, or a Hugging Face dataset);
2. fine-tune all-MiniLM-L6-v2 dense: the *teacher*;
3. fine-tune it again with :class:`~lightning_shrink.GradualMagnitudePruning` (80 %),
   :class:`~lightning_shrink.QuantizationAwareTraining` (int8 layers, int4 embeddings) and
   :class:`~lightning_shrink.KnowledgeDistillation` from the teacher, starting from the teacher's
   weights;
4. :func:`~lightning_shrink.convert` the student to real int8 and
   :func:`~lightning_shrink.export` it;
5. measure test accuracy (dense, compressed), sparsity, exported size against the FP32
   checkpoint, CPU batch-1 latency (dense, compressed), and write the report, the results and a
   plot.

Everything is written into a temporary directory beside ``output_dir`` that is renamed into place
at the very end, so a failed run or bad input leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lightning_shrink.demo.data import TextClassificationSet, dataset_summary, load_data
from lightning_shrink.demo.model import (
    MINILM,
    SequenceClassifier,
    evaluate_accuracy,
    load_backbone,
    load_tokenizer,
    make_dataloader,
    measure_latency,
)

__all__ = ["PRESETS", "DemoConfig", "DemoError", "run_demo", "technique_status"]


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message names the option to fix."""


@dataclass
class DemoConfig:
    """Sizes and options of a demo run (see :data:`PRESETS`).

    Attributes:
        model_name: ``"minilm"`` or ``"tiny"`` (a random 2-layer BERT, for smoke tests).
        train_size: Training snippets used (``None``: all).
        test_size: Test snippets used (``None``: all).
        teacher_steps: Optimizer steps of the dense fine-tune.
        student_steps: Optimizer steps of the compressed fine-tune.
        batch_size: Training batch size.
        max_length: Tokens per snippet.
        lr: Peak learning rate of the dense fine-tune.
        student_lr: Peak learning rate of the compressed fine-tune.
        sparsity: Target sparsity of the pruning.
        embedding_bits: Bits of the quantized embedding tables (``4``: int4 in groups of
            ``embedding_group_size``; the word-embedding table is half of MiniLM's weights, and
            int8 tables leave the export at 5.8x smaller than FP32 instead of the goal's 6x).
        embedding_group_size: Elements of an embedding row per scale when ``embedding_bits=4``.
        prune_frequency: Steps between mask updates, as a fraction of the student's steps.
        temperature: Distillation temperature.
        alpha: Weight of the distillation loss.
        latency_repetitions: Interleaved repetitions of the latency measurement.
        latency_inputs: Test snippets per latency repetition (batch size 1).
        seed: Seed of the split, the subsets, the shuffling and the initialization.
    """

    model_name: str = MINILM
    train_size: int | None = None
    test_size: int | None = None
    teacher_steps: int = 500
    student_steps: int = 700
    batch_size: int = 16
    max_length: int = 64
    lr: float = 5e-5
    student_lr: float = 5e-5
    sparsity: float = 0.8
    embedding_bits: int = 4
    embedding_group_size: int | None = 64
    prune_frequency: float = 0.02
    temperature: float = 2.0
    alpha: float = 0.5
    latency_repetitions: int = 30
    latency_inputs: int = 8
    seed: int = 0
    techniques: tuple[str, ...] = ("pruning", "quantization", "distillation")
    extra: dict[str, Any] = field(default_factory=dict)


#: Sizes: ``quick`` ends within about 5 minutes on 2 CPU cores (2.5 measured), ``default`` within
#: about 20 (15 measured);
#: ``smoke`` trains a tiny random BERT on a few dozen snippets (for tests).
PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "quick": DemoConfig(
        train_size=2000,
        test_size=600,
        teacher_steps=96,
        student_steps=100,
        lr=1e-4,
        student_lr=1e-4,
        prune_frequency=0.05,
        latency_repetitions=15,
    ),
    "smoke": DemoConfig(
        model_name="tiny",
        train_size=48,
        test_size=24,
        teacher_steps=4,
        student_steps=6,
        batch_size=8,
        max_length=32,
        lr=1e-3,
        student_lr=1e-3,
        embedding_group_size=16,
        latency_repetitions=3,
        latency_inputs=2,
    ),
}

TECHNIQUE_CLASSES = {
    "pruning": "GradualMagnitudePruning",
    "quantization": "QuantizationAwareTraining",
    "distillation": "KnowledgeDistillation",
}


def technique_status() -> dict[str, bool]:
    """Which of the demo's techniques (and ``convert``/``export``) this installation provides."""
    import lightning_shrink

    status = {name: hasattr(lightning_shrink, cls) for name, cls in TECHNIQUE_CLASSES.items()}
    status["convert"] = hasattr(lightning_shrink, "convert")
    status["export"] = hasattr(lightning_shrink, "export")
    return status


class _Printer:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.verbose:
            elapsed = time.perf_counter() - self.start
            print(f"[demo {elapsed:6.1f}s] {message}", flush=True)


def _trainer(
    max_steps: int, log_dir: Path, name: str, callbacks: list[Any], progress: bool, **kwargs: Any
) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=CSVLogger(str(log_dir), name=name, version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def _pruning_callback(cfg: DemoConfig) -> Any:
    from lightning_shrink import GradualMagnitudePruning

    # Fractions of the run: prune from 5 % to 70 % of the steps, then let the model recover.
    # scope="layer": every layer reaches the target on its own. A global threshold removes
    # MiniLM's pooler entirely (its weights are the smallest: the sentence-transformers
    # checkpoint never trained it), and the classifier then sees a constant.
    return GradualMagnitudePruning(
        target_sparsity=cfg.sparsity,
        start_step=0.05,
        end_step=0.7,
        frequency=cfg.prune_frequency,
        scope="layer",
    )


def _quantization_callback(cfg: DemoConfig) -> Any:
    from lightning_shrink import QuantizationAwareTraining

    return QuantizationAwareTraining(
        weight_bits=8,
        activations="dynamic",
        embedding_bits=cfg.embedding_bits,
        embedding_group_size=cfg.embedding_group_size if cfg.embedding_bits == 4 else None,
    )


def _distillation_callback(cfg: DemoConfig, teacher: torch.nn.Module) -> Any:
    from lightning_shrink import KnowledgeDistillation

    return KnowledgeDistillation(teacher, temperature=cfg.temperature, alpha=cfg.alpha)


def _file_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sparsity_of_linears(model: torch.nn.Module) -> float:
    """Fraction of zeros in the weights of the model's Linear layers (float or converted)."""
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


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Check ``output_dir`` and create the staging directory beside it."""
    output_dir = output_dir.expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise DemoError(f"--output-dir: {str(output_dir)!r} exists and is not a directory")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise DemoError(
            f"--output-dir: {str(output_dir)!r} exists and is not empty; choose another directory "
            "or pass --overwrite to replace it when the new run has finished"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))


def commit_output(staging: Path, output_dir: Path) -> None:
    """Move the finished ``staging`` directory to ``output_dir`` (replacing an old one last)."""
    output_dir = output_dir.expanduser().resolve()
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        os.rename(output_dir, old)
    os.rename(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_demo(
    output_dir: str | os.PathLike[str] = "shrink-demo",
    preset: str = "default",
    data: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    overwrite: bool = False,
    verbose: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``<output_dir>/results.json``).

    Args:
        output_dir: Where the results go; written atomically at the end.
        preset: ``"default"`` (~20 min on 2 cores), ``"quick"`` (~5 min) or ``"smoke"`` (seconds).
        data: ``None`` for Rotten Tomatoes, a CSV path, or a Hugging Face dataset id.
        text_column: Text column of a CSV or dataset.
        label_column: Label column of a CSV or dataset.
        group_column: CSV column to keep on one side of the split.
        overwrite: Replace a non-empty ``output_dir`` once the new run has finished.
        verbose: Print what is being done.
        progress: Show the Trainer's progress bars.
        overrides: Fields of :class:`DemoConfig` to change from the preset.
    """
    if preset not in PRESETS:
        raise DemoError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    unknown = set(overrides) - set(DemoConfig.__dataclass_fields__)
    if unknown:
        raise DemoError(f"unknown demo option(s): {', '.join(sorted(unknown))}")
    cfg = replace(PRESETS[preset], **overrides)
    say = _Printer(verbose)

    status = technique_status()
    for name in cfg.techniques:
        if name not in TECHNIQUE_CLASSES:
            raise DemoError(
                f"--techniques: unknown technique {name!r} (choose from {', '.join(TECHNIQUE_CLASSES)})"
            )
    missing = [name for name in (*cfg.techniques, "convert", "export") if not status.get(name, False)]
    if missing:
        raise DemoError(
            f"this installation of lightning-shrink lacks {', '.join(missing)}; "
            "pass the available techniques with --techniques"
        )

    # Validate the input before anything is written.
    say(f"loading data ({data or 'Rotten Tomatoes snippets, split by movie'})")
    full = load_data(data, text_column, label_column, group_column, seed=cfg.seed, verbose=verbose)
    dataset = full.subsample(cfg.train_size, cfg.test_size, seed=cfg.seed)
    summary = dataset_summary(dataset)
    say(
        f"  {summary['train']} training and {summary['test']} test snippets ({summary['source']}); "
        f"movies in both: {summary['groups_in_both']}; "
        f"majority class {summary['test_majority_fraction']:.1%} of test"
    )

    output = Path(output_dir)
    staging = prepare_output(output, overwrite)
    # A termination signal (Ctrl-C already raises) also unwinds, so the staging directory goes.
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        results = _run(cfg, dataset, summary, staging, say, progress)
        results["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
        results["preset"] = preset
        (staging / "results.json").write_text(json.dumps(results, indent=2, default=str))
        commit_output(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    final = output.expanduser().resolve()
    say(f"done: results in {final}")
    if verbose:
        print()
        print((final / "summary.md").read_text())
    return results


def _run(
    cfg: DemoConfig,
    dataset: TextClassificationSet,
    summary: dict[str, Any],
    out: Path,
    say: Callable[[str], None],
    progress: bool,
) -> dict[str, Any]:
    import lightning.pytorch as pl
    from safetensors.torch import save_file

    import lightning_shrink
    from lightning_shrink.report import CompressionReport, ReportRow, metric_history, report

    pl.seed_everything(cfg.seed, verbose=False)
    timings: dict[str, float] = {}
    num_labels = len(dataset.label_names)
    tokenizer = load_tokenizer(cfg.model_name)

    def loader(examples: list[Any], shuffle: bool, batch_size: int | None = None) -> Any:
        return make_dataloader(
            examples, tokenizer, batch_size or cfg.batch_size, cfg.max_length, shuffle=shuffle, seed=cfg.seed
        )

    train_loader = loader(dataset.train, shuffle=True)
    test_loader = loader(dataset.test, shuffle=False, batch_size=64)
    logs = out / "logs"

    # 1. Dense fine-tune: the teacher.
    say(
        f"fine-tuning {cfg.model_name} dense for {cfg.teacher_steps} steps "
        f"(batch {cfg.batch_size}): the teacher"
    )
    t0 = time.perf_counter()
    teacher = SequenceClassifier(cfg.model_name, num_labels=num_labels, lr=cfg.lr)
    _trainer(cfg.teacher_steps, logs, "dense", [], progress).fit(teacher, train_loader)
    timings["dense_fit_s"] = time.perf_counter() - t0
    teacher.eval()
    say("evaluating the dense model on the test snippets")
    dense_acc = evaluate_accuracy(teacher.model, test_loader)
    say(f"  dense test accuracy {dense_acc:.2%}")
    dense_path = out / "dense" / "model.safetensors"
    dense_path.parent.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in teacher.model.state_dict().items()}
    # Tied weights (shared tensors) are saved once, as safetensors requires.
    seen: dict[int, str] = {}
    unique = {}
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        unique[k] = v.to(torch.float32)
    save_file(unique, str(dense_path))
    dense_size = _file_size(dense_path)

    # 2. Compressed fine-tune, starting from the teacher's weights.
    techniques = list(cfg.techniques)
    callbacks: list[Any] = []
    frozen_teacher = None
    if "pruning" in techniques:
        callbacks.append(_pruning_callback(cfg))
    if "quantization" in techniques:
        callbacks.append(_quantization_callback(cfg))
    if "distillation" in techniques:
        frozen_teacher = copy.deepcopy(teacher.model).eval()
        for p in frozen_teacher.parameters():
            p.requires_grad_(False)
        callbacks.append(_distillation_callback(cfg, frozen_teacher))
    say(
        f"fine-tuning the compressed student for {cfg.student_steps} steps with "
        + ", ".join(type(cb).__name__ for cb in callbacks)
        + (f" (target sparsity {cfg.sparsity:.0%})" if "pruning" in techniques else "")
    )
    t0 = time.perf_counter()
    student_backbone = load_backbone(cfg.model_name, num_labels)
    student_backbone.load_state_dict(teacher.model.state_dict())
    student = SequenceClassifier(
        cfg.model_name, num_labels=num_labels, lr=cfg.student_lr, backbone=student_backbone
    )
    student_trainer = _trainer(cfg.student_steps, logs, "compressed", callbacks, progress)
    student_trainer.fit(student, train_loader)
    timings["compressed_fit_s"] = time.perf_counter() - t0
    rep = report(student_trainer)
    rep.history = metric_history(student_trainer)
    student.eval()
    fake_quant_acc = evaluate_accuracy(student.model, test_loader)
    say(f"  compressed model (before conversion) test accuracy {fake_quant_acc:.2%}")

    # 3. Convert and export.
    model = student.model
    if "quantization" in techniques:
        say("converting to the inference form (real int8 layers)")
        model = lightning_shrink.convert(model)
    export_dir = out / "model"
    say(f"exporting to {export_dir.name}/")
    lightning_shrink.export(model, export_dir)
    export_size = _file_size(export_dir)
    compressed_acc = evaluate_accuracy(model, test_loader)
    say(f"  converted model test accuracy {compressed_acc:.2%}")
    reloaded_acc = None
    if hasattr(lightning_shrink, "load"):
        say("reloading the export and checking it")
        reloaded = lightning_shrink.load(export_dir)
        if isinstance(reloaded, torch.nn.Module):
            reloaded_acc = evaluate_accuracy(reloaded, test_loader)
            say(f"  reloaded export test accuracy {reloaded_acc:.2%}")

    # 4. Latency at batch 1 on CPU, interleaved.
    say(f"measuring CPU batch-1 latency ({cfg.latency_repetitions} interleaved repetitions)")
    examples = dataset.test[: cfg.latency_inputs]
    inputs = []
    for ex in examples:
        enc = tokenizer([ex.text], truncation=True, max_length=cfg.max_length, return_tensors="pt")
        inputs.append(
            {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        )
    latency = measure_latency({"dense": teacher.model, "compressed": model}, inputs, cfg.latency_repetitions)
    del frozen_teacher

    sparsity = _sparsity_of_linears(student.model)
    results: dict[str, Any] = {
        "data": summary,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "techniques": techniques,
        "accuracy": {
            "dense": dense_acc,
            "compressed_before_conversion": fake_quant_acc,
            "compressed": compressed_acc,
            "compressed_reloaded": reloaded_acc,
            "difference_points": round(100 * (compressed_acc - dense_acc), 2),
        },
        "sparsity_of_linear_weights": sparsity,
        "size_bytes": {
            "fp32_checkpoint": dense_size,
            "export": export_size,
            "ratio": dense_size / max(export_size, 1),
        },
        "latency_ms_batch1": {**latency, "speedup": latency["dense"] / latency["compressed"]},
        "timings_s": timings,
        "machine": machine_info(),
    }
    demo_rows = [
        ReportRow("demo", "test accuracy", dense_acc, "dense"),
        ReportRow("demo", "test accuracy", compressed_acc, "compressed"),
        ReportRow("demo", "sparsity of Linear weights", sparsity, "compressed"),
        ReportRow("demo", "file size (MB)", round(dense_size / 1e6, 2), "dense FP32 checkpoint"),
        ReportRow("demo", "file size (MB)", round(export_size / 1e6, 2), "compressed export"),
        ReportRow("demo", "batch-1 latency (ms)", round(latency["dense"], 2), "dense"),
        ReportRow("demo", "batch-1 latency (ms)", round(latency["compressed"], 2), "compressed"),
    ]
    full_report = CompressionReport(rep.rows + demo_rows, history=rep.history)
    full_report.save(out / "report")
    (out / "summary.md").write_text(summary_markdown(results))
    return results


def machine_info() -> dict[str, Any]:
    """CPU model, core count and library versions, for results and benchmark pages."""
    import lightning

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
    import transformers

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


def summary_markdown(results: dict[str, Any]) -> str:
    """The demo's result table in Markdown."""
    acc, size, lat = results["accuracy"], results["size_bytes"], results["latency_ms_batch1"]
    data = results["data"]
    lines = [
        "# lightning-shrink demo",
        "",
        f"Data: {data['source']}, {data['train']} training / {data['test']} test snippets "
        f"(movies in both: {data['groups_in_both']}). Techniques: {', '.join(results['techniques'])}.",
        "",
        "| | dense (teacher) | compressed | |",
        "|---|---|---|---|",
        f"| test accuracy | {acc['dense']:.2%} | {acc['compressed']:.2%} "
        f"| {acc['difference_points']:+.2f} points |",
        f"| sparsity of Linear weights | 0% | {results['sparsity_of_linear_weights']:.1%} | |",
        f"| file size | {size['fp32_checkpoint'] / 1e6:.1f} MB (FP32 safetensors) | "
        f"{size['export'] / 1e6:.1f} MB (export) | {size['ratio']:.2f}x smaller |",
        f"| CPU batch-1 latency | {lat['dense']:.1f} ms | {lat['compressed']:.1f} ms "
        f"| {lat['speedup']:.2f}x faster |",
        "",
        "Files: `model/` (the export, `lightning_shrink.load`), `dense/model.safetensors` (FP32 teacher), "
        "`report/` (table, JSON, plot), `logs/` (CSV metrics), `results.json`.",
        "",
    ]
    return "\n".join(lines)
