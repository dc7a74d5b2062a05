"""The :class:`GradualMagnitudePruning` callback: a validated configuration and its plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_shrink.lightning.technique import TechniqueCallback
from lightning_shrink.pruning.config import PruningConfig
from lightning_shrink.pruning.plugin import PruningPlugin

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["GradualMagnitudePruning", "PruningPlugin"]


class GradualMagnitudePruning(TechniqueCallback):
    r"""Prune weights by magnitude while the model is fine-tuned, gradually, following a schedule.

    After every real optimizer step the masks are re-applied in place (``weight *= mask``), so
    pruned weights stay exactly zero while parameter names and ``state_dict`` keys do not change:
    the trained model loads with a plain ``load_state_dict``. The optimizer state of pruned weights
    (momentum, Adam moments) is zeroed whenever the masks change and at fit end, so the optimizer
    cannot revive them (``mask_gradients=True`` keeps it zero at every step). Masks are recomputed from the
    weights' magnitudes only at update steps; masks never shrink during a run (a pruned weight stays
    pruned).

    Args:
        target_sparsity: Final fraction of zeros in the selected weights, in ``[0, 1)``. For an
            ``"N:M"`` pattern it must equal ``1 - N/M``.
        initial_sparsity: Sparsity at ``start_step`` (``"cubic"``, ``"linear"``).
        start_step: First mask update, after that many optimizer steps (``0``: before the first
            step). An ``int`` counts optimizer steps (not batches: with ``accumulate_grad_batches``
            a step is several batches); a ``float`` in ``[0, 1]`` is a fraction of the run's total
            optimizer steps (``trainer.estimated_stepping_batches``), resolved when fit starts.
        end_step: The step at which ``target_sparsity`` is reached; ``int`` or fraction as above.
            ``None``: the last step of the run. Ending before the run ends (e.g. ``0.75``) leaves
            steps for the model to recover.
        frequency: Optimizer steps between mask updates (``int``), or a fraction of the run's steps
            (``float``). Default ``0.02``: about 50 updates over a run.
        schedule: ``"cubic"`` (Zhu & Gupta 2017:
            :math:`s_t = s_f + (s_i - s_f)(1 - \frac{t - t_0}{n\Delta t})^3`), ``"linear"``,
            ``"constant"`` (one shot at ``start_step``) or a callable ``step -> sparsity``.
        pattern: ``"unstructured"``; ``"N:M"`` semi-structured (``"2:4"``, ``"4:8"``...): at most
            **N non-zero weights kept** in every group of M consecutive weights along the input
            dimension, PyTorch's ``to_sparse_semi_structured`` layout (``"2:4"`` = 2 of every 4
            kept, 50% sparsity); or ``"rows"``: whole output rows (output units / channels), scored
            by their root-mean-square. ``"heads"`` / ``"neurons"``: whole attention heads / FFN
            intermediate neurons of BERT-family, GPT-2 and Llama/Qwen2 models (for Llama whole KV
            groups); ``target_sparsity`` is then the fraction of heads (neurons) pruned, and
            :func:`~lightning_shrink.convert` removes them physically (see
            :mod:`lightning_shrink.pruning.structured`). Prune both with two instances.
        scope: ``"global"``: one magnitude threshold across all selected weights, or ``"layer"``:
            every weight reaches the scheduled sparsity on its own.
        modules: Qualified module names or ``fnmatch`` glob patterns of the modules to prune, e.g.
            ``["model.bert.encoder.*"]``. ``None``: every module of ``module_types`` except the
            output layer (the last selected module, and the model's ``get_output_embeddings()``)
            and weights tied to modules of other types (embeddings). With explicit ``modules``
            every matching module is pruned, the output layer included. Every pattern must select at
            least one parameter, and a module named exactly must be one of ``module_types``.
        exclude_modules: Names or glob patterns of modules never to prune; each must match a module.
        module_types: Module classes to prune. ``None``: ``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d``, ``nn.Conv3d`` and transformers' ``Conv1D`` (GPT-2). Add
            ``nn.Embedding`` to prune embeddings.
        parameter_names: Names of the parameters to prune within a selected module. Default
            ``("weight",)``; biases and norms are not pruned unless named here. Frozen
            parameters (``requires_grad=False``, e.g. a teacher) are never pruned.
        prune_output_layer: Also prune the output layer when ``modules`` is ``None``.
        sparsity_overrides: Glob pattern of module names to that module's own final sparsity, e.g.
            ``{"*.attention.*": 0.5}``. Overridden modules get their own threshold and follow the
            same schedule to their own target.
        log_layer_sparsity: Log each layer's sparsity (``pruning/sparsity/<name>``) at every mask
            update, in addition to the overall ``pruning/sparsity``.
        mask_gradients: Also zero the gradients of pruned weights before every optimizer step, so
            that their optimizer state (momentum, Adam moments) stays exactly zero at all times, not
            only after each mask update and at fit end. Costs a second multiply per step; useful
            with optimizers that mix coordinates (L-BFGS) or when inspecting optimizer state.
        criterion: Which weights are pruned first: ``"magnitude"`` (``|w|``), ``"movement"`` (Sanh et
            al. 2020: scores learned from ``-w * dL/dw`` by the run's optimizer), ``"soft_movement"``
            (movement with the paper's ``sigmoid`` regularizer on the scores) or ``"taylor"``
            (PLATON, Zhang et al. 2022: moving averages of ``|w * dL/dw|`` and of its uncertainty).
            See ``docs/pruning.md``, "Criteria".
        criterion_options: The criterion's options: ``score_lr`` (movement variants: the scores'
            learning rate; ``None``: the optimizer's default), ``regularization`` (``soft_movement``:
            the weight of ``mean(sigmoid(scores))``, default ``1.0``), ``beta1`` and ``beta2``
            (``taylor``: the moving averages' factors, defaults ``0.85`` and ``0.95``).
        name: The plugin's registered name, the namespace of its metrics, checkpoint state and report
            rows; ``None``: ``"pruning"`` (``"pruning-2"``... for further instances).

    Several instances prune disjoint sets of parameters to their own targets on their own schedules
    (a parameter selected by two of them is refused at set-up). A run resumed from a checkpoint must
    use the configuration it was written with (refused otherwise, naming what changed), and a run that
    ends short of its target says so at fit end. The validated arguments are :attr:`config`.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(0.8, end_step=0.75)])
        trainer.fit(model)
        torch.save(model.state_dict(), "pruned.pt")  # plain keys, zeros where pruned
    """

    plugin_name = "pruning"

    def __init__(
        self,
        target_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int | float = 0,
        end_step: int | float | None = None,
        frequency: int | float = 0.02,
        schedule: str | Callable[[int], float] = "cubic",
        pattern: str = "unstructured",
        scope: str = "global",
        modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] = (),
        module_types: Sequence[type[nn.Module]] | None = None,
        parameter_names: str | Sequence[str] = ("weight",),
        prune_output_layer: bool = False,
        sparsity_overrides: Mapping[str, float] | None = None,
        log_layer_sparsity: bool = True,
        mask_gradients: bool = False,
        criterion: str = "magnitude",
        criterion_options: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        #: The validated configuration (a frozen :class:`~lightning_shrink.pruning.PruningConfig`).
        self.config = PruningConfig(
            target_sparsity=target_sparsity,
            initial_sparsity=initial_sparsity,
            start_step=start_step,
            end_step=end_step,
            frequency=frequency,
            schedule=schedule,
            pattern=pattern,
            scope=scope,
            modules=modules,
            exclude_modules=exclude_modules,
            module_types=module_types,
            parameter_names=parameter_names,
            prune_output_layer=prune_output_layer,
            sparsity_overrides=sparsity_overrides,
            log_layer_sparsity=log_layer_sparsity,
            mask_gradients=mask_gradients,
            criterion=criterion,
            criterion_options=criterion_options,
        )

    def make_plugin(self) -> PruningPlugin:
        """The plugin that does the work, with this callback's configuration."""
        return PruningPlugin(self.config)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current keep-masks (``True`` = kept), by qualified parameter name (local shards
        under FSDP2)."""
        return self.plugin.masks

    @property
    def sparsity(self) -> float:
        """The selected weights' sparsity after the last mask update."""
        return self.plugin.sparsity
