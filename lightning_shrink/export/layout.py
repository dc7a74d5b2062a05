"""The names of an export directory's files, the format it declares, and how its JSON files are read."""

import json
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "ONNX_FORMAT",
    "ONNX_NAME",
    "TRANSFORMERS_CONFIG_NAME",
    "WEIGHTS_NAME",
    "read_json",
]

FORMAT = "lightning-shrink"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "shrink_config.json"
TRANSFORMERS_CONFIG_NAME = "config.json"
#: The ``format`` values of :func:`lightning_shrink.export`.
FORMATS = ("hf", "native", "onnx")
#: ``format`` of ``shrink_config.json`` in an ONNX export, and its model file.
ONNX_FORMAT = "lightning-shrink-onnx"
ONNX_NAME = "model.onnx"


def read_json(path: Path, owner: str) -> Any:
    """The JSON value in ``path`` (UTF-8).

    Raises:
        ValueError: the file is not valid JSON (``"<owner>: '<path>' is not valid JSON: ..."``).
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{owner}: {str(path)!r} is not valid JSON: {exc}") from exc
