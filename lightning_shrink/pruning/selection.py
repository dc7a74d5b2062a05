"""Which parameters are pruned: selection by module type and name, defaults and overrides."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_shrink.adapters import adapter_roles
from lightning_shrink.pruning.config import OWNER, PruningConfig

__all__ = ["PruneTarget", "default_module_types", "group_indices", "is_conv1d", "select_targets"]


def _transformers_conv1d() -> type | None:
    # Only look it up when transformers is already imported: a model that has Conv1D layers
    # imported it, and `import lightning_shrink` must stay light.
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None and "transformers" in sys.modules:
        try:
            from transformers import pytorch_utils as module
        except ImportError:  # pragma: no cover - broken transformers install
            return None
    return getattr(module, "Conv1D", None) if module is not None else None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``."""
    conv1d = _transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def default_module_types() -> tuple[type, ...]:
    """``nn.Linear``, ``nn.Conv1d/2d/3d`` and, when transformers is imported, its ``Conv1D``."""
    types: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]
    conv1d = _transformers_conv1d()
    if conv1d is not None:
        types.append(conv1d)
    return tuple(types)


@dataclass(frozen=True)
class PruneTarget:
    """One pruned parameter.

    Attributes:
        name: Qualified parameter name in the LightningModule, e.g.
            ``"model.bert.encoder.layer.0.output.dense.weight"``.
        module_name: Qualified name of the module that owns it.
        transposed: The weight is stored ``(in, out)`` (transformers' ``Conv1D``) rather than
            ``(out, in, ...)``.
        final_sparsity: The sparsity this parameter (or its group) reaches at the end of the schedule.
        group: Parameters of the same group share one magnitude threshold.
    """

    name: str
    module_name: str
    transposed: bool
    final_sparsity: float
    group: str


def group_indices(targets: Sequence[PruneTarget]) -> dict[str, list[int]]:
    """The indices of the targets of each threshold group, by group, in target order."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t.group, []).append(i)
    return groups


def select_targets(model: nn.Module, config: PruningConfig) -> list[PruneTarget]:
    """Select the parameters to prune (see :class:`~lightning_shrink.GradualMagnitudePruning` for the
    rules).

    Modules are chosen by ``config.selector`` (the one module selector of every technique: each pattern
    of ``modules`` and ``exclude_modules`` must match a module name; a module named exactly in
    ``modules`` that is not one of ``module_types`` is a ``TypeError``); the parameters pruned are those
    of ``parameter_names`` that require gradients, and the frozen base weights under peft LoRA adapters
    (the adapters themselves and the frozen originals of ``modules_to_save`` are never selected, the
    ``modules_to_save`` copies only when ``modules`` names them; see :mod:`lightning_shrink.adapters`).

    Raises:
        TypeError: ``modules`` names a module that is not one of ``module_types``.
        ValueError: a pattern matches no module, a ``modules`` or ``sparsity_overrides`` pattern selects
            no parameter, or nothing is selected at all; the message names the argument to change.
    """
    types = config.module_types if config.module_types is not None else default_module_types()
    type_names = ", ".join(t.__name__ for t in types)
    modules = config.modules
    roles = adapter_roles(model)

    def supported(name: str, module: nn.Module) -> str | None:
        reason = roles.unsupported(module, explicit=modules is not None)
        if reason is not None:
            return reason
        if isinstance(module, types):
            return None
        return f"it is a {type(module).__name__}, not one of `module_types` ({type_names})"

    candidates = list(config.selector.select(model, supported).items())

    # Parameters that also belong to a module that is not selected by type (tied embeddings and
    # LM heads) are left alone unless named explicitly.
    shared_ids: set[int] = set()
    if modules is None:
        for module in model.modules():
            if not isinstance(module, types):
                shared_ids.update(id(p) for p in module.parameters(recurse=False))
    output_layer = None
    if modules is None and not config.prune_output_layer:
        trainable = [
            (n, m)
            for n, m in candidates
            if not isinstance(m, nn.Embedding) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if trainable:
            output_layer = trainable[-1][0]
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            out = get_out()
            if isinstance(out, nn.Module):
                shared_ids.update(id(p) for p in out.parameters(recurse=False))

    overrides = config.sparsity_overrides
    seen: set[int] = set()
    targets: list[PruneTarget] = []
    for module_name, module in candidates:
        if module_name == output_layer:
            continue
        for pname, param in module.named_parameters(recurse=False):
            frozen_base = id(param) in roles.base_weights
            if pname not in config.parameter_names or not (param.requires_grad or frozen_base):
                continue
            if id(param) in seen or id(param) in shared_ids:
                continue
            seen.add(id(param))
            override = [v for p, v in overrides if fnmatch.fnmatchcase(module_name, p)]
            final = override[-1] if override else config.target_sparsity
            full_name = f"{module_name}.{pname}"
            group = full_name if override or config.scope == "layer" else "__global__"
            targets.append(
                PruneTarget(
                    name=full_name,
                    module_name=module_name,
                    transposed=is_conv1d(module) and pname == "weight",
                    final_sparsity=final,
                    group=group,
                )
            )
    if not targets:
        raise ValueError(
            f"{OWNER}: no parameter matched the selection "
            f"(module_types=[{type_names}], modules={list(modules) if modules is not None else None}, "
            f"exclude_modules={list(config.exclude_modules)}, "
            f"parameter_names={list(config.parameter_names)}); "
            "frozen parameters (other than LoRA base weights) and the output layer are skipped by default"
        )
    for pattern in modules or ():
        if not any(fnmatch.fnmatchcase(t.module_name, pattern) for t in targets):
            raise ValueError(
                f"{OWNER}: `modules` pattern {pattern!r} selects no parameter to prune: the modules it "
                f"matches are not of `module_types` ({type_names}), are excluded, or have no trainable "
                f"parameter named in `parameter_names` {list(config.parameter_names)}"
            )
    for pattern, _ in overrides:
        if not any(fnmatch.fnmatchcase(t.module_name, pattern) for t in targets):
            raise ValueError(f"{OWNER}: `sparsity_overrides` pattern {pattern!r} matches no selected module")
    return targets
