"""Quantization benchmark on all-MiniLM-L6-v2 (CPU).

Measures, in one process with interleaved repetitions and medians:

- QAT training-step time (forward + backward + AdamW step, batch 16 x 64 tokens) over a plain step,
  for lightning-shrink's QuantizationAwareTraining (int8 per-channel weights, dynamic 7-bit
  per-tensor activations as the x86 int8 kernel computes them, int8 embeddings), torchao 0.18
  ``QATConfig`` (int8 per-channel weights, per-token activations) and torch's
  ``torch.ao.quantization`` FakeQuantize modules wrapped around each Linear;
- the exported int8 model's size over the FP32 export, the same with 80% of the Linear weights
  pruned (magnitude, per layer) so that the pruning codec can sparse-encode them, and that pruned
  model again with int4 embeddings (``embedding_bits=4, embedding_group_size=64``, packed two
  values per byte): the word-embedding table is half of MiniLM's weights;
- batch-1 x 64-token CPU latency of the converted int8 model over FP32.

Usage::

    python benchmarks/bench_quantization.py [--quick] [--threads 2]

Writes ``benchmarks/results/quantization.json`` and prints a markdown section.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning_shrink as ls  # noqa: E402
from lightning_shrink.demo.model import MINILM, load_backbone  # noqa: E402
from lightning_shrink.quantization import QuantizationConfig, prepare_qat  # noqa: E402
from lightning_shrink.quantization._kernels import kernel_name  # noqa: E402


def load_minilm() -> nn.Module:
    return load_backbone(MINILM, num_labels=2)


def batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


class TorchFakeQuantLinear(nn.Module):
    """A Linear wrapped with torch.ao.quantization FakeQuantize modules (the peers' baseline)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
        from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver as PerChannel

        self.linear = linear
        self.weight_fq = FakeQuantize(
            observer=PerChannel,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
        self.act_fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act_fq(x), self.weight_fq(self.linear.weight), self.linear.bias)


def torch_ops_variant(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.Linear:
                setattr(m, child_name, TorchFakeQuantLinear(child))
    return model


def torchao_variant(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model


#: Elements per scale of the int4 embedding rows (MiniLM's rows have 384).
EMBEDDING_GROUP_SIZE = 64


def ours_variant(model: nn.Module, **settings) -> nn.Module:
    prepare_qat(model, QuantizationConfig(**settings))
    return model


def time_train_steps(
    variants: dict[str, nn.Module], data, reps: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step wall-clock and process CPU times of each variant, interleaved repetitions.

    The machine is shared: wall time includes waiting for the cores, CPU time
    (``time.process_time``, all threads) does not, so both are reported.
    """
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in variants.items()}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}

    def step(k: str) -> None:
        out = variants[k](**data)
        out.loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    for k in variants:  # warm-up
        variants[k].train()
        step(k)
    for _ in range(reps):
        for k in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(k)
            wall[k].append((time.perf_counter() - t0) / steps)
            cpu[k].append((time.process_time() - c0) / steps)
    return wall, cpu


@torch.no_grad()
def time_inference(
    variants: dict[str, nn.Module], data, reps: int, iters: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-call wall-clock and CPU times, interleaved repetitions (see :func:`time_train_steps`)."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for m in variants.values():
        m.eval()
        for _ in range(3):
            m(**data)
    for _ in range(reps):
        for k, m in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                m(**data)
            wall[k].append((time.perf_counter() - t0) / iters)
            cpu[k].append((time.process_time() - c0) / iters)
    return wall, cpu


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name == "model.safetensors")


def prune_linear_(model: nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear) and w is not None:
                k = int(w.numel() * sparsity)
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao variant")
    parser.add_argument("--out", default=str(ROOT / "results" / "quantization.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    reps, steps = (2, 1) if args.quick else (7, 2)
    inf_reps, inf_iters = (3, 5) if args.quick else (9, 20)

    base = load_minilm()
    vocab = base.config.vocab_size
    train_batch = batch(16, 64, vocab)
    variants = {
        "plain": copy.deepcopy(base),
        "lightning-shrink": ours_variant(copy.deepcopy(base)),
        "torch fake-quant ops": torch_ops_variant(copy.deepcopy(base)),
    }
    if not args.no_torchao:
        import importlib.util

        if importlib.util.find_spec("torchao") is None:
            raise SystemExit(
                "bench_quantization: the torchao peer needs torchao: pip install -e '.[benchmarks]' "
                "(or pass --no-torchao)"
            )
        variants["torchao QATConfig"] = torchao_variant(copy.deepcopy(base))
    train, train_cpu = time_train_steps(variants, train_batch, reps, steps)
    med = {k: statistics.median(v) for k, v in train.items()}
    med_cpu = {k: statistics.median(v) for k, v in train_cpu.items()}
    step_ratio = {k: v / med["plain"] for k, v in med.items()}
    step_ratio_cpu = {k: v / med_cpu["plain"] for k, v in med_cpu.items()}
    del variants

    # Export sizes and batch-1 latency.
    qat = ours_variant(copy.deepcopy(base))
    int8 = ls.convert(qat)
    tmp = Path(tempfile.mkdtemp())
    fp32_bytes = dir_size(ls.export(base, tmp / "fp32"))
    int8_bytes = dir_size(ls.export(int8, tmp / "int8"))
    pruned = copy.deepcopy(base)
    prune_linear_(pruned, 0.8)
    pruned_int8 = ls.convert(ours_variant(copy.deepcopy(pruned)))
    pm = ls.get_plugin_manager()
    sparse_codec = sorted(
        impl.plugin_name for impl in pm.hook.shrink_export.get_hookimpls() if impl.plugin_name != "int8"
    )
    pruned_bytes = dir_size(ls.export(pruned_int8, tmp / "pruned_int8", pluginmanager=pm))
    pruned_int4_tables = ls.convert(
        ours_variant(copy.deepcopy(pruned), embedding_bits=4, embedding_group_size=EMBEDDING_GROUP_SIZE)
    )
    pruned_int4_tables_bytes = dir_size(
        ls.export(pruned_int4_tables, tmp / "pruned_int8_int4_embeddings", pluginmanager=pm)
    )
    infer_batch = batch(1, 64, vocab, seed=1)
    infer_batch.pop("labels")
    from torch.ao.quantization import quantize_dynamic

    ao_dynamic = quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    inf, inf_cpu = time_inference(
        {"fp32": base, "int8": int8, "torch.ao quantize_dynamic": ao_dynamic},
        infer_batch,
        inf_reps,
        inf_iters,
    )
    ao_lat = statistics.median(inf["torch.ao quantize_dynamic"])
    fp32_lat, int8_lat = statistics.median(inf["fp32"]), statistics.median(inf["int8"])
    fp32_cpu, int8_cpu = statistics.median(inf_cpu["fp32"]), statistics.median(inf_cpu["int8"])
    with torch.no_grad():
        qat.eval()
        ref, got = qat(**infer_batch).logits, int8(**infer_batch).logits
    results = {
        "model": "all-MiniLM-L6-v2 (sequence classification head, 2 labels)",
        "threads": args.threads,
        "quick": args.quick,
        "load_average_at_start": load_at_start,
        "train_batch": "16 x 64 tokens, forward + backward + AdamW step",
        "train_step_seconds": med,
        "train_step_cpu_seconds": med_cpu,
        "train_step_ratio_vs_plain": step_ratio,
        "train_step_cpu_ratio_vs_plain": step_ratio_cpu,
        "int8_kernel": kernel_name(),
        "export_bytes": {
            "fp32": fp32_bytes,
            "int8": int8_bytes,
            "int8_pruned80": pruned_bytes,
            "int8_int4_embeddings_pruned80": pruned_int4_tables_bytes,
        },
        "export_embedding_group_size": EMBEDDING_GROUP_SIZE,
        "export_size_ratio_fp32_over_int8": fp32_bytes / int8_bytes,
        "export_size_ratio_fp32_over_int8_pruned80": fp32_bytes / pruned_bytes,
        "export_size_ratio_fp32_over_int8_int4_embeddings_pruned80": fp32_bytes / pruned_int4_tables_bytes,
        "export_sparse_codecs": sparse_codec,
        "batch1_latency_seconds": {"fp32": fp32_lat, "int8": int8_lat},
        "batch1_speedup_int8_over_fp32": fp32_lat / int8_lat,
        "batch1_latency_torch_ao_quantize_dynamic_seconds": ao_lat,
        "batch1_speedup_torch_ao_quantize_dynamic_over_fp32": fp32_lat / ao_lat,
        "batch1_cpu_speedup_int8_over_fp32": fp32_cpu / int8_cpu,
        "converted_vs_fake_quant_max_abs_logit_diff": float((ref - got).abs().max()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print("## Quantization (all-MiniLM-L6-v2, CPU)\n")
    print(
        f"{args.threads} threads; interleaved repetitions, medians{' (quick run)' if args.quick else ''}.\n"
    )
    print("| QAT variant | step wall (s) | wall ratio to plain | step CPU (s) | CPU-time ratio |")
    print("|---|---|---|---|---|")
    for k in train:
        print(f"| {k} | {med[k]:.3f} | {step_ratio[k]:.3f}x | {med_cpu[k]:.3f} | {step_ratio_cpu[k]:.3f}x |")
    print()
    print("| export | size (MB) | FP32 / this |")
    print("|---|---|---|")
    for k, v in results["export_bytes"].items():
        print(f"| {k} | {v / 1e6:.1f} | {fp32_bytes / v:.2f}x |")
    print()
    print(f"Sparse codecs in the export: {sparse_codec or 'none registered'}.\n")
    print(
        f"Batch 1 x 64 tokens: FP32 {fp32_lat * 1e3:.1f} ms, int8 ({kernel_name()}) {int8_lat * 1e3:.1f} ms: "
        f"**{fp32_lat / int8_lat:.2f}x** faster (CPU time: {fp32_cpu / int8_cpu:.2f}x). "
        f"For comparison, torch.ao `quantize_dynamic` (Linear only, float embeddings) in the same run: "
        f"{ao_lat * 1e3:.1f} ms, {fp32_lat / ao_lat:.2f}x. "
        f"Load average at start: {load_at_start:.1f}. Converted vs fake-quantized logits: max |diff| "
        f"{results['converted_vs_fake_quant_max_abs_logit_diff']:.2e}."
    )


if __name__ == "__main__":
    main()
