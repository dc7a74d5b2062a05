"""The demo's results in words: the data line, the result table (``summary.md``) and the report rows."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lightning_shrink.types import ReportRow

__all__ = ["describe_data", "relative", "report_rows", "serve_hint", "served_directory", "summary_markdown"]


def relative(ratio: float, more: str, less: str) -> str:
    """``ratio`` of two positive quantities in words: ``relative(2.0, "faster", "slower")`` is
    ``"2.00x faster"``, ``relative(0.5, ...)`` is ``"2.00x slower"`` (never "0.50x faster")."""
    if ratio >= 1:
        return f"{ratio:.2f}x {more}"
    return f"{1 / ratio:.2f}x {less}" if ratio > 0 else f"infinitely {less}"


def describe_data(data: dict[str, Any]) -> str:
    """One line about the data of a :func:`~lightning_shrink.demo.data.dataset_summary`: its source,
    the sizes of both sides in its own unit, and how it was split."""
    text = f"{data['source']}, {data['train']} training / {data['test']} test {data['unit']}"
    text += f", split {data['split']}"
    group, both = data.get("group"), data.get("groups_in_both")
    if group and both is not None:
        text += f" (no {group} on both sides)" if both == 0 else f" ({both} {group} groups on both sides)"
    return text


def summary_markdown(results: dict[str, Any]) -> str:
    """The demo's result table in Markdown (what ``summary.md`` holds and the demo prints)."""
    acc, size, lat = results["accuracy"], results["size_bytes"], results["latency_ms_batch1"]
    lines = [
        "# lightning-shrink demo",
        "",
        f"Data: {describe_data(results['data'])}. Techniques: {', '.join(results['techniques'])}.",
        "",
        *([f"Recipe {results['recipe']['description']}.", ""] if results.get("recipe") else []),
        "| | dense (teacher) | compressed | |",
        "|---|---|---|---|",
        f"| test accuracy | {acc['dense']:.2%} | {acc['compressed']:.2%} "
        f"| {acc['difference_points']:+.2f} points |",
        f"| sparsity of Linear weights | 0% | {results['sparsity_of_linear_weights']:.1%} | |",
        f"| file size | {size['fp32_checkpoint'] / 1e6:.1f} MB (FP32 safetensors) | "
        f"{size['export'] / 1e6:.1f} MB (export) | {relative(size['ratio'], 'smaller', 'larger')} |",
        f"| CPU batch-1 latency | {lat['dense']:.1f} ms | {lat['compressed']:.1f} ms "
        f"| {relative(lat['speedup'], 'faster', 'slower')} |",
        "",
        "Files: `model/` (the export, `lightning_shrink.load`), "
        + (
            f"`model-hf/` (the same model Hugging Face-native, {size['export_hf'] / 1e6:.1f} MB: "
            "transformers' `from_pretrained` with compressed-tensors, vLLM), "
            if size.get("export_hf")
            else ""
        )
        + "`dense/model.safetensors` (FP32 teacher), `report/` (table, JSON, plot), `logs/` (CSV metrics), "
        "`results.json`.",
        "",
    ]
    return "\n".join(lines)


def served_directory(output_dir: Path, results: dict[str, Any]) -> Path:
    """The export the demo's serve command names: the Hugging Face-native one when it was written."""
    return output_dir / (results.get("hf_export", {}).get("directory") or "model")


def serve_hint(export_dir: Path) -> str:
    """The command that serves the demo's export, and what to send it (text when the export holds
    its tokenizer's files, token ids otherwise)."""
    from lightning_shrink.serve.model_info import has_tokenizer

    body = (
        '{"text": ["a gripping film"]}' if has_tokenizer(export_dir) else '{"input_ids": [[101, 2307, 102]]}'
    )
    return (
        f"Serve it: lightning-shrink serve {shlex.quote(str(export_dir))}\n"
        f"  then: curl -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' -d '{body}'"
    )


def report_rows(results: dict[str, Any]) -> list[ReportRow]:
    """The demo's own rows of the compression report (beside the techniques' rows)."""
    acc, size, lat = results["accuracy"], results["size_bytes"], results["latency_ms_batch1"]
    return [
        ReportRow("demo", "test accuracy", acc["dense"], "dense"),
        ReportRow("demo", "test accuracy", acc["compressed"], "compressed"),
        ReportRow("demo", "sparsity of Linear weights", results["sparsity_of_linear_weights"], "compressed"),
        ReportRow("demo", "file size (MB)", round(size["fp32_checkpoint"] / 1e6, 2), "dense FP32 checkpoint"),
        ReportRow("demo", "file size (MB)", round(size["export"] / 1e6, 2), "compressed export"),
        ReportRow("demo", "batch-1 latency (ms)", round(lat["dense"], 2), "dense"),
        ReportRow("demo", "batch-1 latency (ms)", round(lat["compressed"], 2), "compressed"),
    ]
