"""Run every benchmark and rewrite ``docs/benchmarks.md`` from their results.

    python benchmarks/run_all.py [--quick] [--skip NAME ...] [--only NAME ...] [--docs-only]

Runs each ``benchmarks/bench_<name>.py`` in turn (never two at once: they time things), each in
its own process (``--quick`` is passed on), records its command, wall time and exit status in
``benchmarks/results/run_all.json``, then assembles ``docs/benchmarks.md`` from the JSON files
``benchmarks/results/<name>.json``: the machine, the date, the exact commands, every measured
number, and a table of the goals of the issues, with by how much each missed goal is missed.

``--skip NAME`` keeps a benchmark's existing JSON (its own recorded command and date are shown);
``--docs-only`` only rewrites the page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "benchmarks.md"
META = RESULTS / "run_all.json"

#: Benchmarks run first: the accuracy benchmark has no earlier result to fall back on when a
#: run is cut short, while the overhead benchmarks' JSON files stay from their own runs.
FIRST = ("accuracy",)


@dataclass(frozen=True)
class Goal:
    """A goal of the issues: ``value <op> target`` for a number found in a benchmark's JSON."""

    benchmark: str
    what: str
    paths: tuple[tuple[str, ...], ...]
    op: str  # "<=" or ">="
    target: float
    unit: str = "x"
    transform: Callable[[float], float] | None = None

    def value(self, data: dict[str, Any]) -> float | None:
        for path in self.paths:
            node: Any = data
            for key in path:
                if not isinstance(node, dict) or key not in node:
                    node = None
                    break
                node = node[key]
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return self.transform(float(node)) if self.transform else float(node)
        return None


GOALS: tuple[Goal, ...] = (
    Goal(
        "pruning",
        "GradualMagnitudePruning training step / plain step",
        (("ratio_to_plain", "GradualMagnitudePruning"), ("step_ratio_vs_plain", "GradualMagnitudePruning")),
        "<=",
        1.03,
    ),
    Goal(
        "pruning",
        "GradualMagnitudePruning(criterion='movement') training step / plain step",
        (("ratio_to_plain", "criterion='movement'"),),
        "<=",
        1.10,
    ),
    Goal(
        "quantization",
        "QuantizationAwareTraining (int8) training step / plain step",
        (
            ("train_step_ratio_vs_plain", "lightning-shrink"),
            ("step_ratio_vs_plain", "QuantizationAwareTraining"),
        ),
        "<=",
        1.15,
    ),
    Goal(
        "quantization",
        "converted int8 model, batch-1 CPU speed-up over FP32",
        (("batch1_speedup_int8_over_fp32",),),
        ">=",
        2.1,
    ),
    Goal(
        "quantization",
        "FP32 checkpoint size / export size (int8 Linear, int4 embeddings, 80% pruned)",
        (("export_size_ratio_fp32_over_int8_int4_embeddings_pruned80",),),
        ">=",
        6.0,
    ),
    Goal(
        "onnx",
        "ONNX Runtime batch-1 latency, our QAT export / quantize_dynamic (PTQ) of FP32",
        (("latency_ratio_qat_export_over_ptq",),),
        "<=",
        1.0,
    ),
    Goal(
        "distillation",
        "distillation step overhead minus teacher forward (fraction of a plain step)",
        (("overhead_minus_teacher_forward",),),
        "<=",
        0.03,
        unit="",
    ),
    Goal(
        "privacy",
        "DifferentialPrivacy training step / plain step",
        (
            ("step_ratio_vs_plain", "DifferentialPrivacy"),
            ("ratio_to_plain", "DifferentialPrivacy"),
            ("step_ratio_vs_plain", "lightning-shrink"),
            ("ratio_vs_plain", "DifferentialPrivacy"),
            ("dp_step_ratio",),
            ("goal_ratio",),
        ),
        "<=",
        1.8,
    ),
    Goal(
        "accuracy",
        "80% sparsity + distillation, accuracy vs dense (points)",
        (("points_vs_dense", "sparse80_kd"),),
        ">=",
        -1.0,
        unit=" points",
    ),
    Goal(
        "accuracy",
        "int8 QAT (converted), accuracy vs dense (points)",
        (("points_vs_dense", "int8_qat"),),
        ">=",
        -0.5,
        unit=" points",
    ),
    Goal(
        "accuracy",
        "80% sparsity + int8 (int4 embeddings) + distillation (converted), accuracy vs dense (points)",
        (("points_vs_dense", "sparse80_int8_kd"),),
        ">=",
        -1.5,
        unit=" points",
    ),
    Goal(
        "accuracy",
        "FP32 checkpoint size / export size of the 80% + int8 (int4 embeddings) + KD model",
        (("export_ratio_fp32_over", "sparse80_int8_kd"),),
        ">=",
        6.0,
    ),
    Goal(
        "accuracy",
        "int8 QAT model (converted), batch-1 CPU speed-up over FP32",
        (("speedup_vs_fp32", "int8_qat"),),
        ">=",
        2.1,
    ),
    *(
        Goal(
            bench,
            f"80% sparsity + distillation at 5 epochs of a 2,000-snippet subsample ({criterion}), "
            "accuracy vs dense (points)",
            (("points_vs_dense", variant),),
            ">=",
            -1.5,
            unit=" points",
        )
        for bench, criterion, variant in (
            ("accuracy_5epochs", "magnitude", "sparse80_kd"),
            ("accuracy_5epochs", "movement", "sparse80_kd_movement"),
            ("accuracy_5epochs_taylor", "magnitude", "sparse80_kd"),
            ("accuracy_5epochs_taylor", "taylor", "sparse80_kd_taylor"),
        )
    ),
    Goal(
        "accuracy_structured",
        "structured 50% heads + 50% neurons + int8 + KD (converted) at the full-size budget, accuracy vs "
        "dense (points)",
        (("points_vs_dense", "heads50_neurons50_int8_kd"),),
        ">=",
        -1.5,
        unit=" points",
    ),
    Goal(
        "accuracy_structured_taylor",
        "structured 50% heads + 75% neurons (Taylor) + int8 + KD (converted) at the full-size budget, "
        "accuracy vs dense (points)",
        (("points_vs_dense", "heads50_neurons75_int8_kd_taylor"),),
        ">=",
        -1.5,
        unit=" points",
    ),
    Goal(
        "serving",
        "lightning-shrink serve: int8 export's throughput (its faster backend) / dense export's on "
        "PyTorch (8 clients, localhost)",
        (("throughput_ratio_compressed_over_dense",),),
        ">=",
        2.0,
    ),
    Goal(
        "serving",
        "lightning-shrink serve: int8 ONNX export / dense ONNX export, both on ONNX Runtime",
        (("throughput_ratios", "compressed-onnx_over_dense-onnx"),),
        ">=",
        2.0,
    ),
    Goal(
        "structured",
        "50% heads + 50% neurons removed + int8 (MiniLM-shaped BERT), batch-1 CPU speed-up over FP32",
        (("medium", "speedup", "structured int8"),),
        ">=",
        3.0,
    ),
    Goal(
        "structured",
        "50% heads + 75% neurons removed + int8 (MiniLM-shaped BERT), batch-1 CPU speed-up over FP32",
        (("medium", "speedup", "structured h50n75 int8"),),
        ">=",
        3.0,
    ),
    *(
        goal
        # the preset's recipe (demo.json), and the other recipes measured at the same budget
        for bench, flag in (
            ("demo", ""),
            ("demo_sparse50", " --recipe sparse50-int8-kd"),
            ("demo_structured", " --recipe heads50-neurons50-int8-kd"),
        )
        for dataset in ("rotten_tomatoes", "tweet_sentiment")
        for goal in (
            Goal(
                bench,
                f"`demo --quick{flag} --dataset {dataset}`: compressed accuracy vs dense (points)",
                (("datasets", dataset, "difference_points"),),
                ">=",
                -3.0,
                unit=" points",
            ),
            Goal(
                bench,
                f"`demo --quick{flag} --dataset {dataset}`: batch-1 CPU speed-up over dense",
                (("datasets", dataset, "speedup"),),
                ">=",
                2.0,
            ),
            Goal(
                bench,
                f"`demo --quick{flag} --dataset {dataset}`: FP32 checkpoint size / export size",
                (("datasets", dataset, "size_ratio"),),
                ">=",
                6.0,
            ),
        )
    ),
    Goal(
        "memory",
        "global mask update, previous selection time / radix selection time (largest size run)",
        tuple(("sizes", size, "selection", "speedup") for size in ("400M", "100M", "20M")),
        ">=",
        3.0,
    ),
    Goal(
        "memory",
        "pruning: transient bytes per local weight at a mask update (new masks included)",
        tuple(
            ("sizes", size, "selection", "radix", "transient_bytes_per_weight")
            for size in ("400M", "100M", "20M")
        ),
        "<=",
        1.0,
        unit=" B",
    ),
    Goal(
        "memory",
        "pruning: persistent bytes per pruned weight (bf16 weights)",
        tuple(("sizes", size, "masks_bf16", "bytes_per_pruned_weight") for size in ("400M", "100M", "20M")),
        "<=",
        1.25,
        unit=" B",
    ),
    Goal(
        "memory",
        "QAT int8: bytes kept for backward per quantized weight beyond plain fine-tuning",
        tuple(
            ("sizes", size, "qat", "int8_recomputed_extra_bytes_per_weight")
            for size in ("400M", "100M", "20M")
        ),
        "<=",
        0.5,
        unit=" B",
    ),
    Goal(
        "memory",
        "int8 QAT under FSDP2 (400M, 2 ranks): extra peak RSS per rank over plain fine-tuning (0.5 B x "
        "185M local weights = 0.086 GiB; RSS is an upper bound)",
        (("sizes", "400M", "fsdp2_devices2", "qat_int8", "extra_GiB_per_rank_vs_plain"),),
        "<=",
        0.5 * 369e6 / 2 / 2**30,
        unit=" GiB",
    ),
    Goal(
        "memory",
        "distillation under FSDP2 (2 ranks): per-rank share of the teacher",
        (("sizes", "20M", "fsdp2_devices2", "distillation", "teacher_share_of_full"),),
        "<=",
        0.55,
        unit="",
    ),
)


def benchmark_scripts() -> list[tuple[str, Path]]:
    """``(name, path)`` of every ``bench_<name>.py``, the accuracy benchmark first."""
    scripts = sorted((p.stem.removeprefix("bench_"), p) for p in HERE.glob("bench_*.py"))
    return sorted(scripts, key=lambda s: (s[0] not in FIRST, s[0]))


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "lightning", "transformers", "torchao", "opacus"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    return info


def run_benchmarks(names: list[tuple[str, Path]], quick: bool, timeout: float) -> dict[str, Any]:
    meta = json.loads(META.read_text()) if META.is_file() else {}
    runs = meta.setdefault("runs", {})
    for name, path in names:
        cmd = [sys.executable, str(path.relative_to(ROOT)), *(["--quick"] if quick else [])]
        shown = " ".join(["python", *cmd[1:]])
        print(f"[run_all] {shown}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = "timeout", exc.stdout or "", f"timed out after {timeout:.0f} s"
            out = out.decode() if isinstance(out, bytes) else out
        wall = time.perf_counter() - start
        print(f"[run_all]   {name}: exit {code}, {wall:.0f} s", flush=True)
        runs[name] = {
            "command": shown,
            "wall_seconds": round(wall, 1),
            "exit": code,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "stderr_tail": "" if code == 0 else "\n".join(err.strip().splitlines()[-8:]),
            "stdout_tail": "\n".join(out.strip().splitlines()[-3:]),
        }
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if len(value) <= 8 else f"[{len(value)} values]"
    return str(value)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            items.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        items.append((prefix, data))
    return items


def goal_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| benchmark | goal | measured | target | met | missed by |",
        "|---|---|---|---|---|---|",
    ]
    for goal in GOALS:
        data = results.get(goal.benchmark)
        value = goal.value(data) if data is not None else None
        target = f"{goal.op} {goal.target:g}{goal.unit}"
        if value is None:
            why = "no result file" if data is None else "number not found in its JSON"
            lines.append(f"| {goal.benchmark} | {goal.what} | — | {target} | not measured ({why}) | |")
            continue
        met = value <= goal.target if goal.op == "<=" else value >= goal.target
        gap = ""
        if not met:
            diff = abs(value - goal.target)
            # A relative miss means something for ratios, not for differences in points.
            rel = (
                f" ({diff / abs(goal.target):.0%} of the target)" if goal.target and goal.unit == "x" else ""
            )
            gap = f"{diff:.3g}{goal.unit}{rel}"
        lines.append(
            f"| {goal.benchmark} | {goal.what} | {value:.3g}{goal.unit} | {target} | "
            f"{'yes' if met else '**no**'} | {gap} |"
        )
    return lines


def write_doc(meta: dict[str, Any], command: str) -> str:
    results: dict[str, dict[str, Any]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path == META:
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    mach = meta.get("machine") or machine()
    runs = meta.get("runs", {})
    lines = [
        "# Benchmarks",
        "",
        "This page is generated by `benchmarks/run_all.py` from `benchmarks/results/*.json`; do not edit it",
        "by hand. Every number below was measured by the command shown, on the machine shown.",
        "",
        "## How to reproduce",
        "",
        "```",
        "python benchmarks/run_all.py            # every benchmark, full size",
        "python benchmarks/run_all.py --quick    # every benchmark, short runs (noisier)",
        "python benchmarks/run_all.py --docs-only  # only rewrite this page from the JSON files",
        "```",
        "",
        f"This page was last written by `{command}` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach.get('cpu')} ({mach.get('cores')} cores available to the process)",
        f"- Python {mach.get('python')}, torch {mach.get('torch')}, lightning {mach.get('lightning')}, "
        f"transformers {mach.get('transformers')}, torchao {mach.get('torchao')}, "
        f"opacus {mach.get('opacus')}",
        "- Timing benchmarks use interleaved repetitions in one process and report medians, with",
        "  `torch.set_num_threads(2)` unless stated. The development machines are shared; ratios are more",
        "  stable than absolute times, and `--quick` runs are noisier than full ones.",
        "",
        "## Goals",
        "",
        *goal_rows(results),
        "",
        "## Runs",
        "",
        "| benchmark | command | date | wall time | exit |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(set(results) | set(runs)):
        run = runs.get(name)
        own = results.get(name, {})
        if run is not None and str(own.get("date", "")) > str(run.get("date", "")):
            run = None  # run directly since run_all last ran it: its own record is the one
        if run is None:
            wall = own.get("wall_seconds")
            lines.append(
                f"| {name} | `{own.get('command', 'not run by run_all')}` | {own.get('date', '')} | "
                f"{'' if wall is None else f'{wall:.0f} s'} | |"
            )
        else:
            lines.append(
                f"| {name} | `{run['command']}` | {run['date']} | "
                f"{run['wall_seconds']:.0f} s | {run['exit']} |"
            )
    failed = {n: r for n, r in runs.items() if r.get("exit") != 0}
    if failed:
        lines += [
            "",
            "Benchmarks that failed in their last run (their JSON, if any, is from an earlier run):",
            "",
        ]
        for name, run in failed.items():
            lines += [f"- **{name}** (exit {run['exit']}):", "", "```", run.get("stderr_tail", ""), "```", ""]
    for name, data in results.items():
        lines += [
            "",
            f"## {name}",
            "",
            f"From `benchmarks/results/{name}.json`.",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        for key, value in _flatten(data):
            if key in ("machine", "command", "date") or key.startswith("machine."):
                continue
            lines.append(f"| {key} | {_fmt(value)} |")
        if isinstance(data.get("machine"), dict):
            m = data["machine"]
            lines += ["", f"Measured on: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}."]
    notes = HERE / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    text = "\n".join(lines) + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="keep NAME's existing JSON"
    )
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these")
    parser.add_argument("--docs-only", action="store_true", help="rewrite docs/benchmarks.md only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    scripts = benchmark_scripts()
    known = {name for name, _ in scripts}
    for name in [*args.skip, *args.only]:
        if name not in known:
            parser.error(f"unknown benchmark {name!r} (known: {', '.join(sorted(known))})")
    selected = [(n, p) for n, p in scripts if n not in args.skip and (not args.only or n in args.only)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.docs_only:
        meta = json.loads(META.read_text()) if META.is_file() else {}
        if meta.get("last_command"):
            command = f"{meta['last_command']}` and re-rendered by `{command}"
    else:
        meta = run_benchmarks(selected, args.quick, args.timeout)
        meta["machine"] = machine()
        meta["last_command"] = command
        meta["last_wall_seconds"] = round(time.perf_counter() - start, 1)
        META.write_text(json.dumps(meta, indent=2) + "\n")
    write_doc(meta, command)
    print(f"[run_all] wrote {DOC.relative_to(ROOT)} ({time.perf_counter() - start:.0f} s)")
    failed = (
        [n for n, _ in selected if meta.get("runs", {}).get(n, {}).get("exit") != 0]
        if not args.docs_only
        else []
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
