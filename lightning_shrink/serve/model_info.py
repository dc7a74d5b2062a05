"""What the endpoint needs to know about an export before loading it: the task (classifier or causal
LM), the vocabulary and position limits, the labels, the special tokens, whether it has a
tokenizer, and which backend runs it. Read from the directory's JSON files only (no code runs)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_shrink.export.layout import read_json

__all__ = [
    "BACKENDS",
    "CAUSAL_LM",
    "CLASSIFIER",
    "ONNX_NAME",
    "ModelInfo",
    "choose_backend",
    "has_tokenizer",
    "is_export",
    "read_model_info",
]

CLASSIFIER = "classifier"
CAUSAL_LM = "causal-lm"
#: The ``--backend`` choices.
BACKENDS = ("auto", "torch", "onnx")
#: The file an ONNX export holds; its presence makes ``--backend auto`` choose ONNX Runtime.
ONNX_NAME = "model.onnx"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
# The config fields transformers models use for their number of positions, in order of preference.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds an export this endpoint can serve: a lightning-shrink export
    (``shrink_config.json``), a Hugging Face style directory (``config.json``) or an ONNX export."""
    from lightning_shrink.export.layout import CONFIG_NAME, TRANSFORMERS_CONFIG_NAME

    return directory.is_dir() and any(
        (directory / name).is_file() for name in (CONFIG_NAME, TRANSFORMERS_CONFIG_NAME, ONNX_NAME)
    )


def choose_backend(directory: str | os.PathLike[str], backend: str = "auto") -> str:
    """The backend that runs ``directory``: ``"onnx"`` (ONNX Runtime on ``model.onnx``) or
    ``"torch"`` (the model of :func:`lightning_shrink.load`).

    ``"auto"`` picks ONNX Runtime when the directory holds ``model.onnx``, else PyTorch.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`, or is ``"onnx"`` for a directory
            without ``model.onnx``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"serve: `backend` must be one of {list(BACKENDS)}, got {backend!r}")
    has_onnx = (Path(directory) / ONNX_NAME).is_file()
    if backend == "auto":
        return "onnx" if has_onnx else "torch"
    if backend == "onnx" and not has_onnx:
        raise ValueError(f"serve: `backend` is 'onnx' but {str(directory)!r} has no {ONNX_NAME}")
    return backend


def has_tokenizer(directory: Path) -> bool:
    """Whether the directory holds tokenizer files (``text`` requests are accepted then)."""
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a served model that requests are checked against."""

    task: str
    architecture: str
    vocab_size: int
    max_positions: int
    labels: tuple[str, ...] = ()
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _architecture(directory: Path, config: dict[str, Any]) -> str:
    """The model class: from ``shrink_config.json`` (a lightning-shrink export records it there),
    else the first of ``config.json``'s ``architectures``."""
    from lightning_shrink.export.layout import CONFIG_NAME

    try:
        recorded = json.loads((directory / CONFIG_NAME).read_text())["architecture"]["class"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if isinstance(recorded, str):
        return recorded
    architectures = config.get("architectures") or []
    return (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else ""
    )


def read_model_info(directory: str | os.PathLike[str]) -> ModelInfo:
    """The :class:`ModelInfo` of an export, from its ``config.json``.

    Raises:
        ValueError: no ``config.json`` (not a transformers export), an architecture that is neither
            a sequence classifier nor a causal LM, or a config without a vocabulary size or number of
            positions.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"serve: {str(directory)!r} has no config.json: the endpoint serves exports of transformers "
            "models (sequence classifiers and causal language models)"
        )
    config = read_json(path, "serve")
    if not isinstance(config, dict):
        raise ValueError(f"serve: {str(path)!r} must hold a JSON object")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    architecture = _architecture(Path(directory), config)
    if architecture.endswith("ForSequenceClassification"):
        task = CLASSIFIER
    elif architecture.endswith("ForCausalLM") or architecture.endswith("LMHeadModel"):
        task = CAUSAL_LM
    else:
        raise ValueError(
            f"serve: the export in {str(directory)!r} is a "
            f"{architecture or 'model without `architectures`'}; "
            "the endpoint serves sequence classifiers (*ForSequenceClassification) and causal language "
            "models (*ForCausalLM)"
        )
    vocab_size = text_config.get("vocab_size")
    positions = next((text_config[f] for f in _POSITION_FIELDS if isinstance(text_config.get(f), int)), None)
    if not isinstance(vocab_size, int) or positions is None:
        raise ValueError(
            f"serve: {str(path)!r} must give `vocab_size` and the number of positions "
            f"(one of {', '.join(_POSITION_FIELDS)})"
        )
    labels: tuple[str, ...] = ()
    if task == CLASSIFIER:
        id2label = config.get("id2label") or {}
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (AttributeError, ValueError) as exc:
            raise ValueError(f"serve: `id2label` in {str(path)!r} must map label ids to names") from exc
        count = config.get("num_labels") or len(by_id) or 2
        labels = tuple(by_id.get(i, f"LABEL_{i}") for i in range(count))
    eos = _ids(text_config.get("eos_token_id"))
    pad = _ids(text_config.get("pad_token_id"))
    return ModelInfo(
        task=task,
        architecture=architecture,
        vocab_size=vocab_size,
        max_positions=positions,
        labels=labels,
        pad_token_id=pad[0] if pad else (eos[0] if eos else 0),
        eos_token_ids=eos,
    )
