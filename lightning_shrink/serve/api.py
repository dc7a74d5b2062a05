"""The LitServe API of an export: :class:`ShrinkAPI` (``decode_request`` -> ``batch`` -> ``predict``
-> ``unbatch`` -> ``encode_response``, run in each inference worker)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from starlette.responses import JSONResponse

from lightning_shrink.serve.backends import make_backend
from lightning_shrink.serve.model_info import (
    CAUSAL_LM,
    choose_backend,
    has_tokenizer,
    read_model_info,
)
from lightning_shrink.serve.requests import Examples, Rejection, parse_request

__all__ = ["ShrinkAPI"]

#: Sequences run through the model at once; a larger batch of requests is run in chunks.
CHUNK = 64


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class ShrinkAPI(ls.LitAPI):
    """Serves one export directory: a sequence classifier (labels with probabilities) or a causal
    language model (greedily generated token ids, and text when the export has a tokenizer).

    Each request is checked on its own (:func:`~lightning_shrink.serve.requests.parse_request`): a
    bad request is answered with a 4xx whose ``detail`` names the field, and never fails the other
    requests of its batch or the worker. Requests batched together are padded to their longest
    sequence (right padding for classifiers, left padding for generation) with attention masks, so
    an answer does not depend on the requests it was batched with.

    Args:
        directory: The export (``lightning_shrink.export``; ``model.onnx`` for ONNX Runtime).
        backend: ``"auto"``, ``"torch"`` or ``"onnx"`` (see
            :func:`~lightning_shrink.serve.model_info.choose_backend`).
        workers: Inference workers that will share the CPU cores (each gets ``cores // workers``
            threads).
        max_batch_size: Most requests run as one batch (LitServe's dynamic batching).
        batch_timeout: Seconds a worker waits to fill a batch.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        backend: str = "auto",
        workers: int = 1,
        max_batch_size: int = 8,
        batch_timeout: float = 0.005,
    ) -> None:
        path = Path(directory)
        self.directory = str(path)
        self.backend_name = choose_backend(path, backend)
        self.info = read_model_info(path)
        self.with_tokenizer = has_tokenizer(path)
        self.threads = max(1, _cpu_count() // workers)
        with warnings.catch_warnings():
            # batch/unbatch are always defined; with max_batch_size=1 LitServe simply does not call them.
            warnings.filterwarnings("ignore", message=".*batch and unbatch methods implemented.*")
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)

    def setup(self, device: str) -> None:
        """Load the tokenizer (local files only) and the model on the chosen backend."""
        self.tokenizer = None
        if self.with_tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        self.runtime = make_backend(self.directory, self.backend_name, self.info, self.threads)

    def decode_request(self, request: dict) -> Examples | Rejection:
        """The request's token sequences, or a :class:`Rejection` naming the bad field."""
        return parse_request(request, self.info, self.tokenizer)

    def batch(self, inputs: list[Examples | Rejection]) -> list[Examples | Rejection]:
        """Keep the requests apart: they are padded together in :meth:`predict`."""
        return list(inputs)

    def predict(self, x: Any) -> Any:
        """Answer a batch of requests (or one, without batching) with one padded model run per chunk."""
        if isinstance(x, list):
            return self._answer(x)
        return self._answer([x])[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        """One answer per request."""
        return list(output)

    def encode_response(self, output: Any) -> Any:
        """The answer as JSON; a rejection as its 4xx with ``{"detail": ..., "field": ...}``."""
        if isinstance(output, Rejection):
            return JSONResponse(
                status_code=output.status, content={"detail": output.detail, "field": output.field}
            )
        return output

    # The model runs.

    def _answer(self, requests: list[Examples | Rejection]) -> list[Any]:
        rows = [(i, seq) for i, r in enumerate(requests) if isinstance(r, Examples) for seq in r.sequences]
        if self.info.task == CAUSAL_LM:
            results = self._generate(rows, requests)
        else:
            results = self._classify([seq for _, seq in rows])
        answers: list[Any] = [r if isinstance(r, Rejection) else [] for r in requests]
        for (i, _), result in zip(rows, results, strict=True):
            answers[i].append(result)
        key = "generations" if self.info.task == CAUSAL_LM else "predictions"
        return [a if isinstance(a, Rejection) else {key: a} for a in answers]

    def _padded(self, sequences: list[tuple[int, ...]], left: bool) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.info.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span] = seq
            mask[row, span] = 1
        return ids, mask

    def _classify(self, sequences: list[tuple[int, ...]]) -> list[dict[str, Any]]:
        out = []
        for start in range(0, len(sequences), CHUNK):
            probs = _softmax(self.runtime.logits(*self._padded(sequences[start : start + CHUNK], left=False)))
            labels = self.info.labels
            if len(labels) != probs.shape[-1]:
                labels = tuple(f"LABEL_{i}" for i in range(probs.shape[-1]))
            for p in probs:
                best = int(p.argmax())
                out.append(
                    {
                        "label": labels[best],
                        "score": float(p[best]),
                        "probabilities": {label: float(v) for label, v in zip(labels, p, strict=True)},
                    }
                )
        return out

    def _generate(
        self, rows: list[tuple[int, tuple[int, ...]]], requests: list[Examples | Rejection]
    ) -> list[dict[str, Any]]:
        eos = set(self.info.eos_token_ids)
        out = []
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            wanted = [requests[i].max_new_tokens for i, _ in chunk]  # type: ignore[union-attr]
            new = self.runtime.generate(*self._padded([s for _, s in chunk], left=True), max(wanted))
            for tokens, limit in zip(new.tolist(), wanted, strict=True):
                ids = []
                for token in tokens[:limit]:
                    ids.append(int(token))
                    if token in eos:
                        break
                result: dict[str, Any] = {"token_ids": ids}
                if self.tokenizer is not None:
                    result["text"] = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(result)
        return out
