"""Structured-pruning latency benchmark (CPU, batch 1).

Builds two BERT classifiers from configs (random weights: latency does not depend on what the weights
learned): ``tiny`` (2 layers, hidden 128, 4 heads, 512 neurons) and ``medium`` (the shape of
all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, 1536 neurons). Each is pruned to 50% of its
attention heads and 50% of its FFN neurons, and again to 50% of the heads and 75% of the neurons
(``structured h50n75``) (magnitude, per layer, the masks of
``GradualMagnitudePruning(pattern="heads" / "neurons", scope="layer")``), converted with
``lightning_shrink.convert`` (heads and neurons physically removed), and timed at batch 1 x 64 tokens
against the dense model, in one process, interleaved, median of the repetitions. The same is measured
after int8 conversion (``prepare_qat`` + ``convert``) of both, for the structured + int8 recipe.

Usage::

    nice -n 10 python benchmarks/bench_structured.py [--threads 2] [--reps 30] [--clock wall|cpu]

``--clock cpu`` times the CPU time of one thread instead of the wall clock: on a machine whose cores
other processes share, wall-clock medians measure the scheduler, not the model.

Writes ``benchmarks/results/structured.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning_shrink as ls  # noqa: E402
from lightning_shrink.pruning.structured import discover, group_masks  # noqa: E402
from lightning_shrink.quantization import QuantizationConfig, prepare_qat  # noqa: E402

SIZES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "medium": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
}


def build(size: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=2, **SIZES[size])
    return BertForSequenceClassification(config).eval()


def prune(model: torch.nn.Module, heads: float, neurons: float) -> None:
    params = dict(model.named_parameters())
    for kind, fraction in (("heads", heads), ("neurons", neurons)):
        specs = discover(model, kind)
        keeps = {p: torch.ones_like(params[p], dtype=torch.bool) for s in specs for p in s.params}
        with torch.no_grad():
            for name, mask in group_masks(specs, params, keeps, fraction, "layer").items():
                params[name].mul_(mask)


def int8(model: torch.nn.Module) -> torch.nn.Module:
    prepared = copy.deepcopy(model)
    prepare_qat(prepared, QuantizationConfig())
    return ls.convert(prepared)


def latency(models: dict[str, torch.nn.Module], reps: int, clock: str, seq: int = 64) -> dict[str, float]:
    """Median milliseconds per forward: wall clock (``perf_counter``) or the CPU time of the calling
    thread (``thread_time``, with one torch thread: what the forward costs, unaffected by other
    processes taking the cores of a shared machine)."""
    now = time.perf_counter if clock == "wall" else time.thread_time
    ids = torch.randint(1000, 30000, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(5):
                m(**batch)
        for _ in range(reps):
            for name, m in models.items():  # interleaved: the machine's load hits every variant alike
                t = now()
                m(**batch)
                times[name].append(now() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: median wall time with --threads threads; cpu: median CPU time of one thread (one "
        "torch thread), for machines whose cores other processes share",
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        args.threads = 1
    torch.set_num_threads(args.threads)
    results = {}
    for size in SIZES:
        dense = build(size)
        models = {"dense": dense, "dense int8": int8(dense)}
        diff = 0.0
        for heads, neurons in ((0.5, 0.5), (0.5, 0.75)):
            # "structured": 50 % of the heads and neurons; "structured h50n75": 75 % of the neurons.
            key = (
                "structured" if neurons == 0.5 else f"structured h{heads:.0%}n{neurons:.0%}".replace("%", "")
            )
            masked = copy.deepcopy(dense)
            prune(masked, heads, neurons)
            small = ls.convert(masked)
            ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                err = float((masked(input_ids=ids).logits - small(input_ids=ids).logits).abs().max())
            diff = max(diff, err)
            models[key] = small
            models[f"{key} int8"] = int8(small)
        ms = latency(models, args.reps, args.clock)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items() if "int8" not in k}
        speedup = {k: ms["dense"] / v for k, v in ms.items() if k != "dense"}
        results[size] = {
            "ms": ms,
            "speedup": speedup,
            "params": params,
            "max_abs_diff_masked_vs_converted": diff,
        }
    out = ROOT / "results" / "structured.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "threads": args.threads,
        "reps": args.reps,
        "clock": args.clock,
        "torch": torch.__version__,
        "batch": "1 x 64 tokens",
    }
    record = {
        "command": "python benchmarks/bench_structured.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "meta": meta,
        **results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    names = list(next(iter(results.values()))["ms"])
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for size, r in results.items():
        ms = r["ms"]
        cells = [
            f"{ms[n]:.2f} ms" + ("" if n == "dense" else f" ({ms['dense'] / ms[n]:.2f}x)") for n in names
        ]
        print(f"| {size} | " + " | ".join(cells) + " |")
    print(json.dumps({s: r["max_abs_diff_masked_vs_converted"] for s, r in results.items()}))


if __name__ == "__main__":
    main()
