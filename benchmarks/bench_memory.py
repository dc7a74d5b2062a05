"""Memory benchmark: what pruning, QAT and distillation add to fine-tuning LlamaForCausalLM (from
configs, about 20M, 100M and 400M parameters), per process and per FSDP2 rank.

Measured, each size in its own subprocess (peak RSS is a per-process high-water mark):

- ``selection``: one global mask update (50% of every decoder ``nn.Linear`` weight, one threshold)
  with the previous selection (``torch.kthvalue`` of the concatenated keys, kept in
  tests/legacy_selection.py) and the radix selection: time per million weights, and the transient
  memory (peak RSS above the RSS before the call, the high-water mark reset through
  ``/proc/self/clear_refs``) per weight, including the new boolean masks;
- ``masks``: persistent bytes per pruned weight, by tensor accounting of the plugin's masks after a
  real fit (the previous code also kept a copy of every mask in the parameter's dtype);
- ``qat``: bytes kept alive from forward to backward (every storage autograd saves, seen through
  ``saved_tensors_hooks``, and every other CPU tensor the garbage collector reaches after forward:
  what a hook's closure or a cache holds; each storage counted once, parameters excluded) in a
  forward/backward of batch 2 x 64 tokens, plain and with int8 / int4 fake quantization, with the
  fake-quantized weights kept (the previous behaviour) or recomputed;
- ``fsdp2`` (``--fsdp2``: at the smallest size run, or at the sizes given, ``--fsdp2 20M,400M``): real
  2-process ``Trainer.fit`` under ``ModelParallelStrategy`` + ``fully_shard`` on CPU gloo, each rank's
  peak RSS (``VmHWM``) for plain fine-tuning, pruning, int8 QAT and distillation, each rank's share
  of the teacher, and, after the fit, the same accounting as ``qat`` per rank (bytes kept from
  forward to backward beyond plain, per local weight of the decoder's Linear layers): peak RSS is an
  upper bound that moves by a few hundred MB between identical runs (the allocator's high-water
  mark), the accounting is exact for what is kept. Every subprocess runs with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (large tensors mapped and unmapped, not kept in the heap), so
  that peak RSS follows what is allocated.

Usage::

    nice -n 10 python benchmarks/bench_memory.py [--sizes 20M,100M,400M] [--fsdp2 [SIZES]] [--quick]
        [--out benchmarks/results/memory.json]

Writes ``benchmarks/results/memory.json`` (or ``--out``): the sizes run now replace their earlier
results, the other sizes' results are kept (each size records the command, date and wall time that
measured it), and the extrapolation is derived again from the largest size in the file. Prints the
total wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", "1")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))

import torch  # noqa: E402

#: hidden, intermediate, layers, heads, vocabulary: about 20M, 100M and 400M parameters.
SIZES = {
    "20M": (256, 704, 8, 4, 32000),
    "100M": (640, 1728, 10, 10, 32000),
    "400M": (1024, 2752, 24, 16, 32000),
}
GiB = 1024**3


def llama(size: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        m.weight.detach()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    ]


def selection(size: str, reps: int) -> dict[str, Any]:
    from legacy_selection import legacy_compute_masks

    from lightning_shrink.pruning.distributed import Comm
    from lightning_shrink.pruning.masks import compute_masks, parse_pattern

    weights = _linear_weights(llama(size))
    n = sum(w.numel() for w in weights)
    keeps = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    args = (
        weights,
        keeps,
        [False] * len(weights),
        [w.numel() for w in weights],
        0.5,
        parse_pattern("unstructured"),
    )
    out: dict[str, Any] = {"weights": n}
    results = {}
    for name, fn in (("previous", legacy_compute_masks), ("radix", compute_masks)):
        times, peaks = [], []
        for _ in range(reps):
            base = _status("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            masks = fn(*args, Comm())
            times.append(time.perf_counter() - start)
            peaks.append(_status("VmHWM") - base)
            results[name] = masks
            del masks
        out[name] = {
            "seconds_per_million_weights": statistics.median(times) / n * 1e6,
            "transient_bytes_per_weight": min(peaks) / n,
        }
    out["identical_masks"] = all(
        torch.equal(a, b) for a, b in zip(results["previous"], results["radix"], strict=True)
    )
    out["speedup"] = (
        out["previous"]["seconds_per_million_weights"] / out["radix"]["seconds_per_million_weights"]
    )
    return out


def masks(size: str, dtype: torch.dtype) -> dict[str, Any]:
    from test_large_models import LlamaModule, Tokens

    import lightning_shrink as ls
    from lightning_shrink.testing.models import cpu_trainer

    class Module(LlamaModule):
        def configure_model(self) -> None:
            if self.model is None:
                self.model = llama(size, dtype)

    pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=1, frequency=1)
    trainer = cpu_trainer(
        callbacks=[pruning], max_steps=1, precision="bf16-true" if dtype == torch.bfloat16 else "32-true"
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(Tokens(n=2, length=16), batch_size=2))
    plugin = pruning.plugin
    held = {id(t): t for t in plugin.keeps}
    held.update({id(t): t for t in getattr(plugin, "_active_masks", [])})
    mask_bytes = sum(t.numel() * t.element_size() for t in held.values())
    pruned_params = sum(p.numel() for p in plugin.params)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "bytes_per_pruned_weight": mask_bytes / pruned_params,
        "previous_bytes_per_pruned_weight": 1 + itemsize,
    }


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes kept alive from forward to backward by one forward/backward of batch 2 x 64 tokens: every
    storage autograd saves (seen through ``saved_tensors_hooks``) and every other CPU tensor the
    garbage collector reaches after forward (what a hook's closure or a cache holds), each storage
    counted once, parameters excluded. Under FSDP2 the gathered weights are freed after forward
    (their storage resized to 0), so what counts is what a rank really holds."""
    storages: dict[int, int] = {}

    def record(t: torch.Tensor) -> int | None:
        if hasattr(t, "to_local"):  # a DTensor: its local shard holds the memory
            t = t.to_local()
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            return None
        storages[s.data_ptr()] = s.nbytes()
        return s.data_ptr()

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t)
        return t

    model.train()
    gc.collect()  # earlier garbage in cycles would count as held
    ids = torch.randint(0, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on lazy modules' deprecated attributes
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                record(obj)
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {record(p) for p in model.parameters()}
    return sum(v for k, v in storages.items() if k not in params)


def qat(size: str) -> dict[str, Any]:
    from lightning_shrink.quantization import fake_layers
    from lightning_shrink.quantization.config import QuantizationConfig
    from lightning_shrink.quantization.prepare import prepare_qat

    out: dict[str, Any] = {}
    plain = kept_bytes(llama(size))
    out["plain_saved_bytes"] = plain
    for bits, extra in ((8, {}), (4, {"group_size": 32})):
        model = llama(size)
        prepare_qat(model, QuantizationConfig(weight_bits=bits, activations=None, embeddings=False, **extra))
        quantized = sum(m.weight.numel() for m in model.modules() if fake_layers.is_prepared(m))
        for mode, recompute in (("previous", False), ("recomputed", True)):
            fake_layers.RECOMPUTE_IN_BACKWARD = recompute
            out[f"int{bits}_{mode}_extra_bytes_per_weight"] = (kept_bytes(model) - plain) / quantized
        fake_layers.RECOMPUTE_IN_BACKWARD = True
    return out


FSDP2_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {bench!r})
from lightning.pytorch.strategies import ModelParallelStrategy
import lightning_shrink as ls
from lightning_shrink.testing.models import cpu_trainer
from test_large_models import LlamaModule, Tokens
from bench_memory import kept_bytes, llama, _status
size, mode = {size!r}, {mode!r}
class Module(LlamaModule):
    def configure_model(self):
        if self.model is None:
            from torch.distributed.fsdp import fully_shard
            with torch.device("cpu"):
                self.model = llama(size)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
teacher = llama(size) if mode == "distillation" else None
callbacks = {{"plain": [],
    "pruning": [ls.GradualMagnitudePruning(0.5, start_step=0, end_step=1, frequency=1)],
    "qat_int8": [ls.QuantizationAwareTraining(activations=None, embeddings=False)],
    "distillation": [ls.KnowledgeDistillation(teacher)] if teacher is not None else []}}[mode]
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = cpu_trainer(callbacks=callbacks, strategy=strategy,
    devices=2, max_steps=2, use_distributed_sampler=False)
module = Module()
trainer.fit(module, torch.utils.data.DataLoader(Tokens(n=4, length=64), batch_size=2))
from lightning_shrink.quantization.fake_layers import is_prepared
result = {{"peak_rss_bytes": _status("VmHWM"), "kept_bytes": kept_bytes(module.model),
    "prepared_layers": sum(is_prepared(m) for m in module.model.modules()),
    "local_linear_weights": sum((p.to_local() if hasattr(p, "to_local") else p).numel()
        for n, p in module.model.named_parameters() if n.endswith("proj.weight"))}}
if teacher is not None:
    result["teacher_local_bytes"] = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in teacher.parameters())
    result["teacher_bytes"] = sum(p.numel() * p.element_size() for p in teacher.parameters())
with open(os.path.join({out!r}, f"{{mode}}_rank{{trainer.global_rank}}.json"), "w") as f:
    json.dump(result, f)
"""


def fsdp2(size: str, tmp: Path) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    # Large tensors mapped and unmapped rather than kept in the heap (glibc's dynamic threshold would
    # otherwise move them into it after the first frees): peak RSS then follows what is allocated.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT.parent),
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    for mode in ("plain", "pruning", "qat_int8", "distillation"):
        code = FSDP2_SCRIPT.format(
            tests=str(ROOT.parent / "tests"), bench=str(ROOT), size=size, mode=mode, out=str(tmp)
        )
        script = tmp / f"{mode}.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=4 * 3600
        )
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        ranks = [json.loads((tmp / f"{mode}_rank{r}.json").read_text()) for r in range(2)]
        out[mode] = {
            "peak_rss_GiB_per_rank": max(r["peak_rss_bytes"] for r in ranks) / GiB,
            "kept_bytes_per_rank": max(r["kept_bytes"] for r in ranks),
            "prepared_layers": ranks[0]["prepared_layers"],
        }
        local_linear = max(r["local_linear_weights"] for r in ranks)
        if mode == "distillation":
            out[mode]["teacher_share_of_full"] = (
                max(r["teacher_local_bytes"] for r in ranks) / ranks[0]["teacher_bytes"]
            )
    for mode in ("pruning", "qat_int8", "distillation"):
        out[mode]["extra_GiB_per_rank_vs_plain"] = (
            out[mode]["peak_rss_GiB_per_rank"] - out["plain"]["peak_rss_GiB_per_rank"]
        )
        # by accounting: what a rank keeps from forward to backward, beyond plain, per local weight of
        # the decoder's Linear layers (the ones QAT prepares)
        out[mode]["kept_extra_bytes_per_local_linear_weight"] = (
            out[mode]["kept_bytes_per_rank"] - out["plain"]["kept_bytes_per_rank"]
        ) / local_linear
    return out


def _in_tempdir(size: str) -> dict[str, Any]:
    """:func:`fsdp2` with its generated scripts and per-rank results in a temporary directory."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{size}-") as tmp:
        return fsdp2(size, Path(tmp))


def one_size(size: str, reps: int, with_fsdp2: bool) -> dict[str, Any]:
    torch.set_num_threads(2)
    params = sum(p.numel() for p in llama(size).parameters())
    result: dict[str, Any] = {"parameters": params}
    parts = {
        "selection": lambda: selection(size, reps),
        "masks_bf16": lambda: masks(size, torch.bfloat16),
        "qat": lambda: qat(size),
    }
    if with_fsdp2:
        parts["fsdp2_devices2"] = lambda: _in_tempdir(size)
    for name, part in parts.items():
        begin = time.perf_counter()
        result[name] = part()
        seconds = time.perf_counter() - begin
        print(
            f"[bench_memory] {size} {name} ({seconds:.0f} s): {json.dumps(result[name])}",
            file=sys.stderr,
            flush=True,
        )
    return result


def extrapolation(results: dict[str, Any]) -> dict[str, Any]:
    """Extra memory per GPU (GB, bf16 weights, 8 GPUs, FSDP2) for 7B and 70B Llama models, from the
    measured bytes per weight; the teacher is the same size as the student."""
    largest = results[max(results, key=lambda s: results[s]["parameters"])]
    sel = largest["selection"]
    q = largest["qat"]
    # QAT: the larger of the one-process and the per-rank FSDP2 accounting (bytes kept per weight), and
    # the FSDP2 peak-RSS extra per local weight (float32 run) as an upper bound
    fsdp2 = largest.get("fsdp2_devices2", {}).get("qat_int8", {})
    kept_fsdp2 = fsdp2.get("kept_extra_bytes_per_local_linear_weight", 0.0)
    qat_bytes = max(0.0, q["int8_recomputed_extra_bytes_per_weight"], kept_fsdp2)
    rss = fsdp2.get("extra_GiB_per_rank_vs_plain")
    qat_rss_bytes = None if rss is None else max(0.0, rss * GiB / (largest["parameters"] / 2))
    table = {}
    for name, params in (("7B", 6.74e9), ("70B", 69.0e9)):
        local = params / 8
        row = {
            "lora_base_bf16_GB": 2 * local / 1e9,
            "pruning_persistent_GB": 1.0 * local / 1e9,
            "pruning_persistent_previous_GB": 3.0 * local / 1e9,
            "pruning_transient_GB": sel["radix"]["transient_bytes_per_weight"] * local / 1e9,
            "pruning_transient_previous_GB": sel["previous"]["transient_bytes_per_weight"] * local / 1e9,
            # previous: each layer's fake-quantized copy (unsharded, bf16) held until backward
            "qat_GB": qat_bytes * local / 1e9,
            "qat_rss_upper_GB": None if qat_rss_bytes is None else qat_rss_bytes * local / 1e9,
            "qat_previous_GB": 2 * params / 1e9,
            "teacher_GB": 2 * local / 1e9,
            "teacher_previous_GB": 2 * params / 1e9,
        }
        row["all_fit_80GB"] = (
            row["lora_base_bf16_GB"]
            + row["pruning_persistent_GB"]
            + row["pruning_transient_GB"]
            + row["qat_GB"]
            + row["teacher_GB"]
        ) < 80
        if row["qat_rss_upper_GB"] is not None:
            row["all_fit_80GB_with_qat_rss"] = (
                row["lora_base_bf16_GB"]
                + row["pruning_persistent_GB"]
                + row["pruning_transient_GB"]
                + row["qat_rss_upper_GB"]
                + row["teacher_GB"]
            ) < 80
        row["all_previous_fit_80GB"] = (
            row["lora_base_bf16_GB"]
            + row["pruning_persistent_previous_GB"]
            + row["pruning_transient_previous_GB"]
            + row["qat_previous_GB"]
            + row["teacher_previous_GB"]
        ) < 80
        table[name] = row
    return table


def _fsdp2_sizes(value: str | None, sizes: list[str]) -> list[str]:
    """The sizes that get the FSDP2 fits: ``--fsdp2`` alone, the smallest size run; ``--fsdp2 A,B``,
    those."""
    if value is None:
        return []
    if value == "smallest":
        return [min(sizes, key=lambda s: SIZES[s][0] * SIZES[s][2])]
    chosen = value.split(",")
    unknown = [s for s in chosen if s not in sizes]
    if unknown:
        raise SystemExit(f"bench_memory: --fsdp2 sizes {unknown} are not among --sizes {sizes}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="20M,100M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument(
        "--fsdp2",
        nargs="?",
        const="smallest",
        help="also the 2-process FSDP2 fits: at the smallest size run, or at the sizes given (20M,400M)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "results" / "memory.json", help="results file (merged into)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    if args.one:
        print(json.dumps(one_size(args.one, reps, args.fsdp2 is not None)))
        return
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"bench_memory: unknown --sizes {unknown}; known: {', '.join(SIZES)}")
    with_fsdp2 = _fsdp2_sizes(args.fsdp2, sizes)
    command = "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = args.out
    # Sizes not run now keep their earlier results (each size says when and how it was measured).
    earlier = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for size in sizes:
        cmd = [sys.executable, __file__, "--one", size, *(["--fsdp2"] if size in with_fsdp2 else [])]
        cmd += ["--quick"] if args.quick else []
        begin = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=6 * 3600)
        if proc.returncode:
            raise RuntimeError(f"bench_memory: {size} failed (exit {proc.returncode}); see its output above")
        results[size] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[size]["measured"] = {"command": command, "date": date, "wall_s": time.perf_counter() - begin}
        print(size, json.dumps(results[size]), flush=True)
    for size, result in earlier.get("sizes", {}).items():
        if size not in results and size in SIZES:
            result.setdefault("measured", {"command": earlier.get("command"), "date": earlier.get("date")})
            results[size] = result
    results = dict(sorted(results.items(), key=lambda item: results[item[0]]["parameters"]))
    out = {
        "benchmark": "memory",
        "command": command,
        "date": date,
        "sizes": results,
        "extrapolation_8_gpus": extrapolation(results),
    }
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["extrapolation_8_gpus"], indent=2))
    print(f"[bench_memory] {','.join(sizes)} done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
