"""The validated configuration of gradual magnitude pruning: :class:`PruningConfig`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_shrink.config import (
    ModuleSelector,
    Step,
    check_bool,
    check_choice,
    check_number,
    check_patterns,
    check_step,
    resolve_step,
)
from lightning_shrink.pruning.masks import Pattern, parse_pattern
from lightning_shrink.pruning.schedule import SCHEDULES, PruningSchedule

__all__ = ["OWNER", "SCOPES", "PruningConfig"]

#: The name errors and warnings of pruning start with.
OWNER = "GradualMagnitudePruning"

#: The threshold scopes.
SCOPES: tuple[str, ...] = ("global", "layer")


def _check_sparsity(argument: str, value: Any) -> float:
    return check_number(OWNER, argument, value, low=0.0, high=1.0, high_inclusive=False)


def _set(config: PruningConfig, field: str, value: Any) -> None:
    object.__setattr__(config, field, value)  # normalizing a frozen dataclass in __post_init__


@dataclass(frozen=True)
class PruningConfig:
    r"""What :class:`~lightning_shrink.GradualMagnitudePruning` does, validated when it is built.

    The callback builds it from its keyword arguments (``callback.config``); the arguments are
    documented there. Values are normalized: ``pattern`` becomes a :class:`Pattern`, name patterns and
    ``parameter_names`` become tuples and ``sparsity_overrides`` a tuple of ``(pattern, sparsity)``
    pairs in the order given (the last pattern that matches a module wins).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range, or arguments that contradict each other (an
            ``initial_sparsity`` above ``target_sparsity``, an ``end_step`` not after ``start_step``, a
            ``target_sparsity`` other than an N:M pattern's ``1 - N/M``).

    Example::

        config = PruningConfig(target_sparsity=0.8, end_step=0.75, pattern="rows")
        config.pattern.kind  # "rows"
    """

    target_sparsity: float
    initial_sparsity: float = 0.0
    start_step: Step = 0
    end_step: Step | None = None
    frequency: Step = 0.02
    schedule: str | Callable[[int], float] = "cubic"
    pattern: Pattern | str = "unstructured"
    scope: str = "global"
    modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    module_types: tuple[type[nn.Module], ...] | None = None
    parameter_names: tuple[str, ...] = ("weight",)
    prune_output_layer: bool = False
    sparsity_overrides: tuple[tuple[str, float], ...] = ()
    log_layer_sparsity: bool = True
    mask_gradients: bool = False

    def __post_init__(self) -> None:
        target = _check_sparsity("target_sparsity", self.target_sparsity)
        initial = _check_sparsity("initial_sparsity", self.initial_sparsity)
        _set(self, "target_sparsity", target)
        _set(self, "initial_sparsity", initial)
        if initial > target:
            raise ValueError(
                f"{OWNER}: `initial_sparsity` ({initial:g}) must not exceed `target_sparsity` ({target:g})"
            )
        check_step(OWNER, "start_step", self.start_step, allow_zero=True)
        check_step(OWNER, "end_step", self.end_step, allow_zero=False, allow_none=True)
        check_step(OWNER, "frequency", self.frequency, allow_zero=False)
        if callable(self.schedule):
            pass
        elif isinstance(self.schedule, str):
            check_choice(OWNER, "schedule", self.schedule, SCHEDULES)
        else:
            raise TypeError(
                f"{OWNER}: `schedule` must be one of {list(SCHEDULES)} or a callable step -> sparsity, "
                f"got {self.schedule!r}"
            )
        start, end = self.start_step, self.end_step
        if end is not None and type(end) is type(start) and end <= start and self.schedule != "constant":
            raise ValueError(f"{OWNER}: `end_step` ({end}) must be after `start_step` ({start})")
        pattern = self.pattern if isinstance(self.pattern, Pattern) else parse_pattern(self.pattern, OWNER)
        _set(self, "pattern", pattern)
        if pattern.sparsity is not None and abs(pattern.sparsity - target) > 1e-9:
            raise ValueError(
                f"{OWNER}: `pattern='{pattern}'` keeps {pattern.n} of every {pattern.m} weights, i.e. "
                f"sparsity {pattern.sparsity:g}; `target_sparsity` is {target:g} "
                f"(set it to {pattern.sparsity:g})"
            )
        check_choice(OWNER, "scope", self.scope, SCOPES)
        selector = ModuleSelector.from_arguments(OWNER, self.modules, self.exclude_modules)
        _set(self, "modules", selector.modules)
        _set(self, "exclude_modules", selector.exclude_modules)
        _set(self, "module_types", self._module_types(self.module_types))
        _set(self, "parameter_names", self._parameter_names(self.parameter_names))
        check_bool(OWNER, "prune_output_layer", self.prune_output_layer)
        overrides = self._overrides(self.sparsity_overrides)
        if overrides and pattern.kind == "nm":
            raise ValueError(
                f"{OWNER}: `sparsity_overrides` cannot be combined with an N:M `pattern` (its sparsity is "
                "fixed)"
            )
        if overrides and callable(self.schedule) and target == 0.0:
            raise ValueError(
                f"{OWNER}: `sparsity_overrides` with a callable `schedule` needs `target_sparsity` > 0 "
                "(the callable's values are scaled by override / target)"
            )
        _set(self, "sparsity_overrides", overrides)
        check_bool(OWNER, "log_layer_sparsity", self.log_layer_sparsity)
        check_bool(OWNER, "mask_gradients", self.mask_gradients)
        from lightning_shrink.pruning.structured import check_structured_config  # imports this module

        check_structured_config(self)

    @property
    def selector(self) -> ModuleSelector:
        """The module selector of ``modules`` and ``exclude_modules``."""
        return ModuleSelector(OWNER, self.modules, self.exclude_modules)

    def resolve_schedule(self, total_steps: float) -> PruningSchedule:
        """The schedule in optimizer steps for a run of ``total_steps`` optimizer steps
        (``trainer.estimated_stepping_batches``; ``inf`` when unknown).

        Raises:
            ValueError: a fraction on a run of unknown length, or an ``end_step`` that resolves to a
                step not after ``start_step``.
        """
        start = resolve_step(OWNER, "start_step", self.start_step, total_steps)
        end_label = "end_step" if self.end_step is not None else "end_step (None: the whole run)"
        end_value = self.end_step if self.end_step is not None else 1.0
        end = resolve_step(OWNER, end_label, end_value, total_steps, minimum=1)
        frequency = resolve_step(OWNER, "frequency", self.frequency, total_steps, minimum=1)
        if self.schedule != "constant" and end <= start:
            raise ValueError(
                f"{OWNER}: `end_step` resolves to step {end}, not after `start_step` (step {start}), "
                f"for a run of {total_steps:g} optimizer steps"
            )
        return PruningSchedule(
            self.schedule, self.initial_sparsity, self.target_sparsity, start, end, frequency
        )

    @staticmethod
    def _module_types(value: Any) -> tuple[type[nn.Module], ...] | None:
        if value is None:
            return None
        types = (value,) if isinstance(value, type) else value
        try:
            types = tuple(types)
        except TypeError:
            types = ()
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(
                f"{OWNER}: `module_types` must be a non-empty sequence of torch.nn.Module classes, "
                f"got {value!r}"
            )
        return types

    @staticmethod
    def _parameter_names(value: Any) -> tuple[str, ...]:
        names = (value,) if isinstance(value, str) else value
        if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"{OWNER}: `parameter_names` must be a parameter name or a sequence of them, got {value!r}"
            )
        if not names or not all(names):
            raise ValueError(
                f"{OWNER}: `parameter_names` must name at least one parameter, e.g. ('weight',), got "
                f"{value!r}"
            )
        return tuple(names)

    @staticmethod
    def _overrides(value: Any) -> tuple[tuple[str, float], ...]:
        if value is None:
            return ()
        if isinstance(value, Mapping):
            pairs = list(value.items())
        elif isinstance(value, (tuple, list)) and all(
            isinstance(p, (tuple, list)) and len(p) == 2 for p in value
        ):
            pairs = [tuple(p) for p in value]
        else:
            raise TypeError(
                f"{OWNER}: `sparsity_overrides` must be a mapping of module name patterns to sparsities, "
                f"got {value!r}"
            )
        for pattern, _ in pairs:
            check_patterns(OWNER, "sparsity_overrides", pattern)
        return tuple((p, _check_sparsity(f"sparsity_overrides[{p!r}]", s)) for p, s in pairs)

    def describe(self) -> dict[str, Any]:
        """The configuration as plain data (checkpoints record it to compare on resume).

        A callable ``schedule`` is described by its qualified name, ``module_types`` by class paths.
        """
        schedule = self.schedule
        if callable(schedule):
            schedule = f"{getattr(schedule, '__module__', '?')}.{getattr(schedule, '__qualname__', '?')}"
        types = None
        if self.module_types is not None:
            types = [f"{t.__module__}.{t.__qualname__}" for t in self.module_types]
        return {
            "target_sparsity": self.target_sparsity,
            "initial_sparsity": self.initial_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
            "schedule": schedule,
            "pattern": str(self.pattern),
            "scope": self.scope,
            "modules": list(self.modules) if self.modules is not None else None,
            "exclude_modules": list(self.exclude_modules),
            "module_types": types,
            "parameter_names": list(self.parameter_names),
            "prune_output_layer": self.prune_output_layer,
            "sparsity_overrides": [[p, s] for p, s in self.sparsity_overrides],
            "log_layer_sparsity": self.log_layer_sparsity,
            "mask_gradients": self.mask_gradients,
        }
