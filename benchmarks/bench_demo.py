"""The demo's goals: ``lightning-shrink demo --quick`` on each named data set of the demo.

Goals (per data set): the compressed model within 3 accuracy points of dense, at least 2x faster at
batch 1 on the CPU, and an export at least 6x smaller than the FP32 checkpoint.

Usage::

    python benchmarks/bench_demo.py [--preset quick|default] [--datasets rotten_tomatoes,tweet_sentiment]
    python benchmarks/bench_demo.py --collect DIR [DIR ...]   # from finished demo output directories

Each data set is one ``run_demo`` (the same pipeline as the command); the numbers are read from
its ``results.json``. ``--collect`` reads the ``results.json`` of demo runs made with the command
line instead (their command is kept). Writes ``benchmarks/results/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL_POINTS = 3.0
GOAL_SPEEDUP = 2.0
GOAL_SIZE_RATIO = 6.0


def _entry(results: dict[str, Any], wall: float | None) -> dict[str, Any]:
    acc, size, lat = results["accuracy"], results["size_bytes"], results["latency_ms_batch1"]
    timings = results.get("timings_s", {})
    return {
        "command": results.get("command"),
        "preset": results.get("preset"),
        "recipe": (results.get("recipe") or {}).get("name"),
        "techniques": results.get("techniques"),
        "sparsity_target": (results.get("config") or {}).get("sparsity"),
        "data": results["data"]["source"],
        "split": results["data"]["split"],
        "train": results["data"]["train"],
        "test": results["data"]["test"],
        "dense_accuracy": acc["dense"],
        "compressed_accuracy": acc["compressed"],
        "difference_points": acc["difference_points"],
        "sparsity_of_linear_weights": results["sparsity_of_linear_weights"],
        "fp32_checkpoint_bytes": size["fp32_checkpoint"],
        "export_bytes": size["export"],
        "size_ratio": size["ratio"],
        "latency_ms_dense": lat["dense"],
        "latency_ms_compressed": lat["compressed"],
        "speedup": lat["speedup"],
        "goals_met": {
            "accuracy": acc["difference_points"] >= -GOAL_POINTS,
            "speedup": lat["speedup"] >= GOAL_SPEEDUP,
            "size": size["ratio"] >= GOAL_SIZE_RATIO,
        },
        "dense_fit_s": timings.get("dense_fit_s"),
        "compressed_fit_s": timings.get("compressed_fit_s"),
        "wall_seconds": wall,
        "machine": results.get("machine"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lightning_shrink.demo import run_demo
    from lightning_shrink.demo.datasets import DATASETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=["quick", "default"])
    parser.add_argument("--quick", action="store_true", help="the quick preset (the default)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--collect", nargs="+", default=None, metavar="DIR", help="finished demo directories")
    parser.add_argument("--out", default=str(ROOT / "results" / "demo.json"))
    args = parser.parse_args(argv)
    started = time.time()
    entries: dict[str, Any] = {}
    if args.collect:
        for directory in args.collect:
            results = json.loads((Path(directory) / "results.json").read_text())
            name = results.get("dataset") or results["data"]["source"]
            entries[name] = _entry(results, results.get("wall_seconds"))
    else:
        for name in args.datasets.split(","):
            if name not in DATASETS:
                parser.error(f"--datasets: unknown data set {name!r} (choose from {', '.join(DATASETS)})")
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
                results = run_demo(Path(tmp) / "out", preset=args.preset, dataset=name, progress=False)
            results["command"] = f"lightning-shrink demo --{args.preset} --dataset {name}".replace(
                "--default ", ""
            )
            entries[name] = _entry(results, time.perf_counter() - start)
    report = {
        "benchmark": "demo",
        "goals": {"points": -GOAL_POINTS, "speedup": GOAL_SPEEDUP, "size_ratio": GOAL_SIZE_RATIO},
        "datasets": entries,
        "command": " ".join(
            ["python", "benchmarks/bench_demo.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, e in entries.items():
        print(
            f"[demo] {name}: dense {e['dense_accuracy']:.2%}, compressed {e['compressed_accuracy']:.2%} "
            f"({e['difference_points']:+.2f} points), {e['speedup']:.2f}x faster, "
            f"{e['size_ratio']:.2f}x smaller"
        )
    return report


if __name__ == "__main__":
    main()
