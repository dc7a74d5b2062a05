"""Hook specifications of lightning-shrink.

Every point of a fine-tuning run at which a compression or privacy step can act is a hook
declared here. Built-in techniques (pruning, quantization-aware training, distillation,
differential privacy) are ordinary plugins implementing these hooks, exactly like the plugins
that teams write themselves and publish under the ``lightning_shrink`` entry-point group.

All hooks are called with keyword arguments; an implementation may accept any subset of a
hook's arguments (pluggy passes only the ones it names). Implementations are marked with
:data:`lightning_shrink.hookimpl`. This module's docstrings are the hook reference:
``docs/hooks.md`` is generated from them.

The bridge (:class:`lightning_shrink.ShrinkCallback`) calls the hooks in this order during
``Trainer.fit``::

    shrink_plugin_registered (once per plugin, at registration)
    shrink_setup -> [LightningModule.setup, configure_model] -> shrink_configure_model
      -> [shrink_load_checkpoint: checkpoint read, before its weights load] -> [shrink_load_state]
      -> [strategy wraps the model, configure_optimizers] -> shrink_optimizer_param_groups
      -> shrink_fit_start -> shrink_ddp_comm_hook
      per epoch:   shrink_train_epoch_start ... shrink_train_epoch_end
      per batch:   shrink_train_batch_start -> training_step
                   -> shrink_loss_weight, shrink_training_loss
                   -> backward -> shrink_after_backward (every micro-batch)
                   -> shrink_before_optimizer_step -> optimizer.step()
                   -> shrink_after_optimizer_step -> shrink_metrics, shrink_progress_bar_metrics
      checkpoint:  shrink_save_state -> shrink_save_checkpoint
    shrink_fit_end -> shrink_teardown

Under strategies that restore a checkpoint after wrapping the model (Lightning's FSDP and
``ModelParallelStrategy``), ``shrink_load_checkpoint`` and ``shrink_load_state`` come after
``shrink_fit_start``, before the first batch.
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
    from lightning_shrink.types import CommHook, ParamGroup, ReportRow

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


@hookspec(historic=True)
def shrink_plugin_registered(plugin: Any, plugin_name: str, pluginmanager: ShrinkPluginManager) -> None:
    """A plugin got registered.

    This is how a plugin learns the name it is registered under, which is the namespace of
    everything it writes: metric names (``"<name>/sparsity"``), progress-bar keys, its entry in
    the checkpoint's state and the ``technique`` column of its report rows. The technique
    callbacks register their plugins as ``"pruning"``, ``"quantization"``, ``"distillation"``,
    ``"privacy"``; a second instance of the same technique in one Trainer gets ``"pruning-2"``
    (or the ``name=`` given to the callback).

    :param plugin: The plugin module or instance that was registered.
    :param plugin_name: The name under which it is registered.
    :param pluginmanager: The lightning-shrink plugin manager.

    .. note::
        This hook is incompatible with hook wrappers.

    Use in plugins
    --------------
    The hook is historic: a plugin that implements it is called once for every plugin registered
    before it (itself included) and for every plugin registered after it. Compare ``plugin is
    self`` to find your own name.
    """


# -------------------------------------------------------------------------
# Set-up and fit lifecycle hooks.
# -------------------------------------------------------------------------


@hookspec
def shrink_setup(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """The stage begins; the model may not be built yet.

    Called from the bridge's ``Callback.setup`` for every stage (``"fit"``, ``"validate"``,
    ``"test"``, ``"predict"``): **before** ``LightningModule.setup`` and ``configure_model`` run, so
    a model built there does not exist yet. Check the run's configuration (strategy, precision,
    arguments that depend on the Trainer) here; change the model in
    :func:`shrink_configure_model`.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param stage: Lightning's stage name, ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@hookspec
def shrink_configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    r"""The model exists: prepare it for the coming stage.

    Called for every stage after ``LightningModule.setup`` and ``configure_model`` (Lightning's
    recommended place to build large models, and where FSDP2 users call ``fully_shard``), and
    **before** the checkpoint of ``ckpt_path`` is read and its weights are loaded, before DDP or
    Lightning's FSDP wrap the model and before ``configure_optimizers``. This is the one place where a
    plugin may swap or wrap modules (fake-quantized layers, masks, capture hooks): the optimizer that
    is created afterwards sees the final set of parameters, and checkpoint weights load into the
    prepared modules. A model sharded with ``fully_shard`` in ``configure_model`` is already sharded
    here (its parameters are ``DTensor``\ s).

    A plugin must be idempotent here: a second ``fit`` or a ``test`` after ``fit`` calls this hook
    again on a model that is already prepared.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule, with the model ``configure_model`` built.
    :param stage: Lightning's stage name, ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@hookspec
def shrink_optimizer_param_groups(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Sequence[ParamGroup] | None:
    """Return optimizer parameter groups for tensors the plugin trains itself.

    Called once per fit, after ``configure_optimizers`` and before :func:`shrink_fit_start`. A
    plugin that learns its own tensors (importance scores, distillation projections, adapters) that
    are not parameters of the LightningModule returns them here, each group a dict as
    ``torch.optim.Optimizer.add_param_group`` takes it, with its own hyperparameters::

        return [{"params": [self.scores], "lr": 1e-2, "weight_decay": 0.0}]

    The bridge adds the groups to the first optimizer (hyperparameters not given take that
    optimizer's defaults), extends its learning-rate schedulers so the groups follow the same
    schedule relative to their own ``lr``, and under DDP averages the groups' gradients across
    ranks before each optimizer step (so every rank takes the same update). Tensors must be leaf
    tensors with ``requires_grad=True`` that are not already optimized; the groups are part of the
    optimizer's state in checkpoints, so a resumed run must return the same groups in the same
    order. Store the tensors' values in :func:`shrink_save_state` and copy restored values into
    them in place.

    :param trainer: The Lightning trainer; ``trainer.optimizers`` is populated.
    :param pl_module: The LightningModule being trained.
    :returns: A sequence of parameter-group dicts, or ``None``.
    """


@hookspec
def shrink_fit_start(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The model is wrapped by the strategy and the optimizers exist; no step has run.

    Called from Lightning's ``on_fit_start``, after the plugins' parameter groups were added.
    Plugins that must take over the optimizer or the data (differential privacy) do it here, and
    every plugin that cannot work with the run as configured must raise here, with a message that
    names the problem, rather than silently train without its effect.

    :param trainer: The Lightning trainer; ``trainer.optimizers`` is populated.
    :param pl_module: The LightningModule being trained.
    """


@hookspec(firstresult=True)
def shrink_ddp_comm_hook(trainer: pl.Trainer, pl_module: pl.LightningModule) -> CommHook | None:
    """Supply the DDP communication hook of the run.

    Called once per fit after :func:`shrink_fit_start`, only when the strategy wrapped the model in
    ``torch.nn.parallel.DistributedDataParallel``. The bridge registers the returned
    ``(state, hook)`` with ``DistributedDataParallel.register_comm_hook``. DDP takes one hook per
    model, so the bridge refuses a run in which two plugins supply one, or a plugin supplies one
    while the strategy registers its own (``DDPStrategy(ddp_comm_hook=...)``), with a message naming
    both: a hook never silently replaces another.

    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) there is no communication hook:
    gradients are reduce-scattered by FSDP itself; a plugin that must change that uses the
    ``FSDPModule`` API (``set_requires_gradient_sync``, ``set_reduce_scatter_divide_factor``) in
    :func:`shrink_fit_start`. The hook is not called there, nor on a single device.

    Stops at first non-None result, see :ref:`firstresult`.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :returns: ``(state, hook)`` or ``None``.
    """


@hookspec
def shrink_train_epoch_start(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A training epoch begins.

    Called from Lightning's ``on_train_epoch_start``; ``trainer.current_epoch`` is the epoch about to
    run. Schedules by epoch, and federated rounds (one epoch a round), start here.

    :param trainer: The Lightning trainer.
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
    like the task loss), right after the user's ``training_step`` returned: either through the
    bridge's one seam on ``training_step`` or, for modules that use
    :class:`lightning_shrink.ShrinkLossMixin`, from the module's own call to ``self.shrink_loss``.
    The final loss is ``weight * loss + sum(all returned terms)``, where ``weight`` comes from
    ``shrink_loss_weight``. Each term is logged under its name, which must start with the plugin's
    registered name (``"distillation/kl"``); names must be unique across plugins.

    This is how distillation works without the user touching ``training_step``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    :param loss: The loss the user's ``training_step`` returned (before weighting).
    :param batch: The batch given to ``training_step``.
    :param batch_idx: Index of the batch in the epoch.
    :returns: A mapping from a term's name to a scalar tensor, or ``None``.
    """


@hookspec
def shrink_after_backward(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The backward pass of one batch is done; gradients are present.

    Called from Lightning's ``on_after_backward`` once per **micro-batch**: under gradient
    accumulation several times per optimizer step, with the gradients accumulated so far (under DDP
    they are synchronized across ranks only on the last micro-batch of a step). Under AMP with a
    gradient scaler the gradients are still scaled. Importance scores that need every batch's
    gradient (movement, Taylor) accumulate here.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
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
    ``LightningModule.log_dict`` (so the logger's ``log_every_n_steps`` applies; nothing is logged
    when the Trainer has no logger). Prefix names with your plugin's registered name, e.g.
    ``"pruning/sparsity"`` (``"pruning-2/sparsity"`` for a second instance).

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_progress_bar_metrics(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> Mapping[str, float | torch.Tensor] | None:
    """Return values to show in the progress bar.

    Called at the end of every training batch, like ``shrink_metrics``. Keep it short: one
    or two numbers per plugin, such as target and actual sparsity, or epsilon spent. Prefix the keys
    with your registered name, as for metrics; a key also returned by ``shrink_metrics`` is logged
    once, to both.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_train_epoch_end(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A training epoch has ended.

    Called from Lightning's ``on_train_epoch_end``: after the epoch's last batch and its end-of-epoch
    validation, before the epoch counter advances.
    Epoch schedules advance here; a federated plugin averages the model between rounds here.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule being trained.
    """


@hookspec
def shrink_fit_end(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Training has ended; finalize.

    Called from Lightning's ``on_fit_end``. Leave a plain, trainable model behind: no forward
    hooks, no parametrizations, masks already applied. Never convert irreversibly here (a second
    ``fit`` or ``Trainer.test(ckpt_path=...)`` must still work): conversion is the explicit
    :func:`lightning_shrink.convert`. A plugin whose run ended short of what it reports (a target
    sparsity not reached) says so here.

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

    Called from the bridge's ``Callback.on_save_checkpoint``. Store plain data (tensors, numbers,
    strings, lists, dicts) under your plugin's registered name, e.g. ``state["pruning"] = {...}``
    (``state["pruning-2"]`` for a second instance). The mapping is saved as
    ``checkpoint["lightning_shrink"]``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param state: The mapping to write into.
    """


@hookspec
def shrink_load_state(trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any]) -> None:
    """Restore plugin state from a checkpoint.

    Called from the bridge's ``Callback.on_load_checkpoint`` when Lightning restores a checkpoint
    (``ckpt_path=``): after :func:`shrink_configure_model` and **after** the checkpoint's weights were
    loaded into the model (Lightning restores callbacks after the model), before the first batch.
    Under most strategies this is before :func:`shrink_fit_start`; under strategies that restore
    after wrapping the model (FSDP, ``ModelParallelStrategy``) it is after it, so apply restored
    state at the first batch. Use ``.get()`` with defaults for keys that older versions of your
    plugin did not write. A plugin whose configuration changed since the checkpoint was written
    either refuses to resume (naming what changed) or says how it adapts.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param state: ``checkpoint["lightning_shrink"]`` (empty for checkpoints written without it).
    """


@hookspec
def shrink_save_checkpoint(
    trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: MutableMapping[str, Any]
) -> None:
    """See and edit the whole checkpoint before it is written.

    Called from the bridge's ``Callback.on_save_checkpoint`` after :func:`shrink_save_state`, with
    the dict Lightning is about to write: ``"state_dict"``, ``"optimizer_states"``, ``"callbacks"``,
    ``"lightning_shrink"``... A plugin may drop entries it can rebuild (the frozen base weights of an
    adapter run) or add its own top-level entries. What it removes it must put back in
    :func:`shrink_load_checkpoint`.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param checkpoint: The checkpoint dict; edit it in place.
    """


@hookspec
def shrink_load_checkpoint(
    trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: MutableMapping[str, Any]
) -> None:
    """See and edit the whole checkpoint after it is read, before anything is restored from it.

    Called right after the strategy read the checkpoint of ``ckpt_path`` (for every stage), before
    its weights are loaded into the model and before :func:`shrink_load_state`. Put back what
    :func:`shrink_save_checkpoint` removed, or migrate entries of older versions. Strategies that
    load sharded checkpoints in place (``ModelParallelStrategy``) pass the dict they return, which
    may not hold ``"state_dict"``.

    :param trainer: The Lightning trainer.
    :param pl_module: The LightningModule.
    :param checkpoint: The checkpoint dict; edit it in place.
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
    :returns: :class:`lightning_shrink.ReportRow` objects (``technique`` set to the plugin's registered
        name), or ``None``.
    """
