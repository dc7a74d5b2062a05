"""Serving benchmark: ``lightning-shrink serve`` under a bounded load on localhost (CPU).

Two exports of all-MiniLM-L6-v2 as a 2-label sequence classifier, each with its tokenizer:

- *dense*: the FP32 model, exported as it is;
- *compressed*: the same weights after ``prepare_qat`` (int8 per-channel weights, dynamic int8
  activations) and ``convert``, i.e. the int8 model a QAT run exports. The benchmark does not
  train (no Trainer step): conversion alone sets what serving runs, and QAT training changes the
  weights' values, not the arithmetic, so the speed is that of a trained QAT export.

Both are served at once by the real command (``python -m lightning_shrink.cli serve DIR --port N``,
one inference worker each, the default dynamic batching: up to 8 requests, 5 ms), on 127.0.0.1.
Load: ``--clients`` concurrent clients (threads with keep-alive connections) send ``{"text":
[snippet]}`` requests, one Rotten Tomatoes review snippet each (the demo's data, so demo-like
length), until ``--requests`` answers per server; rounds alternate between the two servers so that
a change of the shared machine's load hits both. Reported: throughput (answers per second of a
round's wall time, median of the rounds), p50 and p99 latency over all requests, and the ratio of
the compressed to the dense throughput. Every answer must be HTTP 200 with a label.

Usage::

    nice -n 10 python benchmarks/bench_serving.py [--quick] [--requests 500] [--clients 8]

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


def build_exports(root: Path) -> dict[str, Path]:
    tokenizer = load_tokenizer(MINILM)
    dense = load_backbone(MINILM, num_labels=2).eval()
    compressed = copy.deepcopy(dense)
    prepare_qat(compressed)
    compressed = ls.convert(compressed)
    out = {}
    for name, model in (("dense", dense), ("compressed", compressed)):
        ls.export(model, root / name)
        tokenizer.save_pretrained(root / name)
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
    args = parser.parse_args(argv)
    requests = 100 if args.quick else args.requests
    rounds = 2 if args.quick else args.rounds
    per_round = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    texts = [ex.text for ex in load_data(None, seed=0, verbose=False).test[:400]]
    tokenizer = load_tokenizer(MINILM)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    load_average = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exports = build_exports(root)
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
                order = list(exports) if r % 2 == 0 else list(exports)[::-1]
                for name in order:
                    seconds, lat = load_round(servers[name][1], texts, count, args.clients)
                    wall[name].append(count / seconds)
                    latencies[name].extend(lat)
                    print(f"round {r} {name}: {count} answers in {seconds:.1f} s", flush=True)
        finally:
            for process, _, _ in servers.values():
                stop(process)

    throughput = {name: statistics.median(v) for name, v in wall.items()}
    results: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (sequence classification head, 2 labels)",
        "compressed": "prepare_qat (int8 weights, dynamic int8 activations) + convert, no training steps",
        "quick": args.quick,
        "requests_per_server": requests,
        "clients": args.clients,
        "rounds": rounds,
        "request": '{"text": [one Rotten Tomatoes test snippet]}',
        "tokens_per_request_median": statistics.median(lengths),
        "tokens_per_request_max": max(lengths),
        "server": "lightning-shrink serve DIR: 1 worker, --max-batch-size 8, --batch-timeout 0.005, torch",
        "load_average_at_start": round(load_average, 2),
        "startup_seconds_both_servers": round(startup, 1),
        "export_bytes": sizes,
        "throughput_requests_per_second": {k: round(v, 2) for k, v in throughput.items()},
        "throughput_rounds": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "latency_p50_ms": {k: round(1000 * percentile(v, 0.5), 1) for k, v in latencies.items()},
        "latency_p99_ms": {k: round(1000 * percentile(v, 0.99), 1) for k, v in latencies.items()},
        "throughput_ratio_compressed_over_dense": round(throughput["compressed"] / throughput["dense"], 3),
        "machine": machine_info(),
    }
    out = ROOT / "results" / "serving.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n## serving\n")
    print("| | dense (FP32) | compressed (int8) |\n|---|---|---|")
    print(f"| throughput (req/s) | {throughput['dense']:.1f} | {throughput['compressed']:.1f} |")
    for key in ("latency_p50_ms", "latency_p99_ms"):
        print(f"| {key} | {results[key]['dense']} | {results[key]['compressed']} |")
    print(f"\ncompressed / dense throughput: {results['throughput_ratio_compressed_over_dense']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
