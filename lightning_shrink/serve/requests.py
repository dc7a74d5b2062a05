"""What ``POST /predict`` accepts: a request body checked field by field into token sequences, or a
:class:`Rejection` that names the field (answered with a 4xx, never an exception in the worker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_shrink.serve.model_info import CAUSAL_LM, ModelInfo

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Examples", "Rejection", "parse_request"]

#: Tokens generated for a causal LM when the request does not give ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Rejection:
    """A request that cannot be answered: HTTP ``status`` with ``detail`` naming ``field``."""

    field: str
    detail: str
    status: int = 422


@dataclass(frozen=True)
class Examples:
    """The token ids of each example of one request (unpadded), and its generation length."""

    sequences: tuple[tuple[int, ...], ...]
    max_new_tokens: int | None = None


def _reject(field: str, message: str) -> Rejection:
    return Rejection(field, f"`{field}` {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int_rows(field: str, value: Any) -> list[list[int]] | Rejection:
    """``value`` as a non-empty rectangular list of non-empty lists of ints."""
    if not isinstance(value, list):
        return _reject(field, f"must be a list of lists of token ids, got {_type_name(value)}")
    if not value:
        return _reject(field, "must not be empty")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            return _reject(field, f"must be a list of lists of token ids; row {i} is {_type_name(row)}")
        if not row:
            return _reject(field, f"row {i} is empty")
        for j, item in enumerate(row):
            if not isinstance(item, int) or isinstance(item, bool):
                return _reject(field, f"must hold ints; [{i}][{j}] is {_type_name(item)} {item!r}")
    lengths = {len(row) for row in value}
    if len(lengths) > 1:
        return _reject(
            field,
            f"is ragged: its rows have lengths {sorted(lengths)}; pad them to one length and mark the "
            "padding with `attention_mask`",
        )
    return value


def _unpadded(ids: list[list[int]], mask: list[list[int]] | None) -> list[tuple[int, ...]] | Rejection:
    if mask is None:
        return [tuple(row) for row in ids]
    if len(mask) != len(ids) or len(mask[0]) != len(ids[0]):
        return _reject(
            "attention_mask",
            f"must have the shape of `input_ids` ({len(ids)}x{len(ids[0])}), got {len(mask)}x{len(mask[0])}",
        )
    sequences = []
    for i, (row, bits) in enumerate(zip(ids, mask, strict=True)):
        if any(b not in (0, 1) for b in bits):
            return _reject("attention_mask", f"must hold only 0 and 1; row {i} is {bits}")
        ones = [j for j, b in enumerate(bits) if b == 1]
        if not ones:
            return _reject("attention_mask", f"row {i} masks every token")
        if ones[-1] - ones[0] + 1 != len(ones):
            return _reject(
                "attention_mask", f"row {i} must be one run of 1s (left or right padding), got {bits}"
            )
        sequences.append(tuple(row[ones[0] : ones[-1] + 1]))
    return sequences


def parse_request(body: Any, info: ModelInfo, tokenizer: Any | None) -> Examples | Rejection:
    """Check a request body against the model and turn it into token sequences.

    Accepted bodies: ``{"text": [str, ...]}`` (with a tokenizer) or ``{"input_ids": [[int, ...], ...],
    "attention_mask": [[0|1, ...], ...]}`` (the mask optional; each row's 1s one run, so left and
    right padding both work), plus ``"max_new_tokens": int`` for a causal LM. Every field is checked:
    an unknown or missing field, a wrong type, an empty list, ragged rows, a token id outside the
    vocabulary or a sequence longer than the model's positions is a :class:`Rejection` naming it.
    """
    if not isinstance(body, dict):
        return Rejection("body", f"the request body must be a JSON object, got {_type_name(body)}")
    allowed = ["text", "input_ids", "attention_mask"] + (["max_new_tokens"] if info.task == CAUSAL_LM else [])
    unknown = [key for key in body if key not in allowed]
    if unknown:
        return Rejection(
            unknown[0],
            f"unknown field(s) {', '.join(f'`{k}`' for k in unknown)}; this endpoint accepts "
            f"{', '.join(f'`{k}`' for k in allowed)}",
        )
    if ("text" in body) == ("input_ids" in body):
        return Rejection(
            "text",
            "give exactly one of `text` (a list of strings) or `input_ids` (a list of lists of token ids)",
        )
    max_new_tokens = None
    if info.task == CAUSAL_LM:
        max_new_tokens = body.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            return _reject("max_new_tokens", f"must be an int, got {_type_name(max_new_tokens)}")
        if not 1 <= max_new_tokens < info.max_positions:
            return _reject(
                "max_new_tokens", f"must be in [1, {info.max_positions - 1}], got {max_new_tokens}"
            )
    if "text" in body:
        if "attention_mask" in body:
            return _reject("attention_mask", "goes with `input_ids`, not with `text`")
        if tokenizer is None:
            return _reject(
                "text",
                "cannot be used: this export has no tokenizer; send `input_ids` (and `attention_mask`)",
            )
        texts = body["text"]
        if not isinstance(texts, list):
            return _reject("text", f"must be a list of strings, got {_type_name(texts)}")
        if not texts:
            return _reject("text", "must not be empty")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                return _reject("text", f"must hold strings; item {i} is {_type_name(text)}")
        sequences = [tuple(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
        field = "text"
    else:
        ids = _int_rows("input_ids", body["input_ids"])
        if isinstance(ids, Rejection):
            return ids
        mask = None
        if "attention_mask" in body:
            mask = _int_rows("attention_mask", body["attention_mask"])
            if isinstance(mask, Rejection):
                return mask
        unpadded = _unpadded(ids, mask)
        if isinstance(unpadded, Rejection):
            return unpadded
        for i, row in enumerate(unpadded):
            bad = [t for t in row if not 0 <= t < info.vocab_size]
            if bad:
                return _reject(
                    "input_ids", f"row {i} holds {bad[0]}, outside the vocabulary [0, {info.vocab_size})"
                )
        sequences = unpadded
        field = "input_ids"
    room = info.max_positions - (max_new_tokens or 0)
    for i, row in enumerate(sequences):
        if not row:
            return _reject(field, f"item {i} has no tokens")
        if len(row) > room:
            plus = f" plus {max_new_tokens} new tokens" if max_new_tokens else ""
            return _reject(
                field,
                f"item {i} is {len(row)} tokens long{plus}: more than the model's "
                f"{info.max_positions} positions",
            )
    return Examples(tuple(sequences), max_new_tokens)
