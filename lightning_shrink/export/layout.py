"""The names of an export directory's files and the format it declares."""

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "TRANSFORMERS_CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT = "lightning-shrink"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "shrink_config.json"
TRANSFORMERS_CONFIG_NAME = "config.json"
