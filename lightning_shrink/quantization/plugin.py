"""The plugin of one :class:`~lightning_shrink.QuantizationAwareTraining`: prepares its layers,
switches them on schedule, checkpoints and reports them."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_shrink.config import resolve_step
from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning.technique import TechniquePlugin
from lightning_shrink.quantization.config import OWNER, LayerSettings, QuantizationConfig
from lightning_shrink.quantization.fake_layers import is_prepared
from lightning_shrink.quantization.prepare import prepare_qat
from lightning_shrink.types import ReportRow

__all__ = ["STATE_VERSION", "QuantizationPlugin"]

#: Version of the checkpoint state. 1: settings simulated dynamic activations per token; 2: per
#: tensor, 7-bit, as the x86 int8 kernel.
STATE_VERSION = 2

_STEPS = ("start_step", "freeze_observers_step", "freeze_bn_step")


class QuantizationPlugin(TechniquePlugin):
    """Hook implementations of one :class:`~lightning_shrink.QuantizationAwareTraining`.

    Args:
        config: The callback's configuration.

    Attributes:
        layers: The names of the layers it prepared (relative to the LightningModule).
        settings: The object its layers share; its switches turn them on and off.
    """

    default_name = "quantization"

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__(config)
        self.config: QuantizationConfig = config
        self.layers: list[str] = []
        self.settings = LayerSettings(config, self.name)
        self._steps: dict[str, int | None] = {}

    def _update(self, step: int, training: bool) -> None:
        s = self.settings
        start = self._steps.get("start_step") or 0
        freeze = self._steps.get("freeze_observers_step")
        s.fake_quant_enabled = (not training) or step >= start
        s.observer_enabled = freeze is None or step < freeze

    @hookimpl
    def shrink_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap in fake-quantized layers (before optimizers, DDP and checkpoint weights)."""
        if self.settings.owner != self.name:
            self.settings = LayerSettings(self.config, self.name)
        peers = [p.settings for p in self.peers() if isinstance(p, QuantizationPlugin)]
        self.layers = prepare_qat(
            pl_module, self.config, owner=self.name, peers=peers, settings=self.settings
        )
        if not self.layers:
            raise ValueError(
                f"{OWNER} {self.name!r} found no layer to quantize in {type(pl_module).__name__} "
                "(supported: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, transformers' Conv1D)"
            )
        self.settings.fake_quant_enabled = True  # evaluation quantizes; fit switches at its start
        self.settings.sync_observers = False

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve fractional steps; all-reduce static observer ranges across processes."""
        specs = {name: getattr(self.config, name) for name in _STEPS}
        fractions = any(isinstance(v, float) for v in specs.values())
        total = float(trainer.estimated_stepping_batches) if fractions else float("inf")
        self._steps = {
            name: None if value is None else resolve_step(OWNER, name, value, total)
            for name, value in specs.items()
        }
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.settings.sync_observers = (
            self.config.activations == "static" and distributed and torch.distributed.get_world_size() > 1
        )
        self._update(trainer.global_step, training=True)

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn fake quantization on at `start_step`; freeze observers and batch norm at theirs."""
        step = trainer.global_step
        self._update(step, training=True)
        freeze_bn = self._steps.get("freeze_bn_step")
        if freeze_bn is not None and step >= freeze_bn:
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    m.eval()

    @hookimpl
    def shrink_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the layers prepared and quantizing (evaluation after fit sees the int8 model)."""
        self._update(trainer.global_step, training=False)
        self.settings.sync_observers = False

    @hookimpl
    def shrink_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Log whether fake quantization is on, as `<name>/fake_quant_enabled`."""
        return {self.key("fake_quant_enabled"): float(self.settings.fake_quant_enabled)}

    @hookimpl
    def shrink_save_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: MutableMapping[str, Any]
    ) -> None:
        """Record the arithmetic and the prepared layers under the plugin's name."""
        state[self.name] = {
            "version": STATE_VERSION,
            "scheme": self.config.scheme(),
            "layers": list(self.layers),
        }

    @hookimpl
    def shrink_load_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]
    ) -> None:
        """Refuse to resume with other settings or other layers than the checkpoint's."""
        saved = state.get(self.name)
        if saved is None:
            return
        mine = self.config.scheme()
        # Settings added later have defaults that reproduce the older behaviour.
        theirs = {**QuantizationConfig().scheme(), **saved.get("scheme", saved.get("settings", mine))}
        layers = saved.get("layers", self.layers)
        if theirs != mine or sorted(layers) != sorted(self.layers):
            differ = sorted(set(layers) ^ set(self.layers))
            raise ValueError(
                f"{OWNER} {self.name!r}: the checkpoint was trained with a different quantization "
                f"configuration (settings {theirs} vs {mine}; layers that differ: {differ[:5]}); resume "
                "with the callback arguments (and names) of the original run"
            )
        if saved.get("version", 1) < 2 and mine["activations"] is not None:
            rank_zero_warn(
                f"{OWNER} {self.name!r}: the checkpoint was written by a version that simulated dynamic "
                "activations per token and static ones with 8 bits; training continues with 7-bit "
                "per-tensor activations, which the converted model's int8 kernel computes"
            )

    @hookimpl
    def shrink_report_rows(self, trainer: pl.Trainer | None, model: nn.Module) -> list[ReportRow] | None:
        """Report the layers this plugin fake-quantizes and their bits."""
        mine = set(self.layers)
        layers = [m for n, m in model.named_modules() if n in mine and is_prepared(m)]
        if not layers:
            return None
        rows = [
            ReportRow(self.name, "fake-quantized layers", len(layers)),
            ReportRow(self.name, "weight bits", self.config.weight_bits),
            ReportRow(self.name, "activations", str(self.config.activations)),
        ]
        if any(isinstance(m, nn.Embedding) for m in layers):
            rows.append(ReportRow(self.name, "embedding bits", self.config.embedding_bits))
        return rows
