"""The demo's compression recipes: a table of named recipes (:data:`RECIPES`), each the technique
callbacks of the compressed fine-tune with their arguments, and the callbacks built from one.

A recipe is data: the keyword arguments of :class:`~lightning_shrink.GradualMagnitudePruning`,
:class:`~lightning_shrink.QuantizationAwareTraining` and whether
:class:`~lightning_shrink.KnowledgeDistillation` from the dense teacher is used. Adding a recipe
that needs an option a newer lightning-shrink provides (a pruning ``pattern`` or importance
``criterion``) is one more entry; :meth:`Recipe.unavailable` builds the techniques' validated
configurations from the arguments, so a recipe naming an option this installation does not know is
reported as unavailable (with the techniques' own message) instead of failing mid-run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "compression_callbacks", "get_recipe"]

#: Pruning arguments every recipe shares unless it sets them: prune from 5 % to 70 % of the steps,
#: then let the model recover; ``scope="layer"``: every layer reaches the target on its own (a
#: global threshold removes MiniLM's pooler entirely: its weights are the smallest, since the
#: sentence-transformers checkpoint never trained it, and the classifier then sees a constant).
PRUNING_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(start_step=0.05, end_step=0.7, scope="layer"))
#: The patterns a recipe's ``structured`` fractions name (whole units that ``convert`` removes).
STRUCTURED_PATTERNS = ("heads", "neurons")
#: Quantization arguments every recipe shares unless it sets them: int8 Linear layers with dynamic
#: per-token activations (what the converted model computes with), int4 embedding tables in groups
#: of 64 (the 30,522 x 384 word-embedding table is half of MiniLM's weights; as int8 it alone keeps
#: the export above 1/6 of the FP32 checkpoint).
QUANTIZATION_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(weight_bits=8, activations="dynamic", embedding_bits=4, embedding_group_size=64)
)


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if mapping is None else MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Recipe:
    """A named compression recipe of the demo.

    Attributes:
        name: The name ``--recipe`` takes.
        summary: What it does, in a few words (printed when the demo starts it).
        pruning: Keyword arguments of ``GradualMagnitudePruning`` over :data:`PRUNING_DEFAULTS`
            (``target_sparsity`` at least), or ``None`` for no pruning. ``frequency`` comes from
            the run's configuration (it depends on the budget).
        structured: Fractions of whole units to remove, by pattern: ``{"heads": 0.5, "neurons": 0.5}``
            prunes half of every layer's attention heads and half of its FFN neurons (one
            ``GradualMagnitudePruning(pattern=...)`` each, over :data:`PRUNING_DEFAULTS`), which
            ``convert`` then removes; ``None`` for none. Combines with ``pruning``.
        quantization: Keyword arguments of ``QuantizationAwareTraining`` over
            :data:`QUANTIZATION_DEFAULTS`, or ``None`` for no quantization.
        distillation: Distil from the dense teacher (``KnowledgeDistillation``).
        why: The measurement behind the recipe, printed when a run uses it (as the reason for the
            choice when it is the preset's recipe).
        criterion: The importance criterion of the structured pruning callbacks (``"magnitude"``,
            ``"taylor"``, ...: ``GradualMagnitudePruning(criterion=...)``); ``pruning`` sets its own.
    """

    name: str
    summary: str
    pruning: Mapping[str, Any] | None = None
    quantization: Mapping[str, Any] | None = None
    distillation: bool = True
    why: str = ""
    structured: Mapping[str, float] | None = None
    criterion: str = "magnitude"

    def __post_init__(self) -> None:
        if self.pruning is not None and "target_sparsity" not in self.pruning:
            raise ValueError(f"Recipe {self.name!r}: `pruning` must set `target_sparsity`")
        for kind in self.structured or {}:
            if kind not in STRUCTURED_PATTERNS:
                raise ValueError(
                    f"Recipe {self.name!r}: `structured` takes the patterns {list(STRUCTURED_PATTERNS)}, "
                    f"got {kind!r}"
                )
        object.__setattr__(self, "pruning", _frozen(self.pruning))
        object.__setattr__(self, "quantization", _frozen(self.quantization))
        object.__setattr__(self, "structured", _frozen(self.structured) if self.structured else None)

    @property
    def techniques(self) -> tuple[str, ...]:
        """The techniques used, in the order pruning, quantization, distillation."""
        used = (
            ("pruning", self.pruning is not None or self.structured is not None),
            ("quantization", self.quantization is not None),
            ("distillation", self.distillation),
        )
        return tuple(name for name, on in used if on)

    @property
    def sparsity(self) -> float | None:
        """The pruning's target sparsity, ``None`` without pruning."""
        return None if self.pruning is None else float(self.pruning["target_sparsity"])

    def pruning_arguments(self, frequency: float | int) -> dict[str, Any]:
        """The keyword arguments of ``GradualMagnitudePruning`` (defaults, the recipe's, ``frequency``)."""
        if self.pruning is None:
            raise ValueError(f"Recipe {self.name!r} does not prune")
        return {**PRUNING_DEFAULTS, "frequency": frequency, **self.pruning}

    def structured_arguments(self, frequency: float | int) -> list[dict[str, Any]]:
        """The keyword arguments of one ``GradualMagnitudePruning`` per structured pattern (named
        ``pruning-heads`` / ``pruning-neurons``)."""
        return [
            {
                **PRUNING_DEFAULTS,
                "frequency": frequency,
                "target_sparsity": fraction,
                "pattern": kind,
                "name": f"pruning-{kind}",
                "criterion": self.criterion,
            }
            for kind, fraction in (self.structured or {}).items()
        ]

    def quantization_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``QuantizationAwareTraining`` (defaults, then the recipe's)."""
        if self.quantization is None:
            raise ValueError(f"Recipe {self.name!r} does not quantize")
        args = {**QUANTIZATION_DEFAULTS, **self.quantization}
        if args.get("embedding_bits") != 4:
            args.pop("embedding_group_size", None)
        return args

    def with_overrides(
        self,
        sparsity: float | None = None,
        embedding_bits: int | None = None,
        techniques: tuple[str, ...] | None = None,
    ) -> Recipe:
        """This recipe with the demo's ``--sparsity`` / ``--embedding-bits`` / ``--techniques``
        applied (a technique the recipe lacks is added with the defaults; ``sparsity`` sets the
        pruning's target). The name says that it was changed (``sparse50-int8-kd+sparsity=0.6``)."""
        pruning = dict(self.pruning) if self.pruning is not None else None
        structured = self.structured
        quantization = dict(self.quantization) if self.quantization is not None else None
        distillation = self.distillation
        changed = []
        if techniques is not None and tuple(techniques) != self.techniques:
            if "pruning" not in techniques:
                pruning = structured = None
            elif pruning is None and structured is None:
                pruning = {"target_sparsity": sparsity if sparsity is not None else 0.5}
            if "quantization" not in techniques:
                quantization = None
            elif quantization is None:
                quantization = {}
            distillation = "distillation" in techniques
            changed.append("techniques=" + ",".join(techniques))
        if sparsity is not None and pruning is None and self.structured is not None:
            raise ValueError(
                f"--sparsity: recipe {self.name!r} removes whole heads and neurons "
                f"({', '.join(f'{k} {v:.0%}' for k, v in self.structured.items())}); it has no "
                "unstructured target sparsity to change"
            )
        if sparsity is not None and pruning is not None and pruning["target_sparsity"] != sparsity:
            pruning["target_sparsity"] = sparsity
            changed.append(f"sparsity={sparsity:g}")
        current_bits = {**QUANTIZATION_DEFAULTS, **(quantization or {})}.get("embedding_bits")
        if embedding_bits is not None and quantization is not None and current_bits != embedding_bits:
            quantization["embedding_bits"] = embedding_bits
            changed.append(f"embedding_bits={embedding_bits}")
        if not changed:
            return self
        return replace(
            self,
            name="+".join([self.name, *changed]),
            pruning=pruning,
            structured=structured,
            quantization=quantization,
            distillation=distillation,
            why="",
        )

    def unavailable(self) -> str | None:
        """Why this installation cannot run the recipe (the techniques' own validation message),
        or ``None`` when it can: each technique's configuration is built from the arguments."""
        from lightning_shrink.pruning import PruningConfig
        from lightning_shrink.quantization import QuantizationConfig

        try:
            if self.pruning is not None:
                PruningConfig(**self.pruning_arguments(0.05))
            for arguments in self.structured_arguments(0.05):
                arguments.pop("name")
                PruningConfig(**arguments)
            if self.quantization is not None:
                QuantizationConfig(**self.quantization_arguments())
        except (TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def describe(self) -> str:
        """One line: the name and the techniques with their main arguments."""
        parts = []
        if self.pruning is not None:
            args = self.pruning_arguments("*")
            pattern = args.get("pattern", "unstructured")
            criterion = args.get("criterion")
            parts.append(
                f"{args['target_sparsity']:.0%} {pattern} pruning"
                + (f" ({criterion})" if criterion else " (magnitude)")
            )
        if self.structured is not None:
            parts.append(
                " + ".join(f"{v:.0%} of the {k} removed" for k, v in self.structured.items())
                + f" ({self.criterion})"
            )
        if self.quantization is not None:
            q = self.quantization_arguments()
            parts.append(f"int{q['weight_bits']} layers, int{q.get('embedding_bits') or 32} embeddings")
        if self.distillation:
            parts.append("distillation from the dense teacher")
        return f"{self.name}: " + (" + ".join(parts) or "no compression")


#: The recipes the demo knows. The presets name one each (``DemoConfig.recipe``); ``--recipe``
#: picks another. Measurements behind the choices: docs/benchmarks.md.
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "sparse50-int8-kd",
            "50 % unstructured magnitude pruning, int8 layers, int4 embeddings, distillation",
            pruning={"target_sparsity": 0.5},
            quantization={},
            why=(
                "the smallest sparsity at which the export stores the pruned weights as a bitmask and "
                "their int8 values (tensors under half zeros are stored dense), which takes the export "
                "past 6x smaller than FP32; the int8 layers give the speed-up"
            ),
        ),
        Recipe(
            "sparse80-int8-kd",
            "80 % unstructured magnitude pruning, int8 layers, int4 embeddings, distillation",
            pruning={"target_sparsity": 0.8},
            quantization={},
            why="the smallest export of the table, at a cost in accuracy a short fine-tune does not recover",
        ),
        Recipe(
            "heads50-neurons50-int8-kd",
            "half of every layer's attention heads and FFN neurons removed, int8 layers, int4 "
            "embeddings, distillation",
            structured={"heads": 0.5, "neurons": 0.5},
            quantization={},
            why="the removed heads and neurons make every layer smaller, which adds to int8's speed-up "
            "(2.2x faster than FP32 on MiniLM's shape, against 1.6x for int8 alone), at a cost in "
            "accuracy (3.3 points below dense at the accuracy benchmark's full-size budget)",
        ),
        Recipe(
            "heads50-neurons50-taylor-int8-kd",
            "half of every layer's attention heads and FFN neurons removed, chosen by first-order "
            "Taylor importance, int8 layers, int4 embeddings, distillation",
            structured={"heads": 0.5, "neurons": 0.5},
            quantization={},
            criterion="taylor",
            why="Taylor importance in place of magnitude kept the accuracy at the quick budget on both "
            "data sets (+1.50 / +0.67 points; magnitude lost 3.83 on Rotten Tomatoes), 1.8-1.9x faster "
            "at batch 1: short of the 2x goal",
        ),
        Recipe(
            "heads50-neurons75-taylor-int8-kd",
            "half of every layer's attention heads and three quarters of its FFN neurons removed, "
            "chosen by first-order Taylor importance, int8 layers, int4 embeddings, distillation",
            structured={"heads": 0.5, "neurons": 0.75},
            quantization={},
            criterion="taylor",
            why="the best trade-off measured at this budget: within the dense accuracy on both data "
            "sets (+0.83 / +1.00 points), 2.2-2.5x faster at batch 1 and 8x smaller than FP32 (the FFN "
            "holds two thirds of the layers' weights; Taylor importance chooses what to remove)",
        ),
        Recipe(
            "int8-kd",
            "int8 layers, int4 embeddings, distillation; no pruning",
            quantization={},
            why="no pruning: the export keeps every weight (as int8) and stays above 1/6 of FP32",
        ),
    )
}
DEFAULT_RECIPE = "sparse50-int8-kd"


def get_recipe(name: str) -> Recipe:
    """The recipe ``name`` of :data:`RECIPES`, checked to be runnable here.

    Raises:
        ValueError: ``name`` is unknown (the message lists the recipes), or the installed
            lightning-shrink cannot run it (the message says why).
    """
    if name not in RECIPES:
        raise ValueError(f"--recipe: unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    reason = recipe.unavailable()
    if reason is not None:
        raise ValueError(f"--recipe: {name!r} cannot run with this lightning-shrink: {reason}")
    return recipe


def compression_callbacks(
    recipe: Recipe,
    teacher: nn.Module | None,
    prune_frequency: float | int = 0.02,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> list[Any]:
    """The callbacks of ``recipe``, in the order pruning, quantization, distillation (the order does
    not matter to the hook system; it is the order of the printed description).

    Args:
        recipe: The recipe.
        teacher: The frozen dense model to distil from; needed when the recipe distils.
        prune_frequency: Steps between mask updates (int) or a fraction of the run (float).
        temperature: Distillation temperature.
        alpha: Weight of the distillation loss.
    """
    from lightning_shrink import GradualMagnitudePruning, KnowledgeDistillation, QuantizationAwareTraining

    callbacks: list[Any] = []
    if recipe.pruning is not None:
        callbacks.append(GradualMagnitudePruning(**recipe.pruning_arguments(prune_frequency)))
    for arguments in recipe.structured_arguments(prune_frequency):
        callbacks.append(GradualMagnitudePruning(**arguments))
    if recipe.quantization is not None:
        callbacks.append(QuantizationAwareTraining(**recipe.quantization_arguments()))
    if recipe.distillation:
        if teacher is None:
            raise ValueError("compression_callbacks: distillation needs the `teacher`")
        callbacks.append(KnowledgeDistillation(teacher, temperature=temperature, alpha=alpha))
    return callbacks
