"""The demo's configuration: sizes and options of a run (:class:`DemoConfig`) and the presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lightning_shrink.config import check_choice, check_number
from lightning_shrink.demo.model import MINILM
from lightning_shrink.demo.recipe import DEFAULT_RECIPE, RECIPES, Recipe, get_recipe

__all__ = ["PRESETS", "TECHNIQUES", "DemoConfig", "DemoError", "check_option"]


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message names the option to fix."""


#: The demo's techniques and the callback class of each.
TECHNIQUES: dict[str, str] = {
    "pruning": "GradualMagnitudePruning",
    "quantization": "QuantizationAwareTraining",
    "distillation": "KnowledgeDistillation",
}

#: What each numeric field accepts (the arguments of :func:`lightning_shrink.config.check_number`).
_NUMBERS: dict[str, dict[str, Any]] = {
    "train_size": dict(low=1, integer=True, allow_none=True),
    "test_size": dict(low=1, integer=True, allow_none=True),
    "teacher_steps": dict(low=1, integer=True),
    "student_steps": dict(low=1, integer=True),
    "batch_size": dict(low=1, integer=True),
    "max_length": dict(low=1, integer=True),
    "lr": dict(low=0, low_inclusive=False),
    "student_lr": dict(low=0, low_inclusive=False),
    "sparsity": dict(low=0, high=1, low_inclusive=False, high_inclusive=False),
    "embedding_group_size": dict(low=1, integer=True, allow_none=True),
    "prune_frequency": dict(low=0, high=1, low_inclusive=False),
    "temperature": dict(low=0, low_inclusive=False),
    "alpha": dict(low=0, high=1),
    "latency_repetitions": dict(low=1, integer=True),
    "latency_inputs": dict(low=1, integer=True),
    "seed": dict(low=0, integer=True),
}
_CHOICES: dict[str, tuple[Any, ...]] = {"embedding_bits": (8, 4), "recipe": tuple(RECIPES)}
#: Fields whose ``None`` means "the recipe's value".
_FROM_RECIPE = ("sparsity", "embedding_bits", "techniques")


def check_option(owner: str, argument: str, field: str, value: Any) -> Any:
    """Check ``value`` for the :class:`DemoConfig` field ``field`` and return it; the message of the
    ``TypeError`` / ``ValueError`` names ``owner`` and ``argument`` (``--sparsity`` on the command
    line, ``sparsity`` in Python)."""
    if field in _FROM_RECIPE and value is None:
        return None
    if field in _NUMBERS:
        return check_number(owner, argument, value, **_NUMBERS[field])
    if field in _CHOICES:
        return check_choice(owner, argument, value, _CHOICES[field])
    if field == "techniques":
        if isinstance(value, str) or not all(isinstance(t, str) for t in value):
            raise TypeError(f"{owner}: `{argument}` must be a sequence of technique names, got {value!r}")
        for name in value:
            if name not in TECHNIQUES:
                raise ValueError(
                    f"{owner}: `{argument}`: unknown technique {name!r} (choose from {', '.join(TECHNIQUES)})"
                )
        if not value or len(set(value)) != len(value):
            raise ValueError(f"{owner}: `{argument}` must name each technique once, got {list(value)}")
        return tuple(value)
    if field == "model_name":
        if not isinstance(value, str) or not value:
            raise TypeError(f"{owner}: `{argument}` must be a non-empty str, got {value!r}")
        return value
    raise ValueError(f"{owner}: unknown option {argument!r}")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and options of a demo run (see :data:`PRESETS`), validated at construction.

    Attributes:
        model_name: ``"minilm"`` or ``"tiny"`` (a random 2-layer BERT, for smoke tests).
        train_size: Training examples used (``None``: all).
        test_size: Test examples used (``None``: all).
        teacher_steps: Optimizer steps of the dense fine-tune.
        student_steps: Optimizer steps of the compressed fine-tune.
        batch_size: Training batch size.
        max_length: Tokens per example.
        lr: Peak learning rate of the dense fine-tune.
        student_lr: Peak learning rate of the compressed fine-tune.
        recipe: The compression recipe, a name of :data:`~lightning_shrink.demo.recipe.RECIPES`.
        sparsity: Target sparsity of the pruning, in ``(0, 1)``; ``None``: the recipe's.
        embedding_bits: Bits of the quantized embedding tables, ``8`` or ``4``; ``None``: the
            recipe's (int4 in groups of ``embedding_group_size``; the word-embedding table is half
            of MiniLM's weights, and int8 tables leave the export at 5.8x smaller than FP32).
        embedding_group_size: Elements of an embedding row per scale when ``embedding_bits=4``.
        prune_frequency: Steps between mask updates, as a fraction of the student's steps.
        temperature: Distillation temperature.
        alpha: Weight of the distillation loss.
        latency_repetitions: Interleaved repetitions of the latency measurement.
        latency_inputs: Test examples per latency repetition (batch size 1).
        seed: Seed of the split, the subsets, the shuffling and the initialization.
        techniques: The techniques of the compressed fine-tune, a subset of :data:`TECHNIQUES`;
            ``None``: the recipe's.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: a field is out of range, or ``techniques`` names an unknown technique.
    """

    model_name: str = MINILM
    train_size: int | None = None
    test_size: int | None = None
    teacher_steps: int = 500
    student_steps: int = 700
    batch_size: int = 16
    max_length: int = 64
    lr: float = 5e-5
    student_lr: float = 5e-5
    recipe: str = DEFAULT_RECIPE
    sparsity: float | None = None
    embedding_bits: int | None = None
    embedding_group_size: int | None = 64
    prune_frequency: float = 0.02
    temperature: float = 2.0
    alpha: float = 0.5
    latency_repetitions: int = 30
    latency_inputs: int = 8
    seed: int = 0
    techniques: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(
                self, f.name, check_option("DemoConfig", f.name, f.name, getattr(self, f.name))
            )

    def compression_recipe(self) -> Recipe:
        """The recipe this run uses: :attr:`recipe` with :attr:`sparsity`, :attr:`embedding_bits`
        and :attr:`techniques` applied where they are set.

        Raises:
            ValueError: the installed lightning-shrink cannot run the recipe.
        """
        recipe = get_recipe(self.recipe).with_overrides(self.sparsity, self.embedding_bits, self.techniques)
        reason = recipe.unavailable()
        if reason is not None:
            raise ValueError(f"DemoConfig: recipe {recipe.name!r} cannot run: {reason}")
        if recipe.quantization is not None and recipe.quantization_arguments().get("embedding_bits") == 4:
            recipe = replace(
                recipe,
                quantization={**recipe.quantization, "embedding_group_size": self.embedding_group_size},
            )
        return recipe


#: Sizes: ``quick`` ends within about 5 minutes on 2 CPU cores (2.5 measured), ``default`` within
#: about 20 (15 measured); ``smoke`` trains a tiny random BERT on a few dozen examples (for tests).
#: ``quick`` uses the ``heads50-neurons75-taylor-int8-kd`` recipe
#: (:data:`~lightning_shrink.demo.recipe.RECIPES`): at its budget it kept the dense accuracy on both
#: named data sets and was 2.2-2.5x faster at batch 1 and 8x smaller, where ``sparse50-int8-kd``
#: (kept by ``default``, whose budget the structured recipe has not been measured at) was 1.4-1.8x
#: faster and 6.6x smaller (docs/benchmarks.md).
PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "quick": DemoConfig(
        train_size=2000,
        test_size=600,
        teacher_steps=96,
        student_steps=100,
        lr=1e-4,
        student_lr=1e-4,
        prune_frequency=0.05,
        latency_repetitions=40,
        recipe="heads50-neurons75-taylor-int8-kd",
    ),
    "smoke": DemoConfig(
        model_name="tiny",
        train_size=48,
        test_size=24,
        teacher_steps=4,
        student_steps=6,
        batch_size=8,
        max_length=32,
        lr=1e-3,
        student_lr=1e-3,
        embedding_group_size=16,
        latency_repetitions=3,
        latency_inputs=2,
    ),
}
