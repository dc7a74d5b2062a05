"""The demo's pipeline: fine-tune a pretrained transformer dense, then compressed, convert, export,
measure and report.

Steps (each printed as it starts):

1. load the data (a named data set of :mod:`~lightning_shrink.demo.datasets`, by default Rotten
   Tomatoes snippets split by movie; a CSV; or a Hugging Face dataset);
2. fine-tune all-MiniLM-L6-v2 dense: the *teacher*;
3. fine-tune it again with the preset's recipe (:mod:`~lightning_shrink.demo.recipe`; by default
   :class:`~lightning_shrink.GradualMagnitudePruning` to 50 %,
   :class:`~lightning_shrink.QuantizationAwareTraining` with int8 layers and int4 embeddings, and
   :class:`~lightning_shrink.KnowledgeDistillation` from the teacher), starting from the teacher's
   weights;
4. :func:`~lightning_shrink.convert` the student to real int8 and
   :func:`~lightning_shrink.export` it;
5. measure test accuracy (dense, compressed), sparsity, exported size against the FP32
   checkpoint, CPU batch-1 latency (dense, compressed), and write the report, the results and a
   plot.

Everything is written into a temporary directory beside ``output_dir`` that is moved into place
at the very end (:func:`lightning_shrink.export.atomic.staged_directory`), so a failed or
interrupted run, or bad input, leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lightning_shrink.demo.config import PRESETS, DemoConfig, DemoError
from lightning_shrink.demo.console import Printer, StepPrinter, quiet_libraries
from lightning_shrink.demo.data import TextClassificationSet, dataset_summary, load_data
from lightning_shrink.demo.datamodule import make_dataloader
from lightning_shrink.demo.datasets import DATASETS, DEFAULT_DATASET, load_dataset
from lightning_shrink.demo.measure import (
    directory_size,
    evaluate_accuracy,
    machine_info,
    measure_latency,
    sparsity_of_linears,
)
from lightning_shrink.demo.model import SequenceClassifier, load_backbone, load_tokenizer
from lightning_shrink.demo.recipe import Recipe, compression_callbacks
from lightning_shrink.demo.summary import (
    describe_data,
    report_rows,
    serve_hint,
    served_directory,
    summary_markdown,
)
from lightning_shrink.export.atomic import staged_directory

__all__ = ["run_demo"]


def run_demo(
    output_dir: str | os.PathLike[str] = "shrink-demo",
    preset: str = "default",
    data: str | None = None,
    dataset: str | None = None,
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
        preset: ``"default"`` (~15 min on 2 cores), ``"quick"`` (~3 min) or ``"smoke"`` (seconds).
        data: A CSV path or a Hugging Face dataset id, instead of a named ``dataset``.
        dataset: A data set of :data:`~lightning_shrink.demo.datasets.DATASETS` (default
            ``"rotten_tomatoes"``); not together with ``data``.
        text_column: Text column of a CSV or dataset.
        label_column: Label column of a CSV or dataset.
        group_column: CSV column to keep on one side of the split.
        overwrite: Replace a non-empty ``output_dir`` once the new run has finished.
        verbose: Print what is being done, the libraries' information lines and the result
            table; ``False``: print nothing (the libraries' lines and warnings are silenced too).
        progress: Show the Trainer's progress bars; without them (and with ``verbose``) a line is
            printed every tenth of each fine-tune.
        overrides: Fields of :class:`~lightning_shrink.demo.config.DemoConfig` to change from the
            preset.

    Raises:
        DemoError: an unknown preset or option, or ``output_dir`` is not usable.
        DataError: the data cannot be used (a missing column, an unknown data set).
        TypeError, ValueError: an option has a wrong type or value (the message names it).
    """
    if preset not in PRESETS:
        raise DemoError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    unknown = set(overrides) - set(DemoConfig.__dataclass_fields__)
    if unknown:
        raise DemoError(f"unknown demo option(s): {', '.join(sorted(unknown))}")
    if data is not None and dataset is not None:
        raise DemoError("--data and --dataset cannot be used together: --data names your own data")
    if dataset is not None and dataset not in DATASETS:
        raise DemoError(f"--dataset: unknown data set {dataset!r} (choose from {', '.join(DATASETS)})")
    started = time.perf_counter()
    cfg = replace(PRESETS[preset], **overrides)
    try:
        recipe = cfg.compression_recipe()
    except ValueError as exc:
        raise DemoError(str(exc)) from exc
    output = Path(output_dir).expanduser().resolve()
    _check_output(output, overwrite)
    say = Printer(verbose)
    with contextlib.nullcontext() if verbose else quiet_libraries():
        # Validate the input before anything is written.
        if data is None:
            name = dataset or DEFAULT_DATASET
            say(f"loading data ({name}: {DATASETS[name].description})")
            full = load_dataset(name, seed=cfg.seed, verbose=verbose)
        else:
            say(f"loading data ({data})")
            full = load_data(data, text_column, label_column, group_column, seed=cfg.seed, verbose=verbose)
        subset = full.subsample(cfg.train_size, cfg.test_size, seed=cfg.seed)
        summary = dataset_summary(subset)
        say(f"  {describe_data(summary)}; majority class {summary['test_majority_fraction']:.1%} of test")
        say(f"recipe {recipe.describe()}")
        if recipe.why:
            chosen = recipe.name == PRESETS[preset].recipe
            say(f"  {f'chosen for the {preset} preset' if chosen else 'measured'}: {recipe.why}")

        output.parent.mkdir(parents=True, exist_ok=True)
        with _unwinding_on_sigterm(), staged_directory(output) as staging:
            results = _run(
                cfg,
                recipe,
                subset,
                summary,
                staging,
                say,
                bars=progress and verbose,
                steps=verbose and not progress,
            )
            results["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
            results["preset"] = preset
            results["dataset"] = dataset or (DEFAULT_DATASET if data is None else None)
            results["wall_seconds"] = round(time.perf_counter() - started, 1)
            (staging / "results.json").write_text(json.dumps(results, indent=2, default=str))
    say(f"done: results in {output}")
    if verbose:
        print()
        print((output / "summary.md").read_text())
        print(serve_hint(served_directory(output, results)))
    return results


def _export_hf(
    model: torch.nn.Module, directory: Path, tokenizer: Any, test_loader: Any, say: Callable[[str], None]
) -> tuple[Path | None, int | None, float | None]:
    """Also write the Hugging Face-native directory (compressed-tensors: what
    ``AutoModelForSequenceClassification.from_pretrained`` and vLLM read), reload it and check its
    accuracy; ``(None, None, None)``, said, when the model is one the format cannot express (heads or
    neurons removed: ``config.json`` holds one size for every layer)."""
    import lightning_shrink
    from lightning_shrink.export.hf import find_transformers_model, hf_unsupported

    found = find_transformers_model(model)
    reason = hf_unsupported(found[1], default=False) if found is not None else "not a transformers model"
    if reason is not None:
        say(f"not writing {directory.name}/ (Hugging Face-native): {reason}")
        return None, None, None
    say(f"exporting to {directory.name}/ (Hugging Face-native: transformers' from_pretrained, vLLM)")
    lightning_shrink.export(model, directory, format="hf", tokenizer=tokenizer)
    accuracy = evaluate_accuracy(lightning_shrink.load(directory), test_loader)
    say(f"  reloaded {directory.name}/ test accuracy {accuracy:.2%}")
    return directory, directory_size(directory), accuracy


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DemoError(f"--output-dir: {str(output)!r} exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise DemoError(
            f"--output-dir: {str(output)!r} exists and is not empty; choose another directory "
            "or pass --overwrite to replace it when the new run has finished"
        )


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _unwinding_on_sigterm() -> Iterator[None]:
    """A termination signal unwinds like Ctrl-C does (so the staging directory is removed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _save_fp32(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as FP32 safetensors, tied weights (shared tensors) once."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True)
    seen: set[int] = set()
    unique = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        unique[key] = value.detach().contiguous().to(torch.float32)
    save_file(unique, str(path))


def _run(
    cfg: DemoConfig,
    recipe: Recipe,
    dataset: TextClassificationSet,
    summary: dict[str, Any],
    out: Path,
    say: Callable[[str], None],
    bars: bool,
    steps: bool,
) -> dict[str, Any]:
    import lightning.pytorch as pl

    import lightning_shrink
    from lightning_shrink.report import CompressionReport, metric_history, report

    pl.seed_everything(cfg.seed, verbose=False)
    timings: dict[str, float] = {}
    num_labels = len(dataset.label_names)
    tokenizer = load_tokenizer(cfg.model_name)

    def loader(examples: list[Any], shuffle: bool, batch_size: int | None = None) -> Any:
        return make_dataloader(
            examples, tokenizer, batch_size or cfg.batch_size, cfg.max_length, shuffle=shuffle, seed=cfg.seed
        )

    def step_printer(label: str, total: int) -> list[Any]:
        return [StepPrinter(say, label, total)] if steps else []

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
    callbacks = step_printer("teacher", cfg.teacher_steps)
    _trainer(cfg.teacher_steps, logs, "dense", callbacks, bars).fit(teacher, train_loader)
    timings["dense_fit_s"] = time.perf_counter() - t0
    teacher.eval()
    say(f"evaluating the dense model on the test {dataset.unit}")
    dense_acc = evaluate_accuracy(teacher.model, test_loader)
    say(f"  dense test accuracy {dense_acc:.2%}")
    dense_path = out / "dense" / "model.safetensors"
    _save_fp32(teacher.model, dense_path)
    dense_size = directory_size(dense_path)

    # 2. Compressed fine-tune, starting from the teacher's weights.
    frozen_teacher = None
    if recipe.distillation:
        frozen_teacher = copy.deepcopy(teacher.model).eval().requires_grad_(False)
    callbacks = compression_callbacks(
        recipe, frozen_teacher, cfg.prune_frequency, temperature=cfg.temperature, alpha=cfg.alpha
    )
    say(
        f"fine-tuning the compressed student for {cfg.student_steps} steps with "
        + ", ".join(type(cb).__name__ for cb in callbacks)
        + (f" (target sparsity {recipe.sparsity:.0%})" if recipe.sparsity is not None else "")
    )
    t0 = time.perf_counter()
    student_backbone = load_backbone(cfg.model_name, num_labels)
    student_backbone.load_state_dict(teacher.model.state_dict())
    student = SequenceClassifier(
        cfg.model_name, num_labels=num_labels, lr=cfg.student_lr, backbone=student_backbone
    )
    callbacks += step_printer("student", cfg.student_steps)
    student_trainer = _trainer(cfg.student_steps, logs, "compressed", callbacks, bars)
    student_trainer.fit(student, train_loader)
    timings["compressed_fit_s"] = time.perf_counter() - t0
    rep = report(student_trainer)
    rep.history = metric_history(student_trainer)
    student.eval()
    fake_quant_acc = evaluate_accuracy(student.model, test_loader)
    say(f"  compressed model (before conversion) test accuracy {fake_quant_acc:.2%}")

    # 3. Convert and export, and load the export back.
    model = student.model
    if recipe.quantization is not None or recipe.structured is not None:
        what = ["real int8 layers"] if recipe.quantization is not None else []
        what += ["pruned heads and neurons removed"] if recipe.structured is not None else []
        say(f"converting to the inference form ({', '.join(what)})")
        model = lightning_shrink.convert(model)
    export_dir = out / "model"
    say(f"exporting to {export_dir.name}/")
    with warnings.catch_warnings():
        # the default format's fallback to native (int4 tables) is what this step wants: the smallest
        warnings.filterwarnings("ignore", message="export: writing the native", category=UserWarning)
        lightning_shrink.export(model, export_dir, tokenizer=tokenizer)
    export_size = directory_size(export_dir)
    compressed_acc = evaluate_accuracy(model, test_loader)
    say(f"  converted model test accuracy {compressed_acc:.2%}")
    say("reloading the export and checking it")
    reloaded_acc = evaluate_accuracy(lightning_shrink.load(export_dir), test_loader)
    say(f"  reloaded export test accuracy {reloaded_acc:.2%}")
    hf_dir, hf_size, hf_acc = _export_hf(model, out / "model-hf", tokenizer, test_loader, say)

    # 4. Latency at batch 1 on CPU, interleaved.
    say(f"measuring CPU batch-1 latency ({cfg.latency_repetitions} interleaved repetitions)")
    inputs = []
    for ex in dataset.test[: cfg.latency_inputs]:
        enc = tokenizer([ex.text], truncation=True, max_length=cfg.max_length, return_tensors="pt")
        inputs.append(
            {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        )
    latency = measure_latency({"dense": teacher.model, "compressed": model}, inputs, cfg.latency_repetitions)
    del frozen_teacher

    results: dict[str, Any] = {
        "data": summary,
        "config": asdict(cfg),
        "recipe": {"name": recipe.name, "description": recipe.describe(), "why": recipe.why},
        "techniques": list(recipe.techniques),
        "accuracy": {
            "dense": dense_acc,
            "compressed_before_conversion": fake_quant_acc,
            "compressed": compressed_acc,
            "compressed_reloaded": reloaded_acc,
            "difference_points": round(100 * (compressed_acc - dense_acc), 2),
        },
        "sparsity_of_linear_weights": sparsity_of_linears(student.model),
        "size_bytes": {
            "fp32_checkpoint": dense_size,
            "export": export_size,
            "ratio": dense_size / max(export_size, 1),
            "export_hf": hf_size,
        },
        "hf_export": {
            "directory": hf_dir.name if hf_dir is not None else None,
            "reloaded_accuracy": hf_acc,
        },
        "latency_ms_batch1": {**latency, "speedup": latency["dense"] / latency["compressed"]},
        "timings_s": timings,
        "machine": machine_info(),
    }
    CompressionReport(rep.rows + report_rows(results), history=rep.history).save(out / "report")
    (out / "summary.md").write_text(summary_markdown(results))
    return results
