"""The :class:`QuantizationAwareTraining` callback: a validated configuration plus its plugin."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning_shrink.config import Step
from lightning_shrink.lightning.technique import TechniqueCallback
from lightning_shrink.quantization.config import QuantizationConfig
from lightning_shrink.quantization.plugin import QuantizationPlugin

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(TechniqueCallback):
    """Quantization-aware training: fake-quantize layers while fine-tuning, convert to int8 after.

    Before the optimizer exists, before DDP wraps the model and before checkpoint weights load
    (``shrink_configure_model``, so also for a model built in ``configure_model``), the selected
    layers are prepared in place: they keep their ``weight``/``bias`` Parameters and ``state_dict``
    keys, and their forward fake-quantizes the weight (symmetric, per output channel,
    ``scale = max|w| / 127``) and the input exactly as the x86 int8 kernel of the converted model
    quantizes it. Gradients pass straight through. The model stays a trainable float model after
    ``fit``; :func:`lightning_shrink.convert` turns it into real int8 layers, whose outputs equal the
    fake-quantized model's up to float rounding, and :func:`lightning_shrink.export` writes it.

    Several instances may quantize disjoint parts of one model with different settings (attention
    int8, MLP int4...); each owns its layers, metrics, checkpoint state and report rows, under its
    registered name. Selections that overlap are refused at set-up, naming both.

    Args:
        weight_bits: ``8`` (int8, per output channel) or ``4`` (int4, per output channel or per
            group of ``group_size`` input features) for linear layers and convolutions.
        activations: ``"dynamic"``: 7-bit affine per tensor, the scale and zero point from the tensor's
            own range, as the x86 int8 kernel quantizes its input; ``"static"``: 7-bit affine per
            tensor with a range observed by a moving-average min/max observer (all-reduced across
            processes in distributed runs); ``None``: weight-only.
        start_step: Step from which fake quantization is on (before it, layers run in float; static
            observers already observe). An int counts optimizer steps, a float in ``[0, 1]`` is a
            fraction of the run. Evaluation outside ``fit`` always quantizes.
        freeze_observers_step: Step from which static activation ranges stop updating
            (``activations="static"`` only); int steps or a fraction. ``None``: never freeze.
        freeze_bn_step: Step from which the model's batch-norm layers use and keep their running
            statistics (they are put in eval mode); int steps or a fraction. ``None``: never.
        modules: Names or glob patterns (``"model.bert.encoder.*"``) of the layers to quantize,
            relative to the LightningModule. ``None``: every supported layer (``nn.Linear``,
            ``nn.Conv1d/2d/3d``, transformers' ``Conv1D`` and, with ``embeddings``, ``nn.Embedding``).
            Every pattern must match a module; an exact name of a layer that cannot be quantized is a
            ``TypeError``.
        exclude_modules: Names or glob patterns of layers to keep in float (e.g. ``["*classifier*"]``).
        embeddings: Quantize ``nn.Embedding`` tables. They hold about half of a small BERT's
            weights, so a small export needs them. A ``Linear`` that shares an embedding's table (a
            tied language-model head) is quantized with the table and computes with its values.
        group_size: Input features per scale for ``weight_bits=4`` (e.g. 32, 64, 128); ``None``:
            one scale per output channel.
        averaging_constant: Moving-average constant of the static observers.
        embedding_bits: ``8`` (int8, one scale per row) or ``4`` (int4, one scale per row or per
            ``embedding_group_size`` elements of a row). An int4 table is exported two values per
            byte: for all-MiniLM-L6-v2 the word embeddings shrink from 11.7 MB (int8) to 6.6 MB.
        embedding_group_size: Elements of an embedding row per scale for ``embedding_bits=4``
            (must divide the embedding dimension); ``None``: one scale per row.
        adapters: What a layer under a peft LoRA adapter simulates: ``"merged"`` fake-quantizes the
            merged weight ``W + s·B·A`` (what ``convert``/``export`` with ``merge_adapters=True``
            deploy), ``"base"`` the frozen base weight only, the adapter staying in float (what
            ``merge_adapters=False`` deploys: int8 base + float adapters). See docs/peft.md.
        name: The plugin's registered name, the namespace of its metrics, checkpoint state and report
            rows; ``None``: ``"quantization"`` (``"quantization-2"``... for further instances).

    Raises:
        TypeError: an argument of the wrong type (at construction).
        ValueError: an argument out of range or contradicting another (at construction); a pattern
            that matches no module, a group size that does not divide a layer, a selection that
            overlaps another instance's (at set-up).

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
        start_step: Step = 0,
        freeze_observers_step: Step | None = None,
        freeze_bn_step: Step | None = None,
        modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] = (),
        embeddings: bool = True,
        group_size: int | None = None,
        averaging_constant: float = 0.01,
        embedding_bits: int = 8,
        embedding_group_size: int | None = None,
        adapters: str = "merged",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.config = QuantizationConfig(
            weight_bits=weight_bits,
            activations=activations,
            start_step=start_step,
            freeze_observers_step=freeze_observers_step,
            freeze_bn_step=freeze_bn_step,
            modules=modules,  # type: ignore[arg-type]  # normalized to a tuple by the config
            exclude_modules=exclude_modules,  # type: ignore[arg-type]
            embeddings=embeddings,
            group_size=group_size,
            averaging_constant=averaging_constant,
            embedding_bits=embedding_bits,
            embedding_group_size=embedding_group_size,
            adapters=adapters,
        )

    @property
    def settings(self) -> QuantizationConfig:
        """Deprecated: the configuration is :attr:`config`."""
        warnings.warn(
            "QuantizationAwareTraining.settings is deprecated; use QuantizationAwareTraining.config",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.config

    def make_plugin(self) -> QuantizationPlugin:
        """The plugin that prepares, switches and checkpoints this callback's layers."""
        return QuantizationPlugin(self.config)
