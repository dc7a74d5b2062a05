"""Conversion, export and loading of compressed models.

:func:`convert` turns a model trained with lightning-shrink callbacks into its inference form
(int8 layers); :func:`export` writes a model (prepared or converted) as a directory; :func:`load`
reads it back without the training code. All three go through the plugin hooks
``shrink_convert``, ``shrink_export``, ``shrink_load`` and ``shrink_load_model``, so third-party
plugins can add their own encodings.

:func:`export` writes transformers models in the Hugging Face-native format by default
(:mod:`~lightning_shrink.export.hf`: compressed-tensors, read by ``from_pretrained`` without
lightning-shrink), ONNX on request (:mod:`~lightning_shrink.export.onnx`), and everything else in
the native format; :func:`load` reads the Hugging Face-native and the native directories
(:mod:`~lightning_shrink.export.hf_load`). A native export directory holds:

``model.safetensors``
    The encoded tensors (int8 weights and their scales, sparse encodings, float tensors).
``config.json``
    For transformers models only: the model's ``PretrainedConfig``.
``shrink_config.json``
    ``format``, ``format_version``, how to rebuild the architecture (``architecture``), tensor
    aliases of tied weights (``aliases``), and one section per plugin that encoded something (for
    example ``quantization``, ``pruning``). Written last: its presence marks a complete export.

An export directory is data, never code: :func:`load` does not import or call anything the
directory names unless the caller opts in with ``trust_remote_code=True`` (see its docstring for
the threat model), and :func:`export` replaces an existing export so that a complete export is
at the target path at every instant.

Modules: :mod:`~lightning_shrink.export.convert`, :mod:`~lightning_shrink.export.native` (the
format), :mod:`~lightning_shrink.export.architecture` (recording and safely rebuilding the model),
:mod:`~lightning_shrink.export.safe_import` (the import guard of ``load``),
:mod:`~lightning_shrink.export.atomic` (replacing directories), :mod:`~lightning_shrink.export.layout`
(file names).
"""

from lightning_shrink.export.convert import convert
from lightning_shrink.export.layout import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME
from lightning_shrink.export.native import export, load, read_export

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "convert",
    "export",
    "load",
    "read_export",
]
