"""The validated configuration of quantization-aware training (:class:`QuantizationConfig`) and the
runtime switches its layers share (:class:`LayerSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_shrink.config import (
    ModuleSelector,
    Step,
    check_bool,
    check_choice,
    check_number,
    check_step,
)

__all__ = ["ACTIVATIONS", "ADAPTER_MODES", "BITS", "OWNER", "LayerSettings", "QuantizationConfig"]

#: The name errors of quantization-aware training start with.
OWNER = "QuantizationAwareTraining"

#: The activation schemes.
ACTIVATIONS: tuple[str | None, ...] = ("dynamic", "static", None)

#: The supported integer widths of weights and embedding tables.
BITS: tuple[int, ...] = (8, 4)

#: What a layer under a LoRA adapter fake-quantizes: the merged weight, or the base weight alone.
ADAPTER_MODES: tuple[str, ...] = ("merged", "base")

#: The fields that decide the layers' arithmetic (what checkpoints record and compare).
SCHEME_FIELDS: tuple[str, ...] = (
    "weight_bits",
    "group_size",
    "activations",
    "embedding_bits",
    "embedding_group_size",
    "averaging_constant",
)


def _set(config: QuantizationConfig, field: str, value: Any) -> None:
    object.__setattr__(config, field, value)  # normalizing a frozen dataclass in __post_init__


def _check_bits(argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{OWNER}: `{argument}` must be an int (8 or 4), got {value!r}")
    return check_choice(OWNER, argument, value, BITS)


def _check_group_size(argument: str, value: Any, bits_argument: str, bits: int, scales: str) -> int | None:
    """A group size of 4-bit values: ``None``, or a positive int when ``bits == 4``."""
    if value is None:
        return None
    check_number(OWNER, argument, value, low=1, integer=True)
    if bits != 4:
        raise ValueError(
            f"{OWNER}: `{argument}` is for {bits_argument}=4 (int8 {scales}), got {argument}={value!r} with "
            f"{bits_argument}={bits}"
        )
    return value


@dataclass(frozen=True)
class QuantizationConfig:
    """What :class:`~lightning_shrink.QuantizationAwareTraining` does, validated when it is built.

    The callback builds it from its keyword arguments (``callback.config``), where they are
    documented; :func:`~lightning_shrink.quantization.prepare_qat` takes it directly. ``modules`` and
    ``exclude_modules`` are normalized to tuples.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range, or arguments that contradict each other (a
            ``group_size`` with 8-bit weights, ``freeze_observers_step`` without static activations,
            ``embedding_bits=4`` with ``embeddings=False``).

    Example::

        config = QuantizationConfig(weight_bits=4, group_size=32, modules=["*mlp*"])
        config.scheme()["group_size"]  # 32
    """

    weight_bits: int = 8
    activations: str | None = "dynamic"
    start_step: Step = 0
    freeze_observers_step: Step | None = None
    freeze_bn_step: Step | None = None
    modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    embeddings: bool = True
    group_size: int | None = None
    averaging_constant: float = 0.01
    embedding_bits: int = 8
    embedding_group_size: int | None = None
    adapters: str = "merged"

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        if self.activations is not None and not isinstance(self.activations, str):
            raise TypeError(
                f"{OWNER}: `activations` must be 'dynamic', 'static' or None, got {self.activations!r}"
            )
        check_choice(OWNER, "activations", self.activations, ACTIVATIONS)
        check_step(OWNER, "start_step", self.start_step)
        check_step(OWNER, "freeze_observers_step", self.freeze_observers_step, allow_none=True)
        check_step(OWNER, "freeze_bn_step", self.freeze_bn_step, allow_none=True)
        if self.freeze_observers_step is not None and self.activations != "static":
            raise ValueError(
                f"{OWNER}: `freeze_observers_step` applies to activations='static' only "
                f"(activations={self.activations!r} has no observers)"
            )
        selector = ModuleSelector.from_arguments(OWNER, self.modules, self.exclude_modules)
        _set(self, "modules", selector.modules)
        _set(self, "exclude_modules", selector.exclude_modules)
        check_bool(OWNER, "embeddings", self.embeddings)
        _check_group_size(
            "group_size",
            self.group_size,
            "weight_bits",
            self.weight_bits,
            "weights use one scale per output channel",
        )
        _set(
            self,
            "averaging_constant",
            check_number(
                OWNER, "averaging_constant", self.averaging_constant, low=0.0, high=1.0, low_inclusive=False
            ),
        )
        _check_bits("embedding_bits", self.embedding_bits)
        if self.embedding_bits != 8 and not self.embeddings:
            raise ValueError(
                f"{OWNER}: `embedding_bits={self.embedding_bits}` has no effect with embeddings=False (no "
                "embedding table is quantized)"
            )
        _check_group_size(
            "embedding_group_size",
            self.embedding_group_size,
            "embedding_bits",
            self.embedding_bits,
            "embeddings use one scale per row",
        )
        if not isinstance(self.adapters, str):
            raise TypeError(f"{OWNER}: `adapters` must be 'merged' or 'base', got {self.adapters!r}")
        check_choice(OWNER, "adapters", self.adapters, ADAPTER_MODES)

    @property
    def selector(self) -> ModuleSelector:
        """The :class:`~lightning_shrink.config.ModuleSelector` of ``modules`` / ``exclude_modules``."""
        return ModuleSelector(OWNER, self.modules, self.exclude_modules)

    def scheme(self) -> dict[str, Any]:
        """The fields that decide the layers' arithmetic, as plain data (checkpoints record them)."""
        return {name: getattr(self, name) for name in SCHEME_FIELDS}


class LayerSettings:
    """What the layers one :class:`~lightning_shrink.QuantizationAwareTraining` prepared share.

    Every prepared layer holds this one object (``layer.shrink_qat``): the frozen ``config``, the
    registered name of the plugin that owns the layer (``owner``), and the switches the plugin flips
    on it to change every layer of its selection at once.

    Args:
        config: The configuration the layers simulate.
        owner: The plugin's registered name (``"quantization"``, ``"quantization-2"``...).

    Attributes:
        fake_quant_enabled: Whether the layers fake-quantize (off before ``start_step``).
        observer_enabled: Whether static observers update their ranges (off from
            ``freeze_observers_step``).
        sync_observers: Whether the static observers all-reduce the range of each batch across the
            processes of a distributed run before they update (set by the plugin at fit start).
    """

    def __init__(self, config: QuantizationConfig | None = None, owner: str = "quantization") -> None:
        self.config = config if config is not None else QuantizationConfig()
        self.owner = owner
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.sync_observers = False

    @property
    def weight_bits(self) -> int:
        """Bits of linear and convolution weights."""
        return self.config.weight_bits

    @property
    def group_size(self) -> int | None:
        """Input features per weight scale of 4-bit weights (``None``: per output channel)."""
        return self.config.group_size

    @property
    def activations(self) -> str | None:
        """``"dynamic"``, ``"static"`` or ``None``."""
        return self.config.activations

    @property
    def embedding_bits(self) -> int:
        """Bits of embedding tables."""
        return self.config.embedding_bits

    @property
    def embedding_group_size(self) -> int | None:
        """Elements of an embedding row per scale of 4-bit tables (``None``: per row)."""
        return self.config.embedding_group_size

    @property
    def averaging_constant(self) -> float:
        """Moving-average constant of the static observers."""
        return self.config.averaging_constant

    def to_dict(self) -> dict[str, Any]:
        """The arithmetic of the layers, as plain data (:meth:`QuantizationConfig.scheme`)."""
        return self.config.scheme()

    def __repr__(self) -> str:
        return f"LayerSettings(owner={self.owner!r}, {self.to_dict()})"
