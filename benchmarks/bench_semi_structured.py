"""2:4 semi-structured sparsity on CUDA: ``convert(model, semi_structured=True)`` against the dense
model, per batch size (needs an NVIDIA GPU of the Ampere generation or later).

An MLP of ``--layers`` blocks ``Linear(d, 4d) -> GELU -> Linear(4d, d)`` (the FFN of a transformer,
``--hidden`` d = 2048 by default) in float16 is pruned to 2:4 by magnitude (the masks of
``GradualMagnitudePruning(0.5, pattern="2:4")``: 2 of every 4 consecutive inputs kept), converted,
and timed with CUDA events at token counts from 1 to 8192 (batch x sequence flattened), median of the
repetitions, dense and sparse interleaved. Small batches do not pay: the sparse kernels' fixed cost
and the padding to their tiles outweigh the halved multiply-adds until the matrices are large.

Usage::

    python benchmarks/bench_semi_structured.py [--hidden 2048] [--layers 4] [--reps 50]

Writes ``benchmarks/results/semi_structured.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning_shrink as ls  # noqa: E402
from lightning_shrink.pruning.distributed import Comm  # noqa: E402
from lightning_shrink.pruning.masks import compute_masks, parse_pattern  # noqa: E402


def build(hidden: int, layers: int) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)]
    return nn.Sequential(*blocks)


def prune_two_four(model: nn.Module) -> None:
    pattern = parse_pattern("2:4")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                keep = compute_masks(
                    [w], [torch.ones_like(w, dtype=torch.bool)], [False], [w.numel()], 0.5, pattern, Comm()
                )[0]
                w.mul_(keep)


def timed(model: nn.Module, x: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():  # skipped, not failed, by run_all.py on a CPU machine
        print("bench_semi_structured.py: skipped, it needs a CUDA device (torch's 2:4 kernels are CUDA-only)")
        return
    torch.manual_seed(0)
    dense = build(args.hidden, args.layers)
    prune_two_four(dense)
    dense = dense.cuda().half().eval()
    sparse = ls.convert(copy.deepcopy(dense), semi_structured=True)
    rows = []
    with torch.inference_mode():
        for tokens in (1, 8, 32, 128, 512, 2048, 8192):
            x = torch.randn(tokens, args.hidden, device="cuda", dtype=torch.half)
            err = float((dense(x) - sparse(x)).abs().max())
            for _ in range(5):
                timed(dense, x), timed(sparse, x)
            d, s = [], []
            for _ in range(args.reps):
                d.append(timed(dense, x))
                s.append(timed(sparse, x))
            rows.append(
                {
                    "tokens": tokens,
                    "dense_ms": statistics.median(d),
                    "sparse_ms": statistics.median(s),
                    "max_abs_diff": err,
                }
            )
    out = ROOT / "results" / "semi_structured.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"{meta['device']}, hidden {args.hidden}, {args.layers} FFN blocks, float16")
    print("| tokens | dense | 2:4 semi-structured | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['dense_ms']:.3f} ms | {r['sparse_ms']:.3f} ms | "
            f"{r['dense_ms'] / r['sparse_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
