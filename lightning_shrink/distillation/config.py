"""The configuration of knowledge distillation: :class:`DistillationConfig`, validated at construction.

Every argument of :class:`~lightning_shrink.KnowledgeDistillation` is checked here, with the error
policy of :mod:`lightning_shrink.config` (``TypeError`` for a value of the wrong type, ``ValueError``
for a value out of range, the message naming the callback and the argument). What depends on the
models (layer indices, submodule names, widths, vocabulary sizes) is checked at set-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_shrink.config import check_number
from lightning_shrink.distillation.cache import CacheKey
from lightning_shrink.distillation.teacher import validate_teacher_spec

__all__ = ["OWNER", "DistillationConfig", "LayerKey", "LayerPairs"]

#: The name every message of the technique starts with.
OWNER = "KnowledgeDistillation"

#: A layer of ``layer_map``: an index into a transformers model's ``hidden_states``, or a submodule name.
LayerKey = int | str

#: A layer map as stored in the configuration: ``(student_layer, teacher_layer)`` pairs, in order.
LayerPairs = tuple[tuple[LayerKey, LayerKey], ...]

#: The loss terms, in the order they are computed and logged.
TERMS = ("kl", "hidden_mse", "hidden_cosine", "attention")


def _layer_pairs(argument: str, value: Any, ints_only: bool) -> LayerPairs:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{OWNER}: `{argument}` must be a mapping {{student_layer: teacher_layer}}, got {value!r}"
        )
    if not value:
        raise ValueError(f"{OWNER}: `{argument}` must not be empty")
    allowed = (int,) if ints_only else (int, str)
    pairs = []
    for s, t in value.items():
        ok = all(isinstance(x, allowed) and not isinstance(x, bool) for x in (s, t))
        if not ok or type(s) is not type(t):
            kinds = "integer layer indices" if ints_only else "both integer indices or both submodule names"
            raise TypeError(f"{OWNER}: `{argument}` entry {s!r}: {t!r} must be {kinds}")
        if isinstance(s, str) and (not s or not t):
            raise ValueError(f"{OWNER}: `{argument}` entry {s!r}: {t!r} names an empty submodule")
        pairs.append((s, t))
    return tuple(pairs)


def check_alpha(value: Any, argument: str = "alpha") -> float:
    """``value`` as a float if it is a number in ``[0, 1]`` (``argument`` names it in the message)."""
    return check_number(OWNER, argument, value, low=0.0, high=1.0)


@dataclass(frozen=True)
class DistillationConfig:
    """What :class:`~lightning_shrink.KnowledgeDistillation` does, validated in ``__post_init__``.

    The fields are the callback's arguments (see its documentation); layer maps are stored as
    ``(student_layer, teacher_layer)`` pairs in the order given.

    Example::

        >>> config = DistillationConfig(teacher=torch.nn.Linear(4, 2), temperature=3.0)
        >>> config.term_names
        ('kl',)
    """

    teacher: torch.nn.Module | str | os.PathLike[str]
    temperature: float = 2.0
    alpha: float | Callable[[int], float] = 0.5
    kl_weight: float = 1.0
    hidden_mse_weight: float = 0.0
    hidden_cosine_weight: float = 0.0
    attention_weight: float = 0.0
    layer_map: LayerPairs = ()
    attention_layer_map: LayerPairs = ()
    student: str | None = None
    teacher_class: type | None = None
    teacher_dtype: torch.dtype | None = None
    cache_key: CacheKey | None = None
    logits_fn: Callable[[Any], torch.Tensor] | None = None
    projection_lr: float | None = None
    projection_weight_decay: float | None = None

    def __post_init__(self) -> None:
        validate_teacher_spec(self.teacher)
        set_ = object.__setattr__  # frozen: normalized values are set once, here
        set_(
            self,
            "temperature",
            check_number(OWNER, "temperature", self.temperature, low=0.0, low_inclusive=False),
        )
        if callable(self.alpha):
            check_alpha(self.alpha(0), "alpha(0)")
        else:
            set_(self, "alpha", check_alpha(self.alpha))
        for argument in ("kl_weight", "hidden_mse_weight", "hidden_cosine_weight", "attention_weight"):
            set_(self, argument, check_number(OWNER, argument, getattr(self, argument), low=0.0))
        if not self.term_names:
            raise ValueError(
                f"{OWNER}: `kl_weight`, `hidden_mse_weight`, `hidden_cosine_weight` and `attention_weight` "
                "are all 0; distillation would do nothing"
            )
        if self.uses_hidden and not self.layer_map:
            raise ValueError(
                f"{OWNER}: `hidden_mse_weight`/`hidden_cosine_weight` need `layer_map`, e.g. {{2: 4}} to "
                "match the student's hidden state 2 with the teacher's 4"
            )
        if self.layer_map:
            if not self.uses_hidden:
                raise ValueError(
                    f"{OWNER}: `layer_map` is given but `hidden_mse_weight` and `hidden_cosine_weight` are "
                    "0, so it would not be used; set one of them"
                )
            set_(self, "layer_map", _layer_pairs("layer_map", _as_mapping(self.layer_map), False))
        if self.attention_weight and not self.attention_layer_map:
            raise ValueError(f"{OWNER}: `attention_weight` needs `attention_layer_map`, e.g. {{1: 3}}")
        if self.attention_layer_map:
            if not self.attention_weight:
                raise ValueError(
                    f"{OWNER}: `attention_layer_map` is given but `attention_weight` is 0, so it would not "
                    "be used; set `attention_weight`"
                )
            pairs = _layer_pairs("attention_layer_map", _as_mapping(self.attention_layer_map), True)
            set_(self, "attention_layer_map", pairs)
        if self.student is not None and not isinstance(self.student, str):
            raise TypeError(
                f"{OWNER}: `student` must be an attribute path (str) or None, got {self.student!r}"
            )
        if self.teacher_class is not None and not isinstance(self.teacher_class, type):
            raise TypeError(f"{OWNER}: `teacher_class` must be a class, got {self.teacher_class!r}")
        if self.teacher_dtype is not None:
            if not isinstance(self.teacher_dtype, torch.dtype):
                raise TypeError(f"{OWNER}: `teacher_dtype` must be a torch.dtype, got {self.teacher_dtype!r}")
            if not self.teacher_dtype.is_floating_point:
                raise ValueError(
                    f"{OWNER}: `teacher_dtype` must be a floating torch.dtype, got {self.teacher_dtype!r}"
                )
        if self.cache_key is not None:
            if not (isinstance(self.cache_key, str) or callable(self.cache_key)):
                raise TypeError(
                    f"{OWNER}: `cache_key` must be a batch field name or a function, got {self.cache_key!r}"
                )
            if self.uses_hidden or self.attention_weight:
                raise ValueError(
                    f"{OWNER}: `cache_key` caches logits only; it cannot be combined with hidden-state or "
                    "attention losses, which need the teacher's forward at every step"
                )
        if self.logits_fn is not None and not callable(self.logits_fn):
            raise TypeError(f"{OWNER}: `logits_fn` must be callable, got {self.logits_fn!r}")
        set_(
            self,
            "projection_lr",
            check_number(
                OWNER, "projection_lr", self.projection_lr, low=0.0, low_inclusive=False, allow_none=True
            ),
        )
        set_(
            self,
            "projection_weight_decay",
            check_number(
                OWNER, "projection_weight_decay", self.projection_weight_decay, low=0.0, allow_none=True
            ),
        )
        if not self.uses_hidden:
            for argument in ("projection_lr", "projection_weight_decay"):
                if getattr(self, argument) is not None:
                    raise ValueError(
                        f"{OWNER}: `{argument}` configures the learned projections of the hidden-state "
                        "losses, but `hidden_mse_weight` and `hidden_cosine_weight` are 0"
                    )

    @property
    def uses_hidden(self) -> bool:
        """Whether a hidden-state term (MSE or cosine) is on."""
        return bool(self.hidden_mse_weight or self.hidden_cosine_weight)

    @property
    def term_names(self) -> tuple[str, ...]:
        """The loss terms with a non-zero weight, e.g. ``("kl", "hidden_mse")``."""
        weights = (self.kl_weight, self.hidden_mse_weight, self.hidden_cosine_weight, self.attention_weight)
        return tuple(name for name, weight in zip(TERMS, weights, strict=True) if weight)

    def alpha_at(self, step: int) -> float:
        """The value of ``alpha`` at optimizer step ``step`` (a schedule is checked at every call)."""
        if callable(self.alpha):
            return check_alpha(self.alpha(step), f"alpha({step})")
        return float(self.alpha)


def _as_mapping(value: Any) -> Any:
    # A layer map is given as a mapping; a configuration rebuilt from a stored one (dataclasses.replace)
    # holds pairs already.
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return dict(value)
    return value
