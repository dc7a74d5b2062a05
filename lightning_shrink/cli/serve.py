"""``lightning-shrink serve DIRECTORY``: the command line of :func:`lightning_shrink.serve.serve`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["run_serve_command", "serve_parser"]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-shrink serve",
        description=(
            'Serve an export over HTTP on LitServe: POST /predict with {"text": [...]} (when the export '
            'has a tokenizer) or {"input_ids": [[...]], "attention_mask": [[...]]}; GET /health.'
        ),
    )
    parser.add_argument("directory", metavar="DIRECTORY", help="an export (lightning_shrink.export)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 1024-65535 (default: %(default)s)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="127.0.0.1 (this machine only), 0.0.0.0 or :: (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="inference worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="most requests per batch; 1 turns batching off (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.005,
        help="seconds to wait for a batch to fill (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto (ONNX Runtime when DIRECTORY has model.onnx, else PyTorch), torch or onnx "
        "(default: %(default)s)",
    )
    return parser


def run_serve_command(args: Sequence[str]) -> int:
    """``lightning-shrink serve DIRECTORY [options]``; exits with status 2 and a message naming the
    argument on bad input, before anything starts."""
    from lightning_shrink.serve.server import check_serve_arguments, serve

    parser = serve_parser()
    ns = parser.parse_args(args)
    owner = "lightning-shrink serve"
    try:
        check_serve_arguments(
            ns.directory,
            ns.port,
            ns.host,
            ns.workers,
            ns.max_batch_size,
            ns.batch_timeout,
            ns.backend,
            owner=owner,
            spell=lambda name: "DIRECTORY" if name == "directory" else "--" + name.replace("_", "-"),
        )
    except (TypeError, ValueError) as exc:
        parser.exit(2, f"{owner}: error: {str(exc).removeprefix(owner + ': ')}\n")
    try:
        serve(
            ns.directory,
            port=ns.port,
            host=ns.host,
            workers=ns.workers,
            max_batch_size=ns.max_batch_size,
            batch_timeout=ns.batch_timeout,
            backend=ns.backend,
        )
    except ImportError as exc:
        print(f"{owner}: error: {exc}", file=sys.stderr)
        return 1
    return 0
