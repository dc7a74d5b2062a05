"""Hook specifications of lightning-shrink.

Every point of a fine-tuning run at which a compression or privacy step can act is a hook
declared here. Built-in techniques (pruning, quantization-aware training, distillation,
differential privacy) are ordinary plugins implementing these hooks, exactly like the plugins
that teams write themselves and publish under the ``lightning_shrink`` entry-point group.

All hooks are called with keyword arguments; an implementation may accept any subset of a
hook's arguments (pluggy passes only the ones it names). Implementations are marked with
:data:`lightning_shrink.hookimpl`.

The bridge (:class:`lightning_shrink.ShrinkCallback`) calls the hooks in this order during
``Trainer.fit``::

    shrink_setup -> [shrink_load_state] -> shrink_fit_start
      per batch:   shrink_train_batch_start -> training_step
                   -> shrink_loss_weight, shrink_training_loss
                   -> backward -> shrink_before_optimizer_step -> optimizer.step()
                   -> shrink_after_optimizer_step -> shrink_metrics, shrink_progress_bar_metrics
      checkpoint:  shrink_save_state
    shrink_fit_end -> shrink_teardown
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from lightning_shrink.manager import ShrinkPluginManager
    from lightning_shrink.report import ReportRow

__all__ = ["hookimpl", "hookspec"]

PROJECT_NAME = "lightning_shrink"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Initialization hooks.
# -------------------------------------------------------------------------


@hookspec(historic=True)
def shrink_addhooks(pluginmanager: ShrinkPluginManager) -> None:
    """Called at plugin registration time to allow adding new hooks via a call to
    ``pluginmanager.add_hookspecs(module_or_class)``.

    :param pluginmanager: The lightning-shrink plugin manager.

    .. note::
        This hook is incompatible with hook wrappers.

    Use in plugins
    --------------
    Any plugin can implement it. The hook is historic: a plugin registered later still receives
    the call.
    """


# -------------------------------------------------------------------------
# Set-up and fit lifecycle hooks.
# -------------------------------------------------------------------------


@hookspec
def shrink_setup(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """Prepare the model for the coming stage.

    Called from Lightning's ``setup`` for every stage (``"fit"``, ``"validate"``, ``"test"``,
    ``"predict"``): after ``LightningModule.setup``'s callbacks ran, **before**
    ``configure_optimizers``, before DDP or FSDP wrap the model, and before the weights of a
    ``ckpt_path`` are loaded. This is the one place where a plugin may swap or wrap modules
    (fake-quantized layers, projections, masks): the optimizer that is created afterwards sees the
    final set of parameters, and checkpoint weights load into the prepared modules.

    A plugin must be idempotent here: a second ``fit`` or a ``test`` after ``fit`` calls this hook
    again on a model that is already prepared.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param stage: Lightning's stage name, ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@hookspec
def shrink_fit_start(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The model is wrapped by the strategy and the optimizers exist; no step has run.

    Called from Lightning's ``on_fit_start``. Plugins that must take over the optimizer or the
    data (differential privacy) do it here, and every plugin that cannot work with the run as
    configured must raise here, with a message that names the problem, rather than silently train
    without its effect.

    :param trainer: The Lightning trainer; ``trainer.optimizers`` is populated.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_train_batch_start(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
) -> None:
    """A training batch is about to reach ``training_step``.

    Plugins may modify a mutable ``batch`` (a dict or a list) in place, for instance to redact
    fields before the model sees them.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param batch: The batch, already on the device.
    :param batch_idx: Index of the batch in the epoch.
    """


@hookspec
def shrink_loss_weight(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Return a weight for the module's own training loss.

    Called once per ``training_step``, before ``shrink_training_loss``. The module's loss is
    multiplied by the product of all returned weights (``None`` counts as 1). Distillation returns
    ``1 - alpha`` here and adds ``alpha`` times its own loss through
    ``shrink_training_loss``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_training_loss(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loss: torch.Tensor,
    batch: Any,
    batch_idx: int,
) -> Mapping[str, torch.Tensor] | None:
    """Return extra loss terms to add to the module's training loss.

    Called inside ``training_step`` (so inside DDP's forward: the terms' gradients are synchronized
    like the task loss), right after the user's ``training_step`` returned. The final loss is
    ``weight * loss + sum(all returned terms)``, where ``weight`` comes from
    ``shrink_loss_weight``. Each term is logged as ``shrink/<name>``; names must be unique
    across plugins.

    This is how distillation works without the user touching ``training_step``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param loss: The loss the user's ``training_step`` returned (before weighting).
    :param batch: The batch given to ``training_step``.
    :param batch_idx: Index of the batch in the epoch.
    :returns: A mapping from a term's name to a scalar tensor, or ``None``.
    """


@hookspec
def shrink_before_optimizer_step(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> None:
    """Gradients are ready and the optimizer is about to step.

    Called from Lightning's ``on_before_optimizer_step``: once per *real* optimizer step (not per
    batch under gradient accumulation), after AMP has unscaled the gradients. Clip, add noise or
    mask gradients here.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param optimizer: The optimizer about to step.
    """


@hookspec
def shrink_after_optimizer_step(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> None:
    """The optimizer has updated the parameters.

    Called from a step post-hook registered on the optimizer, so it fires exactly once per
    parameter update: once per step under gradient accumulation, and **not at all** when AMP's
    gradient scaler skips a step because of non-finite gradients. Re-apply masks and advance
    schedules here.

    ``trainer.global_step`` has not yet been incremented for this step when the hook runs: the
    step that just completed is number ``trainer.global_step + 1``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param optimizer: The optimizer that stepped.
    """


@hookspec
def shrink_metrics(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Mapping[str, float | torch.Tensor] | None:
    """Return metrics to log.

    Called at the end of every training batch; the bridge logs the union of all results with
    ``LightningModule.log_dict`` (so the logger's ``log_every_n_steps`` applies). Prefix names with
    your plugin's name, e.g. ``"pruning/sparsity"``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_progress_bar_metrics(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Mapping[str, float | torch.Tensor] | None:
    """Return values to show in the progress bar (and not send to the logger).

    Called at the end of every training batch, like ``shrink_metrics``. Keep it short: one
    or two numbers per plugin, such as target and actual sparsity, or epsilon spent.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_fit_end(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Training has ended; finalize.

    Called from Lightning's ``on_fit_end``. Leave a plain, trainable model behind: no forward
    hooks, no parametrizations, masks already applied. Never convert irreversibly here (a second
    ``fit`` or ``Trainer.test(ckpt_path=...)`` must still work): conversion is the explicit
    :func:`lightning_shrink.convert`.

    :param trainer: The Lightning trainer.
    :param pl_module: The trained LightningModule.
    """


@hookspec
def shrink_teardown(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """Release what the stage held (teacher copies, handles, caches).

    Called from Lightning's ``teardown`` for every stage, also after an exception.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param stage: Lightning's stage name.
    """


# -------------------------------------------------------------------------
# Checkpoint hooks.
# -------------------------------------------------------------------------


@hookspec
def shrink_save_state(
    trainer: pl.Trainer, pl_module: pl.LightningModule, state: MutableMapping[str, Any]
) -> None:
    """Save plugin state into the checkpoint.

    Called from Lightning's ``on_save_checkpoint``. Store plain data (tensors, numbers, strings,
    lists, dicts) under a key unique to your plugin, e.g. ``state["pruning"] = {...}``. The
    mapping is saved as ``checkpoint["lightning_shrink"]``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param state: The mapping to write into.
    """


@hookspec
def shrink_load_state(trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]) -> None:
    """Restore plugin state from a checkpoint.

    Called when Lightning restores a checkpoint (``ckpt_path=``), after ``shrink_setup`` and
    **before** the checkpoint's weights are loaded into the model. Use ``.get()`` with defaults
    for keys that older versions of your plugin did not write.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param state: ``checkpoint["lightning_shrink"]`` (empty for checkpoints written without it).
    """


# -------------------------------------------------------------------------
# Conversion, export and report hooks (called outside the Trainer).
# -------------------------------------------------------------------------


@hookspec
def shrink_convert(model: nn.Module) -> None:
    """Convert a trained model, in place, into its compressed inference form.

    Called by :func:`lightning_shrink.convert`. Quantization replaces fake-quantized layers with
    real int8 ones here. Plugins that have nothing to convert do not implement it.

    :param model: The model to convert (a copy of the user's, unless ``inplace=True``).
    """


@hookspec
def shrink_export(
    model: nn.Module, tensors: MutableMapping[str, torch.Tensor], metadata: MutableMapping[str, Any]
) -> None:
    """Encode the model's tensors for export.

    Called by :func:`lightning_shrink.export` with ``tensors`` holding the model's state dict.
    A plugin may replace entries by a more compact encoding (int8 values and scales, a sparse
    layout) and must record under ``metadata`` (JSON-serializable) how to decode them in
    ``shrink_load``.

    :param model: The model being exported.
    :param tensors: Name to tensor; written to ``model.safetensors``.
    :param metadata: JSON-serializable description; written to ``shrink_config.json``.
    """


@hookspec
def shrink_load(tensors: MutableMapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Decode tensors written by ``shrink_export``.

    Called by :func:`lightning_shrink.load`, in the reverse order of ``shrink_export``.

    :param tensors: Name to tensor as read from the export; decode in place.
    :param metadata: The export's ``shrink_config.json``.
    """


@hookspec
def shrink_load_model(model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Give a rebuilt model the compressed module structure its exported tensors belong to.

    Called by :func:`lightning_shrink.load` after the architecture was rebuilt with its original
    (float) layers and after ``shrink_load`` decoded the tensors, **before** the tensors are loaded
    into the model with ``strict=True``. Quantization puts its int8 layers back here (their
    state holds int8 weights and scales, not float weights).

    :param model: The rebuilt model; modify it in place.
    :param metadata: The export's ``shrink_config.json``.
    """


@hookspec
def shrink_report_rows(trainer: pl.Trainer | None, model: nn.Module) -> Sequence[ReportRow] | None:
    """Return rows for the compression report.

    Called by :func:`lightning_shrink.report`.

    :param trainer: The trainer the report is made for, or ``None`` for a bare model.
    :param model: The model (the LightningModule when a trainer is given).
    :returns: :class:`lightning_shrink.report.ReportRow` objects, or ``None``.
    """
