"""Serving benchmark: ``lightning-shrink serve`` under a bounded load on localhost (CPU).

Exports of all-MiniLM-L6-v2 as a 2-label sequence classifier, each with its tokenizer, each
served as docs/serving.md tells a user to serve it (``--variants`` picks some):

- *dense*: the FP32 model, ``export(model, dir)``; served by PyTorch (FP32);
- *compressed*: the same weights after ``prepare_qat`` (int8 per-channel weights, dynamic int8
  activations) and ``convert``, ``export(convert(model), dir)``: the int8 model a QAT run exports,
  served by PyTorch's x86 int8 kernels;
- *compressed-onnx*: the prepared model, ``export(model, dir, format="onnx")``: integer matrix
  products with the same scales, served by ONNX Runtime (the ``auto`` backend of a directory with
  ``model.onnx``);
- *dense-onnx*: the FP32 model, ``export(model, dir, format="onnx")``, served by ONNX Runtime, so
  that the ONNX Runtime int8 export is also compared with the dense model on the same runtime.

The benchmark does not train (no Trainer step): conversion alone sets what serving runs, and QAT
training changes the weights' values, not the arithmetic, so the speed is that of a trained QAT
export.

All are served at once by the real command (``python -m lightning_shrink.cli serve DIR --port N``,
one inference worker each, the default dynamic batching), on 127.0.0.1.
Load: ``--clients`` concurrent clients (threads with keep-alive connections) send ``{"text":
[snippet]}`` requests, one Rotten Tomatoes review snippet each (the demo's data, so demo-like
length), until ``--requests`` answers per server; rounds alternate between the two servers so that
a change of the shared machine's load hits both. Reported: throughput (answers per second of a
round's wall time, median of the rounds), p50 and p99 latency over all requests, and the ratio of
each served compressed export to the dense throughput (and of *compressed-onnx* to *dense-onnx*).
Every answer must be HTTP 200 with a label.

Usage::

    nice -n 10 python benchmarks/bench_serving.py [--quick] [--requests 500] [--clients 8]
        [--variants dense,compressed,compressed-onnx,dense-onnx]

Writes ``benchmarks/results/serving.json`` and prints a markdown section.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning_shrink as ls  # noqa: E402
from lightning_shrink.demo.data import load_data  # noqa: E402
from lightning_shrink.demo.measure import machine_info  # noqa: E402
from lightning_shrink.demo.model import MINILM, load_backbone, load_tokenizer  # noqa: E402
from lightning_shrink.quantization import prepare_qat  # noqa: E402

STARTUP_LIMIT_S = 600
ROUND_LIMIT_S = 600


VARIANTS = ("dense", "compressed", "compressed-onnx", "dense-onnx")
SERVED_BY = {
    "dense": "PyTorch FP32",
    "compressed": "PyTorch int8 (x86 kernels)",
    "compressed-onnx": "ONNX Runtime, integer MatMul",
    "dense-onnx": "ONNX Runtime FP32",
}


def build_exports(root: Path, variants: list[str]) -> dict[str, Path]:
    tokenizer = load_tokenizer(MINILM)
    dense = load_backbone(MINILM, num_labels=2).eval()
    prepared = copy.deepcopy(dense)
    prepare_qat(prepared)
    out = {}
    for name in variants:
        if name == "dense":
            ls.export(dense, root / name, tokenizer=tokenizer)
        elif name == "compressed":
            ls.export(ls.convert(copy.deepcopy(prepared)), root / name, tokenizer=tokenizer)
        elif name == "compressed-onnx":
            ls.export(prepared, root / name, format="onnx", tokenizer=tokenizer)
        else:
            ls.export(dense, root / name, format="onnx", tokenizer=tokenizer)
        out[name] = root / name
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(directory: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_shrink.cli", "serve", str(directory), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy within {STARTUP_LIMIT_S} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def load_round(port: int, texts: list[str], count: int, clients: int) -> tuple[float, list[float]]:
    """``count`` requests from ``clients`` threads; returns the wall time and each latency."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(count))
    deadline = time.monotonic() + ROUND_LIMIT_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            body = json.dumps({"text": [texts[i % len(texts)]]})
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - t0
            with lock:
                if response.status != 200 or "label" not in json.loads(payload)["predictions"][0]:
                    errors.append(f"{response.status}: {payload[:200]!r}")
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors or len(latencies) != count:
        raise RuntimeError(f"{len(errors)} failed answers, {len(latencies)}/{count} answered: {errors[:3]}")
    return wall, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 requests per server")
    parser.add_argument("--requests", type=int, default=500, help="answers per server (default: 500)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per server (default: 4)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if "dense" not in variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must include dense and name only {', '.join(VARIANTS)}")
    requests = 100 if args.quick else args.requests
    rounds = 2 if args.quick else args.rounds
    per_round = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    texts = [ex.text for ex in load_data(None, seed=0, verbose=False).test[:400]]
    tokenizer = load_tokenizer(MINILM)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    load_average = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exports = build_exports(root, variants)
        sizes = {name: sum(p.stat().st_size for p in d.iterdir()) for name, d in exports.items()}
        servers: dict[str, tuple[subprocess.Popen, int, Path]] = {}
        wall: dict[str, list[float]] = {name: [] for name in exports}
        latencies: dict[str, list[float]] = {name: [] for name in exports}
        t_start = time.perf_counter()
        try:
            for name, directory in exports.items():
                port = free_port()
                servers[name] = (start(directory, port, root / f"{name}.log"), port, root / f"{name}.log")
            for process, port, log in servers.values():
                wait_healthy(process, port, log)
            startup = time.perf_counter() - t_start
            for _, port, _ in servers.values():  # warm-up: first batches, allocator, caches
                load_round(port, texts[::-1], 4 * args.clients, args.clients)
            for r, count in enumerate(per_round):
                order = list(exports)[r % len(exports) :] + list(exports)[: r % len(exports)]
                for name in order:
                    seconds, lat = load_round(servers[name][1], texts, count, args.clients)
                    wall[name].append(count / seconds)
                    latencies[name].extend(lat)
                    print(f"round {r} {name}: {count} answers in {seconds:.1f} s", flush=True)
        finally:
            for process, _, _ in servers.values():
                stop(process)

    throughput = {name: statistics.median(v) for name, v in wall.items()}
    ratios = {
        f"{name}_over_dense": round(throughput[name] / throughput["dense"], 3)
        for name in throughput
        if name != "dense"
    }
    if "compressed-onnx" in throughput and "dense-onnx" in throughput:
        ratios["compressed-onnx_over_dense-onnx"] = round(
            throughput["compressed-onnx"] / throughput["dense-onnx"], 3
        )
    compressed = [n for n in ("compressed", "compressed-onnx") if n in throughput]
    best = max(compressed, key=throughput.__getitem__) if compressed else None
    results: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (sequence classification head, 2 labels)",
        "compressed": "prepare_qat (int8 weights, dynamic int8 activations) + convert, no training steps",
        "served_by": {name: SERVED_BY[name] for name in exports},
        "quick": args.quick,
        "requests_per_server": requests,
        "clients": args.clients,
        "rounds": rounds,
        "request": '{"text": [one Rotten Tomatoes test snippet]}',
        "tokens_per_request_median": statistics.median(lengths),
        "tokens_per_request_max": max(lengths),
        "server": "lightning-shrink serve DIR: the defaults (1 worker, --max-batch-size 8, --batch-timeout "
        "0.005, --backend auto)",
        "load_average_at_start": round(load_average, 2),
        "startup_seconds_all_servers": round(startup, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "export_bytes": sizes,
        "throughput_requests_per_second": {k: round(v, 2) for k, v in throughput.items()},
        "throughput_rounds": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "latency_p50_ms": {k: round(1000 * percentile(v, 0.5), 1) for k, v in latencies.items()},
        "latency_p99_ms": {k: round(1000 * percentile(v, 0.99), 1) for k, v in latencies.items()},
        "throughput_ratios": ratios,
        "best_compressed": best,
        # The goal's number: the faster way of serving the compressed model, over the dense export.
        "throughput_ratio_compressed_over_dense": ratios[f"{best}_over_dense"] if best else None,
        "machine": machine_info(),
        "command": " ".join(["python benchmarks/bench_serving.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = ROOT / "results" / "serving.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n## serving\n")
    names = list(exports)
    print("| | " + " | ".join(f"{n} ({SERVED_BY[n]})" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    print("| throughput (req/s) | " + " | ".join(f"{throughput[n]:.1f}" for n in names) + " |")
    for key in ("latency_p50_ms", "latency_p99_ms"):
        print(f"| {key} | " + " | ".join(str(results[key][n]) for n in names) + " |")
    print()
    for key, value in ratios.items():
        print(f"throughput {key.replace('_over_', ' / ')}: {value:.2f}x")
    print(f"wall time {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
