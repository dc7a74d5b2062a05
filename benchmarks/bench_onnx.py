"""ONNX Runtime benchmark on all-MiniLM-L6-v2 (CPU): our QAT export vs ONNX Runtime's own
post-training ``quantize_dynamic``.

Fine-tunes MiniLM on the demo task (Rotten Tomatoes, split by movie: 10,231 training and 2,577
test snippets) twice with the same budget and seed: plainly (FP32) and with
``QuantizationAwareTraining``. The default budget is 300 steps of batch 16 (about half an epoch,
learning rate 5e-5): the test split's majority class scores 0.563, at which every runtime stood
after the earlier default of 60 steps; the demo's quick preset reaches 0.74 dense after 96 steps,
the accuracy benchmark's teacher 0.78 after 600, so QAT vs PTQ is read off a model that has learnt
the task. Then, in one process:

- batch-1 CPU latency (``--tokens`` tokens), interleaved repetitions (the order of the runtimes
  rotates at each repetition), medians, of
  (a) ONNX Runtime on ``export(qat_model, format="onnx")``,
  (b) ONNX Runtime on ``onnxruntime.quantization.quantize_dynamic`` of the FP32 model's ONNX export
      (the post-training peer, default settings, int8 weights),
  (c) our PyTorch int8 model (``convert(qat_model)``),
  (d) ONNX Runtime on the FP32 ONNX export;
- test-split accuracy of (a), (b), (d) and (c) on the whole test split.

Every runtime gets the same ``--threads``: ``torch.set_num_threads`` for PyTorch,
``intra_op_num_threads`` for each ONNX Runtime session, whose worker threads are told not to spin
(``session.intra_op.allow_spinning = 0``). By default ONNX Runtime's threads keep spinning for a
while after each run; measured side by side in one process, they then hold the cores while the
next runtime runs: our PyTorch int8 model took 76.8 ms at batch 1 behind three spinning sessions,
against 12-17 ms alone.

Usage::

    nice -n 10 python benchmarks/bench_onnx.py [--steps 300] [--train N] [--test N] [--threads 2]

Writes ``benchmarks/results/onnx.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning_shrink as ls  # noqa: E402
from lightning_shrink.demo.data import load_data  # noqa: E402
from lightning_shrink.demo.datamodule import make_dataloader  # noqa: E402
from lightning_shrink.demo.measure import machine_info  # noqa: E402
from lightning_shrink.demo.model import SequenceClassifier, load_tokenizer  # noqa: E402
from lightning_shrink.testing.models import cpu_trainer  # noqa: E402


def fine_tune(train_loader, steps: int, qat: bool) -> SequenceClassifier:
    torch.manual_seed(0)
    module = SequenceClassifier("minilm", num_labels=2, lr=5e-5)
    callbacks = [ls.QuantizationAwareTraining()] if qat else []
    cpu_trainer(max_steps=steps, callbacks=callbacks, deterministic=False).fit(module, train_loader)
    return module.eval()


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads would hold the cores after a run, while the next runtime is timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(sess, batch: dict[str, torch.Tensor]) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return sess.run(["logits"], {n: batch[n].numpy() for n in names})[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train", type=int, default=None, help="training snippets (default: all)")
    parser.add_argument("--test", type=int, default=None, help="test snippets (default: all)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="8 steps, 128 training and 64 test snippets, 10 repetitions"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train, args.test, args.repeats = 8, 128, 64, 10
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    data = load_data(None, verbose=False).subsample(args.train, args.test, seed=0)
    tokenizer = load_tokenizer("minilm")
    train = make_dataloader(data.train, tokenizer, args.batch_size, 64, shuffle=True, seed=0)
    test = make_dataloader(data.test, tokenizer, 32, 64)
    fp32 = fine_tune(train, args.steps, qat=False)
    qat = fine_tune(train, args.steps, qat=True)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    qat_dir = ls.export(qat, work / "qat", format="onnx", tokenizer=tokenizer)
    fp32_dir = ls.export(fp32, work / "fp32", format="onnx", tokenizer=tokenizer)
    ptq_path = work / "ptq.onnx"
    quantize_dynamic(str(fp32_dir / "model.onnx"), str(ptq_path), weight_type=QuantType.QInt8)
    int8 = ls.convert(qat.model).eval()
    runtimes = {
        "ORT, our QAT export": session(qat_dir / "model.onnx", args.threads),
        "ORT, quantize_dynamic (PTQ) of FP32": session(ptq_path, args.threads),
        "PyTorch int8 (convert)": int8,
        "ORT, FP32": session(fp32_dir / "model.onnx", args.threads),
    }
    sizes = {
        "ORT, our QAT export": (qat_dir / "model.onnx").stat().st_size,
        "ORT, quantize_dynamic (PTQ) of FP32": ptq_path.stat().st_size,
        "PyTorch int8 (convert)": (ls.export(qat, work / "hf") / "model.safetensors").stat().st_size,
        "ORT, FP32": (fp32_dir / "model.onnx").stat().st_size,
    }

    def run(name: str, batch: dict[str, torch.Tensor]) -> np.ndarray:
        rt = runtimes[name]
        if isinstance(rt, torch.nn.Module):
            with torch.inference_mode():
                return rt(**{k: v for k, v in batch.items() if k != "labels"}).logits.numpy()
        return ort_logits(rt, batch)

    accuracy = {}
    for name in runtimes:
        correct = total = 0
        for batch in test:
            predicted = run(name, batch).argmax(-1)
            correct += int((torch.from_numpy(predicted) == batch["labels"]).sum())
            total += len(batch["labels"])
        accuracy[name] = correct / total
    test_labels = [ex.label for ex in data.test]
    majority = max(test_labels.count(c) for c in set(test_labels)) / len(test_labels)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (1, args.tokens), generator=g)
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for name in runtimes:  # warm-up
        for _ in range(5):
            run(name, one)
    names = list(runtimes)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            run(name, one)
            times[name].append(time.perf_counter() - start)
    latency = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    results = {
        "command": " ".join(["python benchmarks/bench_onnx.py", *sys.argv[1:]]),
        "args": vars(args),
        "machine": machine_info(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ort_intra_op_spinning": False,
        "latency_ms": latency,
        "latency_ratio_qat_export_over_ptq": latency["ORT, our QAT export"]
        / latency["ORT, quantize_dynamic (PTQ) of FP32"],
        "accuracy_points_qat_minus_ptq": 100
        * (accuracy["ORT, our QAT export"] - accuracy["ORT, quantize_dynamic (PTQ) of FP32"]),
        "accuracy": accuracy,
        "bytes": sizes,
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "test_majority_class_accuracy": majority,
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    out = ROOT / "results" / "onnx.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    fp32_ms = latency["ORT, FP32"]
    print(
        f"| runtime (batch 1 x {args.tokens} tokens) | median latency | vs ORT FP32 | test accuracy | file |"
    )
    print("|---|---|---|---|---|")
    for name in runtimes:
        print(
            f"| {name} | {latency[name]:.2f} ms | {fp32_ms / latency[name]:.2f}x | {accuracy[name]:.3f} | "
            f"{sizes[name] / 1e6:.1f} MB |"
        )
    print(
        f"\n{len(data.train)} training / {len(data.test)} test snippets, {args.steps} steps; majority class "
        f"{majority:.3f}; wall time {results['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
