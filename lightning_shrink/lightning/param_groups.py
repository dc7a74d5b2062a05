"""Optimizer parameter groups contributed by plugins (``shrink_optimizer_param_groups``).

The bridge adds each plugin's groups to the run's first optimizer at fit start, extends that
optimizer's learning-rate schedulers to them, and under data parallelism averages their gradients
across ranks before every optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import lr_scheduler as schedulers

from lightning_shrink.manager import PluginError

__all__ = ["PluginParamGroups", "average_gradients", "fused_available"]


class PluginParamGroups:
    """The parameter groups the plugins added to one fit's optimizer."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.owners: dict[int, str] = {}

    def add(
        self,
        optimizer: torch.optim.Optimizer | None,
        scheduler_list: Sequence[Any],
        groups_by_plugin: Sequence[tuple[str, Any]],
    ) -> None:
        """Validate every plugin's groups, then add them to ``optimizer`` and its schedulers."""
        optimized = {
            id(p) for group in (optimizer.param_groups if optimizer else []) for p in group["params"]
        }
        checked: list[tuple[str, dict[str, Any]]] = []
        for plugin_name, groups in groups_by_plugin:
            if groups is None:
                continue
            if isinstance(groups, dict) or not isinstance(groups, Sequence):
                raise PluginError(
                    f"lightning-shrink plugin {plugin_name!r}: shrink_optimizer_param_groups must return a "
                    f"sequence of parameter-group dicts, got {type(groups).__name__}",
                    plugin_name=plugin_name,
                )
            for group in groups:
                checked.append((plugin_name, self._check_group(plugin_name, group, optimized)))
        if not checked:
            return
        if optimizer is None:
            names = sorted({name for name, _ in checked})
            raise PluginError(
                f"lightning-shrink plugins {names} train parameters of their own, but the LightningModule "
                "configures no optimizer (configure_optimizers returned None)",
                plugin_name=names[0],
            )
        for plugin_name, group in checked:
            reference = optimizer.param_groups[0]
            optimizer.add_param_group(group)
            added = optimizer.param_groups[-1]
            for config in scheduler_list:
                scheduler = getattr(config, "scheduler", config)
                if getattr(scheduler, "optimizer", None) is optimizer:
                    _extend_scheduler(scheduler, reference, added, plugin_name)
            for p in group["params"]:
                self.params.append(p)
                self.owners[id(p)] = plugin_name

    def _check_group(self, plugin_name: str, group: Any, optimized: set[int]) -> dict[str, Any]:
        def error(problem: str) -> PluginError:
            return PluginError(
                f"lightning-shrink plugin {plugin_name!r}: shrink_optimizer_param_groups: {problem}",
                plugin_name=plugin_name,
            )

        if not isinstance(group, dict) or "params" not in group:
            raise error(f"each group must be a dict with 'params', got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not params:
            raise error("a group has no 'params'")
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.is_leaf or not p.requires_grad:
                raise error("'params' must be leaf tensors with requires_grad=True")
            if id(p) in optimized or id(p) in self.owners:
                owner = self.owners.get(id(p), "the LightningModule's optimizer")
                raise error(f"a tensor of shape {tuple(p.shape)} is already optimized (by {owner})")
            optimized.add(id(p))
        return {**group, "params": params}

    def average_gradients(self) -> None:
        """Average the groups' gradients across data-parallel ranks (a missing gradient counts as
        zero), so every rank takes the same update, as DDP does for the model's parameters."""
        average_gradients(self.params)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the data-parallel ranks, in place, in one all-reduce
    (a missing gradient counts as zero; nothing happens outside a process group of several ranks):
    what DDP does for the model's parameters, for tensors it does not reduce."""
    if not params or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    buffer = flat.cpu() if dist.get_backend() == "gloo" else flat
    dist.all_reduce(buffer)
    buffer.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(buffer[offset : offset + n].view_as(g))
        offset += n


def fused_available(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` can be stepped by ``optimizer``'s fused implementation while the run left
    the choice of implementation to torch (``foreach`` and ``fused`` both ``None``, their default).

    The same update, in one kernel per tensor instead of one per arithmetic operation: torch
    defaults to its for-loop implementation off CUDA, which steps a plugin's parameters (movement
    scores: one float32 per pruned weight) several times slower on a CPU. An implementation the run
    chose (``foreach=...`` or ``fused=...``) is kept for those parameters too.
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without fused optimizer kernels
        return False
    defaults = optimizer.defaults
    if "fused" not in defaults or defaults.get("fused") is not None or defaults.get("foreach") is not None:
        return False
    if defaults.get("differentiable") or defaults.get("capturable"):
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(
        type(p) is torch.nn.Parameter and p.dtype == torch.float32 and p.device.type in devices
        for p in params
    )


def _extend_scheduler(
    scheduler: Any, reference: dict[str, Any], added: dict[str, Any], plugin_name: str
) -> None:
    """Make ``scheduler`` drive the newly ``added`` group the way it drives ``reference`` (the
    optimizer's first group), relative to the added group's own learning rate."""
    if isinstance(scheduler, (schedulers.SequentialLR, schedulers.ChainedScheduler)):
        for inner in scheduler._schedulers:  # torch keeps the chained schedulers in this attribute
            _extend_scheduler(inner, reference, added, plugin_name)
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return
    if isinstance(scheduler, schedulers.ReduceLROnPlateau):
        scheduler.min_lrs.append(scheduler.min_lrs[0])  # it lowers every group's own `lr`
        return
    if isinstance(scheduler, schedulers.CyclicLR):
        raise PluginError(
            f"lightning-shrink plugin {plugin_name!r} adds an optimizer parameter group, and CyclicLR cannot "
            "be extended to it (it fixes per-group bounds at construction); use another scheduler",
            plugin_name=plugin_name,
        )
    base = float(added["lr"])
    if isinstance(scheduler, schedulers.OneCycleLR):
        scale = base / float(reference["max_lr"]) if reference.get("max_lr") else 0.0
        for key in ("initial_lr", "max_lr", "min_lr"):
            added[key] = float(reference[key]) * scale
        added["lr"] = float(reference["lr"]) * scale
        scheduler.base_lrs.append(added["initial_lr"])
    elif hasattr(scheduler, "base_lrs"):
        added.setdefault("initial_lr", base)
        ref_base = float(scheduler.base_lrs[0]) if scheduler.base_lrs else 0.0
        factor = float(reference["lr"]) / ref_base if ref_base else 1.0
        scheduler.base_lrs.append(float(added["initial_lr"]))
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR, MultiplicativeLR: one function per group
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        added["lr"] = float(added["initial_lr"]) * factor
    else:
        raise PluginError(
            f"lightning-shrink plugin {plugin_name!r} adds an optimizer parameter group, and the scheduler "
            f"{type(scheduler).__name__} has no per-group learning rates that could be extended to it",
            plugin_name=plugin_name,
        )
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
