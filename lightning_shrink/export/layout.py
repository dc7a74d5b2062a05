"""The names of an export directory's files and the format it declares."""

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "ONNX_FORMAT",
    "ONNX_NAME",
    "TRANSFORMERS_CONFIG_NAME",
    "WEIGHTS_NAME",
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
