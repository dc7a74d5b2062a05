"""The layers that the hidden-state and attention terms compare: checking the layer maps against the
models, the widths of mapped layers, what the models are asked to output, and eager attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_shrink.distillation.config import OWNER, DistillationConfig, LayerKey
from lightning_shrink.distillation.teacher import is_transformers_model

__all__ = ["EagerAttention", "check_layer_maps", "layer_width", "output_request"]


def check_layer_maps(config: DistillationConfig, student: nn.Module, teacher: nn.Module) -> None:
    """Raise at set-up for a layer map entry that does not exist in the student or the teacher.

    Raises:
        ValueError: a submodule name that is not in the model, or integer indices with a model that
            is not a transformers model.
        IndexError: an index outside the model's ``hidden_states`` or ``attentions``.
    """
    maps = []
    if config.uses_hidden:
        maps.append(("layer_map", config.layer_map, "hidden states", 1))
    if config.attention_weight:
        maps.append(("attention_layer_map", config.attention_layer_map, "attention maps", 0))
    for argument, pairs, what, extra in maps:
        for s_key, t_key in pairs:
            for side, model, key in (("student", student, s_key), ("teacher", teacher, t_key)):
                if isinstance(key, str):
                    try:
                        model.get_submodule(key)
                    except AttributeError:
                        raise ValueError(
                            f"{OWNER}: `{argument}` entry {s_key!r}: {t_key!r}: the {side} "
                            f"({type(model).__name__}) has no submodule {key!r}"
                        ) from None
                    continue
                if not is_transformers_model(model):
                    raise ValueError(
                        f"{OWNER}: `{argument}` uses integer layer indices, which index the {what} of a "
                        f"transformers model, but the {side} is a {type(model).__name__}; name submodules "
                        "instead (e.g. {'net.2': 'net.2'}) or set `student=`"
                    )
                count = int(model.config.num_hidden_layers) + extra
                if not -count <= key < count:
                    raise IndexError(
                        f"{OWNER}: `{argument}` entry {s_key!r}: {t_key!r}: {side} layer {key} is out of "
                        f"range; the {side} ({type(model).__name__}) has {count} {what} (indices "
                        f"0..{count - 1}" + (", 0 = embeddings" if extra else "") + ")"
                    )


def layer_width(model: nn.Module, key: LayerKey, side: str) -> int:
    """The width of a mapped layer's output: ``config.hidden_size`` for an index, else read from
    the named module (``out_features``, ``embedding_dim``, ``hidden_size``, ``nf``, ``normalized_shape``)."""
    if isinstance(key, int):
        return int(model.config.hidden_size)
    module = model.get_submodule(key)
    for attribute in ("out_features", "embedding_dim", "hidden_size", "nf"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    raise ValueError(
        f"{OWNER}: cannot tell the output width of the {side}'s layer {key!r} ({type(module).__name__}); map "
        "layers with a known width (Linear, LayerNorm, Embedding)"
    )


def output_request(config: DistillationConfig) -> dict[str, bool]:
    """The keyword arguments that make a transformers model return what the terms compare."""
    request = {}
    if config.uses_hidden and any(isinstance(s, int) for s, _ in config.layer_map):
        request["output_hidden_states"] = True
    if config.attention_weight:
        request["output_attentions"] = True
    return request


class EagerAttention:
    """Switches transformers models to eager attention for a run, and back.

    PyTorch's SDPA attention returns no attention probabilities; the attention term needs them.
    """

    def __init__(self) -> None:
        self._restore: list[tuple[nn.Module, str]] = []

    def switch(self, *models: Any) -> None:
        """Set ``"eager"`` attention on each model that uses another implementation."""
        if self._restore:
            return
        for model in models:
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if impl is not None and impl != "eager":
                model.set_attn_implementation("eager")
                self._restore.append((model, impl))

    def restore(self) -> None:
        """Give every switched model its implementation back."""
        for model, impl in self._restore:
            model.set_attn_implementation(impl)
        self._restore.clear()
