"""Serving an export over HTTP: ``lightning-shrink serve DIRECTORY`` or :func:`serve`.

The endpoint runs on LitServe (the ``serve`` extra: ``pip install "lightning-shrink[serve]"``).
``POST /predict`` takes ``{"text": [...]}`` (when the export has a tokenizer) or ``{"input_ids":
[[...]], "attention_mask": [[...]]}``, and answers with labels and probabilities for a sequence
classifier, or generated token ids (and text) for a causal LM (``"max_new_tokens"``); ``GET
/health`` says when it is ready. Modules: :mod:`.server` (:func:`serve`, argument checks),
:mod:`.api` (the LitAPI), :mod:`.requests` (request checks), :mod:`.model_info` (what an export is,
which backend runs it), :mod:`.backends` (PyTorch and ONNX Runtime).
"""

from __future__ import annotations

from typing import Any

from lightning_shrink.serve.model_info import ModelInfo, choose_backend, read_model_info
from lightning_shrink.serve.requests import Examples, Rejection, parse_request
from lightning_shrink.serve.server import check_serve_arguments, serve

__all__ = [
    "Examples",
    "ModelInfo",
    "Rejection",
    "ShrinkAPI",
    "check_serve_arguments",
    "choose_backend",
    "parse_request",
    "read_model_info",
    "serve",
]


def __getattr__(name: str) -> Any:
    # ShrinkAPI subclasses litserve.LitAPI: import LitServe only when it is asked for.
    if name == "ShrinkAPI":
        try:
            from lightning_shrink.serve.api import ShrinkAPI
        except ImportError as exc:
            if "litserve" not in str(exc):
                raise
            raise ImportError(
                'lightning_shrink.serve.ShrinkAPI needs LitServe: pip install "lightning-shrink[serve]"'
            ) from exc
        return ShrinkAPI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
