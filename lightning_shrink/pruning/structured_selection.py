"""How :class:`~lightning_shrink.GradualMagnitudePruning` prunes with ``pattern="heads"`` or
``"neurons"``: the arguments it refuses, the parameters it selects (the groups of
:mod:`lightning_shrink.pruning.structured`), mask updates and the shortfall check, in groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_shrink.pruning.config import OWNER
from lightning_shrink.pruning.selection import PruneTarget
from lightning_shrink.pruning.structured import (
    STRUCTURED_KINDS,
    GroupSpec,
    discover,
    group_masks,
    pruned_groups,
    unsupported_message,
)

if TYPE_CHECKING:
    from lightning_shrink.pruning.config import PruningConfig

__all__ = ["check_structured_config", "structured_shortfall", "structured_targets", "structured_update"]


def check_structured_config(config: PruningConfig) -> None:
    """Refuse arguments that a structured ``pattern`` cannot honour (called by the configuration)."""
    kind = config.pattern.kind
    if kind not in STRUCTURED_KINDS:
        return
    refused = []
    if config.module_types is not None:
        refused.append("`module_types`")
    if tuple(config.parameter_names) != ("weight",):
        refused.append("`parameter_names`")
    if config.prune_output_layer:
        refused.append("`prune_output_layer=True`")
    if config.sparsity_overrides:
        refused.append("`sparsity_overrides`")
    if refused:
        raise ValueError(
            f"{OWNER}: `pattern='{kind}'` prunes whole {kind} (the weights and biases that make them up, "
            f"found from the model's family); {', '.join(refused)} cannot be combined with it. Select layers "
            "with `modules` / `exclude_modules` (attention or MLP module names) and use `scope='layer'` for "
            "the same fraction in every layer"
        )


def structured_targets(model: nn.Module, config: PruningConfig) -> tuple[list[PruneTarget], list[GroupSpec]]:
    """The pruned parameters and the group specs of a structured ``config.pattern`` in ``model``.

    A layer is selected when its attention (``"heads"``) or MLP (``"neurons"``) module is selected by
    ``modules`` / ``exclude_modules`` and all its parameters are trainable (a frozen teacher is never
    pruned).

    Raises:
        ValueError: ``model`` holds no transformers model of a supported family, or nothing is selected.
    """
    kind = config.pattern.kind
    specs = discover(model, kind)
    if not specs:
        raise ValueError(unsupported_message(OWNER, model, kind))
    owners = {s.name for s in specs}

    def supported(name: str, module: nn.Module) -> str | None:
        if name in owners:
            return None
        return f"it is not the {'attention' if kind == 'heads' else 'MLP'} module of a supported layer"

    selected = set(config.selector.select(model, supported))
    params = dict(model.named_parameters(remove_duplicate=False))
    chosen = [s for s in specs if s.name in selected and all(params[p].requires_grad for p in s.params)]
    if not chosen:
        raise ValueError(
            f"{OWNER}: `pattern='{kind}'`: no trainable layer is selected (modules="
            f"{list(config.modules) if config.modules is not None else None}, exclude_modules="
            f"{list(config.exclude_modules)}); the {kind} of layers such as {sorted(owners)[:2]} can be "
            "pruned"
        )
    targets = [
        PruneTarget(
            name=p,
            module_name=p.rpartition(".")[0],
            transposed=False,
            final_sparsity=config.target_sparsity,
            group="__global__" if config.scope == "global" else spec.name,
        )
        for spec in chosen
        for p in spec.params
    ]
    return targets, chosen


def structured_update(
    specs: Sequence[GroupSpec],
    targets: Sequence[PruneTarget],
    params: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    sparsity: float,
    scope: str,
    scores: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """New keep-masks, in target order, for the scheduled fraction of groups (see :func:`group_masks`;
    ``scores``: per-weight scores in target order, ``None`` for magnitude)."""
    names = [t.name for t in targets]
    by_name = dict(zip(names, params, strict=True))
    score_map = dict(zip(names, scores, strict=True)) if scores is not None else None
    masks = group_masks(specs, by_name, dict(zip(names, keeps, strict=True)), sparsity, scope, score_map)
    return [masks[n].to(k.device) for n, k in zip(names, keeps, strict=True)]


def structured_shortfall(
    specs: Sequence[GroupSpec], targets: Sequence[PruneTarget], keeps: Sequence[torch.Tensor], scope: str
) -> list[str]:
    """The layers (or the global set) whose pruned groups fall short of the final fraction, described."""
    by_name = {t.name: k for t, k in zip(targets, keeps, strict=True)}
    final = targets[0].final_sparsity
    done = [int(pruned_groups(s, by_name).sum()) for s in specs]
    sets = [list(range(len(specs)))] if scope == "global" else [[i] for i in range(len(specs))]
    short = []
    for idx in sets:
        total = sum(specs[i].count for i in idx)
        want = min(round(final * total), total - len(idx))
        have = sum(done[i] for i in idx)
        if have < want:
            what = specs[idx[0]].name if scope == "layer" else f"{len(idx)} layers under the global threshold"
            short.append(f"{what} at {have}/{total} {specs[idx[0]].kind} pruned (target {want})")
    return short
