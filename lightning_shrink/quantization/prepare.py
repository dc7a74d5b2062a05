"""Which layers quantization-aware training prepares (:func:`select_layers`), and preparing them
(:func:`prepare_qat`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from lightning_shrink.adapters import adapter_roles, check_supported, quantize_lora_merged
from lightning_shrink.quantization.config import OWNER, LayerSettings, QuantizationConfig
from lightning_shrink.quantization.fake_layers import is_prepared, prepare_module, supported_float_class

__all__ = ["prepare_qat", "select_layers", "tied_heads"]


def tied_heads(model: nn.Module) -> dict[str, str]:
    """``{head: embedding}`` for every ``nn.Linear`` of ``model`` whose weight is an ``nn.Embedding``'s
    table (language-model heads with tied input and output embeddings), by qualified name."""
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    tables = {id(m.weight): n for n, m in named if isinstance(m, nn.Embedding)}
    return {n: tables[id(m.weight)] for n, m in named if isinstance(m, nn.Linear) and id(m.weight) in tables}


def select_layers(
    model: nn.Module, config: QuantizationConfig | None = None, owner: str = "quantization"
) -> dict[str, nn.Module]:
    """The layers of ``model`` that quantization-aware training with ``config`` prepares, by
    qualified name, through :class:`~lightning_shrink.config.ModuleSelector`.

    ``config.modules`` of ``None`` selects every supported layer (``nn.Linear``, ``nn.Conv1d/2d/3d``,
    transformers' ``Conv1D`` and, with ``config.embeddings``, ``nn.Embedding``). A layer already
    prepared counts as its float class. Under peft LoRA adapters the base layers are selected, never
    ``lora_A``/``lora_B``; ``modules_to_save`` copies only when ``modules`` names them.
    A ``Linear`` whose weight is an embedding's table (a tied
    language-model head) is selected with that embedding and shares its quantized table.

    Raises:
        ValueError: a pattern matches no module; a tied head and its embedding are not selected
            together.
        TypeError: ``modules`` names a layer exactly that cannot be quantized.
    """
    config = config if config is not None else QuantizationConfig()
    heads = tied_heads(model)
    check_supported(model, f"{OWNER} {owner!r}")
    roles = adapter_roles(model)

    def supported(name: str, module: nn.Module) -> str | None:
        reason = roles.unsupported(module, explicit=config.modules is not None)
        if reason is not None:
            return reason
        if is_prepared(module):
            return None
        problem = supported_float_class(module)
        if problem is not None:
            return problem
        if isinstance(module, nn.Embedding) and not config.embeddings:
            return "it is an nn.Embedding and embeddings=False"
        if name in heads and not config.embeddings:
            return f"its weight is the table of the embedding {heads[name]!r}, and embeddings=False"
        return None

    selected = config.selector.select(model, supported)
    for head, table in heads.items():
        if (head in selected) != (table in selected):
            chosen, other = (head, table) if head in selected else (table, head)
            raise ValueError(
                f"{OWNER} {owner!r}: {head!r} computes with the table of the embedding {table!r} (tied "
                f"weights), but only {chosen!r} is selected: a tied table is quantized once, for both; "
                f"select or exclude {other!r} as well"
            )
    return selected


def prepare_qat(
    model: nn.Module,
    config: QuantizationConfig | None = None,
    *,
    modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    embeddings: bool | None = None,
    owner: str = "quantization",
    peers: Collection[LayerSettings] = (),
    settings: LayerSettings | None = None,
) -> list[str]:
    """Prepare ``model`` for quantization-aware training, in place; returns the prepared names.

    This is what :class:`~lightning_shrink.QuantizationAwareTraining` does before the optimizer
    exists; call it directly to use fake quantization without a Trainer.

    Args:
        model: The model; layer names are relative to it.
        config: What to simulate; default ``QuantizationConfig()`` (int8 weights, dynamic
            activations, every supported layer).
        modules: Overrides ``config.modules``.
        exclude_modules: Overrides ``config.exclude_modules``.
        embeddings: Overrides ``config.embeddings``.
        owner: The name the prepared layers record as their owner (the plugin's registered name).
        peers: The settings of the other QuantizationAwareTraining plugins of the Trainer: layers
            that share one of them belong to that plugin and may not be selected again.
        settings: The object every selected layer is to share (a plugin passes its own, to switch its
            layers); default a new ``LayerSettings(config, owner)``.

    Layers already prepared with the same arithmetic are adopted (a second ``fit``, a ``test`` after
    ``fit``): they then share ``settings`` and belong to ``owner``, unless they belong to a peer.
    Nothing is prepared unless every selected layer passes the checks.

    Raises:
        ValueError: a selected layer belongs to a peer, or was prepared with other settings; a group
            size does not divide a layer's features; see :func:`select_layers`.
        TypeError: see :func:`select_layers`.
    """
    overrides: dict[str, Any] = {
        k: v
        for k, v in (("modules", modules), ("exclude_modules", exclude_modules), ("embeddings", embeddings))
        if v is not None
    }
    config = config if config is not None else QuantizationConfig()
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"prepare_qat: `config` must be a QuantizationConfig, got {type(config).__name__}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    layers = select_layers(model, config, owner)
    heads = tied_heads(model)
    if settings is None:
        settings = LayerSettings(config, owner)
    elif settings.owner != owner or settings.config.scheme() != config.scheme():
        raise ValueError(f"prepare_qat: `settings` ({settings!r}) are not those of {owner!r} with {config}")
    for name, m in layers.items():
        if not is_prepared(m):
            continue
        theirs: LayerSettings = m.shrink_qat
        if any(theirs is peer for peer in peers):
            raise ValueError(
                f"{OWNER} {owner!r} and {OWNER} {theirs.owner!r} both select {name!r}: give the two "
                "callbacks disjoint `modules` / `exclude_modules`"
            )
        if theirs.to_dict() != config.scheme():
            raise ValueError(
                f"{OWNER} {owner!r}: layer {name!r} is already prepared for quantization-aware training "
                f"with {theirs.to_dict()}, not {config.scheme()}: prepare a model once per configuration"
            )
    for name, m in layers.items():
        if is_prepared(m):
            continue
        _check_divides(name, m, config, tied=name in heads)
    if config.adapters == "merged":  # LoRA layers over selected base layers compute fq(W + s·B·A)
        quantize_lora_merged(model, layers.values(), f"{OWNER} {owner!r}")
    for name, m in layers.items():  # only once every layer passed the checks: no half-prepared model
        if is_prepared(m):
            m.__dict__["shrink_qat"] = settings
        else:
            prepare_module(m, settings, tied=name in heads)
    return list(layers)


def _check_divides(name: str, module: nn.Module, config: QuantizationConfig, tied: bool) -> None:
    if isinstance(module, nn.Embedding) or tied:
        group = config.embedding_group_size
        dim = module.weight.shape[1]
        if group is not None and dim % group:
            raise ValueError(
                f"{OWNER}: `embedding_group_size={group}` does not divide the embedding dimension {dim} of "
                f"layer {name!r}; choose a divisor or exclude it"
            )
        return
    if config.group_size is not None and not isinstance(module, nn.modules.conv._ConvNd):
        in_features = module.weight.shape[0 if getattr(module, "nf", None) is not None else 1]
        if in_features % config.group_size:
            raise ValueError(
                f"{OWNER}: `group_size={config.group_size}` does not divide the {in_features} input "
                f"features of layer {name!r}; choose a divisor or exclude it"
            )
