"""What every technique's configuration shares: step specifications, module selection, validators.

One error policy for every callback argument, in the style of Lightning's callbacks:

* a value of the wrong **type** raises :class:`TypeError`, a value of the right type that is out of
  range or not one of the choices raises :class:`ValueError`;
* the message names the callback and the argument, says what is allowed and shows what was given:
  ``GradualMagnitudePruning: `target_sparsity` must be a float in [0, 1), got 1.5``;
* it is raised at construction, or at set-up for what depends on the model (a module pattern that
  matches nothing), never at step 3,000.

Steps
-----
Wherever a technique takes a step (``start_step``, ``end_step``, ``frequency``,
``freeze_observers_step``...), an ``int`` counts **optimizer steps** (not batches: with
``accumulate_grad_batches`` a step is several batches) and a ``float`` in ``[0, 1]`` is a fraction of
the run's optimizer steps (``trainer.estimated_stepping_batches``), resolved when fit starts
(:func:`resolve_step`).

Module selection
----------------
Wherever a technique selects layers, it takes ``modules`` (names or ``fnmatch`` glob patterns of
qualified module names; ``None``: the technique's default selection) and ``exclude_modules`` (names
or patterns never to touch), with one strictness (:class:`ModuleSelector`): every pattern of either
argument must match at least one module of the model, else set-up raises ``ValueError`` naming the
pattern (a typo would otherwise silently compress what was meant to be kept, or nothing).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ModuleSelector",
    "Step",
    "check_bool",
    "check_choice",
    "check_number",
    "check_patterns",
    "check_step",
    "resolve_step",
]

#: A step specification: ``int`` optimizer steps, or a ``float`` fraction of the run's optimizer steps.
Step = int | float


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(owner: str, argument: str, value: Any) -> bool:
    """``value`` if it is a bool, else :class:`TypeError` naming ``owner`` and ``argument``."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{argument}` must be a bool, got {value!r}")
    return value


def check_choice(owner: str, argument: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else :class:`ValueError` listing them."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{owner}: `{argument}` must be one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{owner}: `{argument}` must be one of {list(choices)}, got {value!r}")
    return value


def check_number(
    owner: str,
    argument: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    allow_none: bool = False,
) -> Any:
    """Check a numeric argument and return it (``float`` unless ``integer``).

    Raises:
        TypeError: ``value`` is not a number (a bool is not a number), or not an int when
            ``integer``.
        ValueError: ``value`` is not finite or outside the bounds.
    """
    if value is None and allow_none:
        return None
    kind = "an int" if integer else "a number"
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(
            f"{owner}: `{argument}` must be {kind}{' or None' if allow_none else ''}, got {value!r}"
        )
    if not _is_number(value):
        raise TypeError(
            f"{owner}: `{argument}` must be {kind}{' or None' if allow_none else ''}, got {value!r}"
        )
    if not math.isfinite(value):
        raise ValueError(f"{owner}: `{argument}` must be finite, got {value!r}")
    below = low is not None and (value < low if low_inclusive else value <= low)
    above = high is not None and (value > high if high_inclusive else value >= high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'[' if low_inclusive and low is not None else '('}{left}, {right}"
        interval += "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{owner}: `{argument}` must be {kind} in {interval}, got {value!r}")
    return value if integer else float(value)


def check_step(
    owner: str, argument: str, value: Any, *, allow_zero: bool = True, allow_none: bool = False
) -> Step | None:
    """Check a step specification (see the module docs) and return it unchanged.

    Args:
        owner: The callback's name, for the message.
        argument: The argument's name, for the message.
        value: An ``int`` number of optimizer steps (``>= 0``, or ``>= 1`` without ``allow_zero``) or a
            ``float`` fraction of the run in ``[0, 1]`` (``(0, 1]`` without ``allow_zero``).
        allow_zero: Whether step 0 (before the first optimizer step) is allowed.
        allow_none: Whether ``None`` is allowed.
    """
    if value is None and allow_none:
        return None
    if not _is_number(value):
        raise TypeError(
            f"{owner}: `{argument}` must be an int (optimizer steps) or a float fraction of the run's "
            f"optimizer steps{', or None' if allow_none else ''}, got {value!r}"
        )
    if isinstance(value, int):
        least = 0 if allow_zero else 1
        if value < least:
            raise ValueError(f"{owner}: `{argument}` must be >= {least} optimizer steps, got {value}")
        return value
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if math.isnan(value) or not (low_ok and value <= 1.0):
        raise ValueError(
            f"{owner}: `{argument}` as a float is a fraction of the run's optimizer steps and must be in "
            f"{'[0, 1]' if allow_zero else '(0, 1]'}, got {value!r}"
        )
    return value


def resolve_step(owner: str, argument: str, value: Step, total_steps: float, minimum: int = 0) -> int:
    """Turn a step specification into a number of optimizer steps (at least ``minimum``).

    Args:
        owner: The callback's name, for the message.
        argument: The argument's name, for the message.
        value: ``int`` optimizer steps or a ``float`` fraction of ``total_steps``.
        total_steps: The run's optimizer steps (``trainer.estimated_stepping_batches``; ``inf`` when
            the run's length is unknown).
        minimum: The least number of steps returned.

    Raises:
        ValueError: ``value`` is a fraction and the run's length is unknown.
    """
    if isinstance(value, bool):
        raise TypeError(f"{owner}: `{argument}` must be an int or a float, got {value!r}")
    if isinstance(value, int):
        return max(value, minimum)
    if not math.isfinite(total_steps):
        raise ValueError(
            f"{owner}: `{argument}={value!r}` is a fraction of the run's optimizer steps, but the run's "
            f"length is unknown (set `max_steps` or `max_epochs` on the Trainer, or give `{argument}` in "
            "optimizer steps)"
        )
    return max(round(value * total_steps), minimum)


def check_patterns(
    owner: str, argument: str, value: Any, *, allow_none: bool = False
) -> tuple[str, ...] | None:
    """A module name or glob pattern, or a sequence of them, as a tuple (``None`` if allowed).

    Raises:
        TypeError: ``value`` is not a string or a sequence of strings.
        ValueError: the sequence is empty, or a pattern is empty.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise TypeError(
            f"{owner}: `{argument}` must be a module name or glob pattern, or a sequence of them, "
            f"got {value!r}"
        )
    patterns = tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{owner}: `{argument}` must hold strings (module names or glob patterns), got {value!r}"
        )
    if any(not p for p in patterns):
        raise ValueError(f"{owner}: `{argument}` holds an empty pattern: {list(patterns)!r}")
    if allow_none and not patterns:
        raise ValueError(f"{owner}: `{argument}` is empty; pass None for the default selection")
    return patterns


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@dataclass(frozen=True)
class ModuleSelector:
    """Which modules of a model a technique acts on: ``modules`` and ``exclude_modules``.

    Args:
        owner: The callback's name, for messages.
        modules: Qualified module names or ``fnmatch`` glob patterns; ``None``: the technique's default
            selection (every module its ``default`` predicate accepts).
        exclude_modules: Names or patterns of modules never to select.

    The same rules hold for every technique:

    * every pattern of ``modules`` and of ``exclude_modules`` must match at least one module name of
      the model (``ValueError`` naming the pattern and a few names of the model);
    * a module that ``modules`` names exactly (no glob characters) but the technique cannot act on is
      a ``TypeError`` (it was asked for explicitly); a glob skips such modules;
    * ``exclude_modules`` wins over ``modules``.
    """

    owner: str
    modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()

    @classmethod
    def from_arguments(cls, owner: str, modules: Any = None, exclude_modules: Any = ()) -> ModuleSelector:
        """Validate the two arguments as given to a callback (strings or sequences of strings)."""
        return cls(
            owner=owner,
            modules=check_patterns(owner, "modules", modules, allow_none=True),
            exclude_modules=check_patterns(owner, "exclude_modules", exclude_modules) or (),
        )

    def select(
        self,
        model: nn.Module,
        supported: Callable[[str, nn.Module], str | None],
        default: Callable[[str, nn.Module], bool] | None = None,
    ) -> dict[str, nn.Module]:
        """The selected modules of ``model``, by qualified name, in ``named_modules`` order.

        Args:
            model: The model; names are relative to it.
            supported: ``(name, module) -> None`` when the technique can act on the module, else a short
                reason (shown when the module was named explicitly).
            default: ``(name, module) -> bool``, the default selection among supported modules when
                ``modules`` is ``None`` (all supported modules when not given).
        """
        named = [(n, m) for n, m in model.named_modules() if n]
        names = [n for n, _ in named]
        self.check_patterns_match(names, type(model).__name__)
        selected: dict[str, nn.Module] = {}
        for name, module in named:
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude_modules):
                continue
            if self.modules is None:
                if supported(name, module) is None and (default is None or default(name, module)):
                    selected[name] = module
                continue
            hits = [p for p in self.modules if fnmatch.fnmatchcase(name, p)]
            if not hits:
                continue
            problem = supported(name, module)
            if problem is not None:
                if any(not _is_glob(p) for p in hits):
                    raise TypeError(
                        f"{self.owner}: `modules` names {name!r}, which cannot be selected: {problem}"
                    )
                continue
            selected[name] = module
        return selected

    def check_patterns_match(self, names: Sequence[str], model_name: str = "the model") -> None:
        """Raise ``ValueError`` for a pattern of either argument that matches none of ``names``."""
        for argument, patterns in (
            ("modules", self.modules or ()),
            ("exclude_modules", self.exclude_modules),
        ):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    close = [n for n in names if pattern.strip("*") and pattern.strip("*") in n][:3] or list(
                        names[:3]
                    )
                    raise ValueError(
                        f"{self.owner}: `{argument}` pattern {pattern!r} matches no module of {model_name} "
                        f"(names look like {close})"
                    )
