"""The :class:`QuantizationAwareTraining` callback and its plugin."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning.technique import TechniqueCallback, TechniquePlugin
from lightning_shrink.quantization.modules import (
    LayerSettings,
    is_converted,
    is_prepared,
    prepare_module,
    supported_float_class,
)

__all__ = ["QuantizationAwareTraining", "prepare_qat", "select_layers"]

_ACTIVATIONS = ("dynamic", "static", None)
_BITS = (8, 4)


def _check_step(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a non-negative int or None" if allow_none else "a non-negative int"
        raise ValueError(f"QuantizationAwareTraining: `{name}` must be {allowed}, got {value!r}")


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or value not in _BITS:
        raise ValueError(f"QuantizationAwareTraining: unsupported `{name}={value!r}`; choose 8 or 4")


def _check_group_size(name: str, value: Any, bits_name: str, bits: int, int8_scales: str) -> None:
    """``value`` (a group size for 4-bit values) must be None, or a positive int with ``bits == 4``."""
    if value is None:
        return
    if bits != 4:
        raise ValueError(f"QuantizationAwareTraining: `{name}` is for {bits_name}=4; int8 {int8_scales}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"QuantizationAwareTraining: `{name}` must be a positive int, got {value!r}")


def _as_patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(
            f"QuantizationAwareTraining: `{name}` must be a module name or glob pattern, or a sequence "
            f"of them, got {value!r}"
        )
    return list(value)


def select_layers(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] = (),
    embeddings: bool = True,
) -> dict[str, nn.Module]:
    """The layers of ``model`` that quantization-aware training prepares, by qualified name.

    Args:
        model: The model (names are relative to it).
        modules: Names or ``fnmatch`` glob patterns; ``None`` selects every supported layer. A
            pattern without glob characters must name a supported layer (else ``TypeError``);
            every pattern must match at least one module (else ``ValueError``).
        exclude_modules: Names or glob patterns of layers to leave in float.
        embeddings: Include ``nn.Embedding`` layers when ``modules`` is ``None`` or a glob.

    A ``Linear`` whose weight is tied to a selected embedding (language-model heads) is left in
    float: the shared tensor is quantized once, as the embedding.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    selected: dict[str, nn.Module] = {}
    if modules is None:
        for name, m in named:
            if supported_float_class(m) is None and (embeddings or not isinstance(m, nn.Embedding)):
                selected[name] = m
    else:
        for pattern in modules:
            is_glob = any(c in pattern for c in "*?[")
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"QuantizationAwareTraining: `modules` pattern {pattern!r} matches no module of "
                    f"{type(model).__name__} (names look like {[n for n, _ in named[:3]]})"
                )
            for name, m in hits:
                problem = supported_float_class(m)
                if problem is not None:
                    if not is_glob and not (is_prepared(m) or is_converted(m)):
                        raise TypeError(
                            f"QuantizationAwareTraining: selected layer {name!r} cannot be "
                            f"quantized: {problem}"
                        )
                    continue
                if isinstance(m, nn.Embedding) and is_glob and not embeddings:
                    continue
                selected[name] = m
    for pattern in exclude_modules:
        for name in [n for n in selected if fnmatch.fnmatchcase(n, pattern)]:
            del selected[name]
    embedding_weights = {id(m.weight) for m in selected.values() if isinstance(m, nn.Embedding)}
    return {
        n: m
        for n, m in selected.items()
        if isinstance(m, nn.Embedding) or id(getattr(m, "weight", None)) not in embedding_weights
    }


def prepare_qat(
    model: nn.Module,
    settings: LayerSettings | None = None,
    modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] = (),
    embeddings: bool = True,
) -> list[str]:
    """Prepare ``model`` for quantization-aware training, in place; returns the prepared names.

    This is what :class:`QuantizationAwareTraining` does in ``setup``; call it directly to use
    fake quantization without a Trainer. Layers already prepared with equal settings are adopted
    (idempotent); layers prepared with different settings raise ``ValueError``.
    """
    settings = settings if settings is not None else LayerSettings()
    already = {n: m for n, m in model.named_modules() if n and is_prepared(m)}
    for name, m in already.items():
        if m.shrink_qat is not settings and m.shrink_qat.to_dict() != settings.to_dict():
            raise ValueError(
                f"layer {name!r} is already prepared for quantization-aware training with "
                f"{m.shrink_qat.to_dict()}, not {settings.to_dict()}: use one QuantizationAwareTraining "
                "configuration per model"
            )
        m.__dict__["shrink_qat"] = settings
    layers = select_layers(model, modules, exclude_modules, embeddings)
    names = sorted(set(already) | set(layers))
    for name, m in layers.items():
        group = settings.embedding_group_size
        if isinstance(m, nn.Embedding) and group is not None and m.embedding_dim % group:
            raise ValueError(
                f"QuantizationAwareTraining: `embedding_group_size={group}` does not divide the "
                f"embedding dimension {m.embedding_dim} of layer {name!r}; choose a divisor or exclude it"
            )
        if settings.group_size is not None and not isinstance(m, (nn.Embedding, nn.modules.conv._ConvNd)):
            in_features = m.weight.shape[0 if getattr(m, "nf", None) is not None else 1]
            if in_features % settings.group_size:
                raise ValueError(
                    f"QuantizationAwareTraining: `group_size={settings.group_size}` does not divide the "
                    f"{in_features} input features of layer {name!r}; choose a divisor or exclude it"
                )
    for m in layers.values():  # only once every layer passed the checks: no half-prepared model
        prepare_module(m, settings)
    return names


class QuantizationAwareTraining(TechniqueCallback):
    """Quantization-aware training: fake-quantize layers while fine-tuning, convert to int8 after.

    In ``setup`` (before the optimizer exists, before DDP wraps the model and before checkpoint
    weights load) the selected layers are prepared in place: they keep their ``weight``/``bias``
    Parameters and ``state_dict`` keys, and their forward fake-quantizes the weight (symmetric, per
    output channel, ``scale = max|w| / 127``) and the input. Gradients pass straight through. The
    model stays a trainable float model after ``fit``; :func:`lightning_shrink.convert` turns it
    into real int8 layers, :func:`lightning_shrink.export` writes it.

    Args:
        weight_bits: ``8`` (int8, per output channel) or ``4`` (int4, per output channel or per
            group of ``group_size`` input features) for linear layers and convolutions.
        activations: ``"dynamic"``: int8 per token, scale from each token's own range (convolutions:
            per tensor); ``"static"``: uint8 per tensor with a range observed by a moving-average
            min/max observer; ``None``: weight-only.
        start_step: Optimizer step from which fake quantization is on (before it, layers run in
            float; static observers already observe). Evaluation outside ``fit`` always quantizes.
        freeze_observers_step: Step from which static activation ranges stop updating
            (``activations="static"`` only). ``None``: never freeze.
        freeze_bn_step: Step from which batch-norm layers use and keep their running statistics
            (they are put in eval mode). ``None``: never.
        modules: Names or glob patterns (``"model.bert.encoder.*"``) of the layers to quantize,
            relative to the LightningModule. ``None``: every supported layer (``nn.Linear``,
            ``nn.Conv1d/2d/3d``, transformers' ``Conv1D`` and, with ``embeddings``, ``nn.Embedding``).
        exclude_modules: Names or glob patterns of layers to keep in float (e.g. ``["*classifier*"]``).
        embeddings: Quantize ``nn.Embedding`` tables. They hold about half of a small BERT's
            weights, so a small export needs them.
        group_size: Input features per scale for ``weight_bits=4`` (e.g. 32, 64, 128); ``None``:
            one scale per output channel.
        embedding_bits: ``8`` (int8, one scale per row) or ``4`` (int4, one scale per row or per
            ``embedding_group_size`` elements of a row). An int4 table is exported two values per
            byte: for all-MiniLM-L6-v2 the word embeddings shrink from 11.7 MB (int8) to 6.6 MB.
        embedding_group_size: Elements of an embedding row per scale for ``embedding_bits=4``
            (must divide the embedding dimension); ``None``: one scale per row.
        averaging_constant: Moving-average constant of the static observers.
        name: The plugin's registered name, the namespace of its metrics, checkpoint state and report
            rows; ``None``: ``"quantization"`` (``"quantization-2"``... for further instances).

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(activations="dynamic")])
        trainer.fit(model)
        int8_model = lightning_shrink.convert(model.model)
        lightning_shrink.export(int8_model, "out/")
    """

    plugin_name = "quantization"

    def __init__(
        self,
        weight_bits: int = 8,
        activations: str | None = "dynamic",
        start_step: int = 0,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] = (),
        embeddings: bool = True,
        group_size: int | None = None,
        averaging_constant: float = 0.01,
        embedding_bits: int = 8,
        embedding_group_size: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        _check_bits("weight_bits", weight_bits)
        if activations not in _ACTIVATIONS:
            raise ValueError(
                f"QuantizationAwareTraining: `activations` must be 'dynamic', 'static' or None, "
                f"got {activations!r}"
            )
        _check_step("start_step", start_step, allow_none=False)
        _check_step("freeze_observers_step", freeze_observers_step, allow_none=True)
        _check_step("freeze_bn_step", freeze_bn_step, allow_none=True)
        if freeze_observers_step is not None and activations != "static":
            raise ValueError(
                "QuantizationAwareTraining: `freeze_observers_step` applies to activations='static' "
                f"only (activations={activations!r} has no observers)"
            )
        _check_group_size(
            "group_size", group_size, "weight_bits", weight_bits, "weights use one scale per output channel"
        )
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                "QuantizationAwareTraining: `averaging_constant` must be in (0, 1], "
                f"got {averaging_constant!r}"
            )
        if not isinstance(embeddings, bool):
            raise TypeError(f"QuantizationAwareTraining: `embeddings` must be a bool, got {embeddings!r}")
        _check_bits("embedding_bits", embedding_bits)
        if embedding_bits != 8 and not embeddings:
            raise ValueError(
                f"QuantizationAwareTraining: `embedding_bits={embedding_bits}` has no effect with "
                "embeddings=False (no embedding table is quantized)"
            )
        _check_group_size(
            "embedding_group_size",
            embedding_group_size,
            "embedding_bits",
            embedding_bits,
            "embeddings use one scale per row",
        )
        self.settings = LayerSettings(
            weight_bits=weight_bits,
            group_size=group_size,
            activations=activations,
            averaging_constant=averaging_constant,
            embedding_bits=embedding_bits,
            embedding_group_size=embedding_group_size,
        )
        self.start_step = start_step
        self.freeze_observers_step = freeze_observers_step
        self.freeze_bn_step = freeze_bn_step
        self.modules = _as_patterns("modules", modules)
        self.exclude_modules = _as_patterns("exclude_modules", exclude_modules) or []
        self.embeddings = embeddings

    def make_plugin(self) -> _QATPlugin:
        return _QATPlugin(self)


class _QATPlugin(TechniquePlugin):
    """Hook implementations of one :class:`QuantizationAwareTraining`."""

    default_name = "quantization"

    def __init__(self, config: QuantizationAwareTraining) -> None:
        super().__init__(config)
        self.layers: list[str] = []

    def _update(self, step: int, training: bool) -> None:
        c, s = self.config, self.config.settings
        s.fake_quant_enabled = (not training) or step >= c.start_step
        s.observer_enabled = c.freeze_observers_step is None or step < c.freeze_observers_step

    @hookimpl
    def shrink_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        c = self.config
        self.layers = prepare_qat(pl_module, c.settings, c.modules, c.exclude_modules, c.embeddings)
        if not self.layers:
            raise ValueError(
                f"QuantizationAwareTraining found no layer to quantize in {type(pl_module).__name__} "
                "(supported: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, transformers' Conv1D)"
            )
        self._update(trainer.global_step, training=stage == "fit")

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._update(step, training=True)
        if self.config.freeze_bn_step is not None and step >= self.config.freeze_bn_step:
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    m.eval()

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The model stays prepared (trainable, float parameters); evaluation after fit quantizes.
        self._update(trainer.global_step, training=False)

    @hookimpl
    def shrink_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return {self.key("fake_quant_enabled"): float(self.config.settings.fake_quant_enabled)}

    @hookimpl
    def shrink_save_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: MutableMapping[str, Any]
    ) -> None:
        state[self.name] = {
            "version": 1,
            "settings": self.config.settings.to_dict(),
            "layers": self.layers,
        }

    @hookimpl
    def shrink_load_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]
    ) -> None:
        saved = state.get(self.name)
        if saved is None:
            return
        mine = self.config.settings.to_dict()
        # Settings added later have defaults that reproduce the older behaviour.
        theirs = {**LayerSettings().to_dict(), **saved.get("settings", mine)}
        if theirs != mine or sorted(saved.get("layers", self.layers)) != self.layers:
            missing = sorted(set(saved.get("layers", [])) ^ set(self.layers))
            raise ValueError(
                "QuantizationAwareTraining: the checkpoint was trained with a different quantization "
                f"configuration (settings {saved.get('settings')} vs {mine}; layers that differ: "
                f"{missing[:5]}); resume with the callback arguments of the original run"
            )
