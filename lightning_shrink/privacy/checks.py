"""Everything that would make a run less private than reported, refused at fit start.

Each function raises :class:`~lightning_shrink.privacy.errors.PrivacyError` listing every problem
it finds. The plugin calls the checks of the run and the model before it touches the data, the
optimizer or the model, and the checks of a resumed checkpoint once the sample rate and the noise
are known; all of them before the first step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.validators import ModuleValidator
from torch import nn

from lightning_shrink.adapters import privacy_problems
from lightning_shrink.lightning import compat
from lightning_shrink.privacy.errors import PrivacyError
from lightning_shrink.privacy.layers import is_fake_quantized, trainable_direct, uncovered_parameters
from lightning_shrink.privacy.opacus_hooks import FLOAT_RULES

__all__ = [
    "check_checkpoint_covered",
    "check_hooks_engine",
    "check_model",
    "check_resumed_configuration",
    "check_run",
    "warn_compositions",
]

_PREFIX = "DifferentialPrivacy"

#: Why FSDP2 is refused: what Opacus 1.6 supports under FSDP2, and why this run cannot use it.
FSDP2_REASON = (
    "Opacus 1.6 supports FSDP2 only through its own grad_sample_mode='ghost_fsdp' (FSDP2Wrapper shards the "
    "model itself, FSDPOptimizerFastGradientClipping, and DPLossFastGradientClipping, which needs the "
    "per-example losses and a second backward pass); a training_step that returns one reduced loss cannot "
    "provide those, and neither Opacus' per-sample hooks with its DPOptimizer nor this package's ghost "
    "engine clip sharded (DTensor) parameters. Use strategy='ddp'"
)


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        raise PrivacyError(f"{_PREFIX}: {what}: " + "; ".join(problems))


def check_run(trainer: pl.Trainer, pl_module: pl.LightningModule, instances: int) -> None:
    """Refuse what the Trainer does that DP-SGD cannot account for."""
    problems = []
    if not pl_module.automatic_optimization:
        problems.append(
            "manual optimization (`automatic_optimization = False`): the module steps its optimizers "
            "itself, so clipping, noise and accounting cannot be guaranteed"
        )
    if instances > 1:
        problems.append(
            f"{instances} DifferentialPrivacy callbacks in one Trainer; one DP-SGD mechanism (one optimizer, "
            "one accountant) covers the whole run: keep one"
        )
    strategy = trainer.strategy
    kind = compat.strategy_kind(strategy)
    if kind == "ddp_spawn":
        problems.append(
            "strategy 'ddp_spawn' runs the fit in spawned processes, whose accounting (epsilon, the budget "
            "stop, the report) would not come back to this one; use strategy='ddp'"
        )
    elif kind == "model_parallel":
        problems.append(f"ModelParallelStrategy (FSDP2) is not supported: {FSDP2_REASON}")
    elif kind not in ("single_device", "ddp", "ddp_fork"):
        problems.append(
            f"strategy {type(strategy).__name__} is not supported (single device and 'ddp' are): its "
            "optimizer and gradient handling cannot be taken over"
        )
    elif kind != "single_device":
        own = compat.ddp_comm_hook_of(strategy)
        if own is not None:
            problems.append(
                f"the strategy registers its own DDP communication hook ({getattr(own, '__name__', own)!r}, "
                "DDPStrategy(ddp_comm_hook=...)), but DP-SGD replaces DDP's all-reduce: the DP optimizer "
                "all-reduces the clipped, noised sums itself; remove ddp_comm_hook"
            )
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: accumulating several "
            "Poisson-sampled batches into one noisy step is not the mechanism the accountant analyses; "
            "raise the dataloader's batch size instead"
        )
    if str(trainer.precision) == "16-mixed":
        problems.append(
            "precision='16-mixed' uses a gradient scaler that steps the optimizer itself (and skips steps "
            "depending on the data); use '32-true' or 'bf16-mixed'"
        )
    if trainer.reload_dataloaders_every_n_epochs:
        problems.append("reload_dataloaders_every_n_epochs would replace the Poisson-sampled dataloader")
    if trainer.overfit_batches:
        problems.append("overfit_batches replaces the sampler with a sequential one")
    _fail("differential privacy cannot be applied to this run", problems)


def _fake_quantization_problems(pl_module: nn.Module) -> list[str]:
    problems = []
    for name, module in pl_module.named_modules():
        if not is_fake_quantized(module) or isinstance(module, nn.Embedding):
            continue
        activations = getattr(getattr(module, "shrink_qat", None), "activations", None)
        if activations == "static":
            problems.append(
                f"{name} is fake-quantized with static activation ranges (QuantizationAwareTraining("
                "activations='static')), observed from the private training batches and kept in the model "
                "without noise; use activations=None (weight-only fake quantization)"
            )
        elif activations == "dynamic" and getattr(module, "dynamic_granularity", "per_token") != "per_token":
            problems.append(
                f"{name} ({type(module).__name__}) fake-quantizes its input with one dynamic scale per "
                "tensor, which is computed over the whole batch and so mixes examples; use activations=None "
                "(weight-only fake quantization) or keep the layer in float (exclude_modules)"
            )
    return problems


def check_model(pl_module: pl.LightningModule) -> None:
    """Refuse models whose per-example gradients are not defined or not computable per layer."""
    problems = []
    direct = [n for n, p in pl_module.named_parameters(recurse=False) if p.requires_grad]
    if direct:
        problems.append(
            f"trainable parameters {direct} are registered directly on the LightningModule; per-sample "
            "gradients are computed per layer: move them into a submodule"
        )
    for child_name, child in pl_module.named_children():
        trainable = any(p.requires_grad for p in child.parameters())
        for name, module in child.named_modules():
            full = f"{child_name}.{name}" if name else child_name
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and trainable:
                problems.append(
                    f"{full} ({type(module).__name__}) normalizes with batch statistics, which mixes "
                    "examples: replace it with GroupNorm or LayerNorm (opacus ModuleValidator.fix)"
                )
    for error in ModuleValidator.validate(pl_module, strict=False):
        text = str(error)
        if "training mode" in text or "BatchNorm" in text:
            continue  # the Trainer sets train mode itself; batch norm is reported above
        problems.append(text)
    problems += _fake_quantization_problems(pl_module)
    problems += privacy_problems(pl_module)
    _fail("the model cannot be trained with per-sample gradient clipping", problems)


def check_hooks_engine(pl_module: pl.LightningModule) -> None:
    """Refuse what Opacus' per-sample hooks would silently skip or crash on."""
    problems = []
    in_eval = [n for n, m in pl_module.named_modules() if not m.training and trainable_direct(m)]
    if in_eval:
        problems.append(
            f"trainable layers {in_eval[:5]}{'...' if len(in_eval) > 5 else ''} are in eval mode, and "
            "Opacus' per-sample hooks skip layers in eval mode (Lightning does not switch a model loaded in "
            "eval mode, like a transformers `from_pretrained` model, to training mode): call `.train()` on "
            "the model or use grad_sample_mode='ghost'"
        )
    for name, module in pl_module.named_modules():
        if not trainable_direct(module):
            continue
        quantized = is_fake_quantized(module)
        if quantized and not isinstance(module, FLOAT_RULES):
            problems.append(
                f"{name} ({type(module).__name__}) is fake-quantized and Opacus has no per-sample rule for "
                f"its float layer; keep it in float (QuantizationAwareTraining(exclude_modules=[{name!r}]))"
            )
        has_rule = quantized or type(module) in GradSampleHooks.GRAD_SAMPLERS
        extra = uncovered_parameters(module) if has_rule else []
        if extra:
            problems.append(
                f"{name} ({type(module).__name__}) has trainable parameters {extra} besides its weight and "
                "bias, which its per-sample rule does not compute: register them on a module of their own"
            )
    _fail("grad_sample_mode='hooks' cannot clip this model", problems)


#: What a resumed run must keep from its checkpoint, with the words that name it in a refusal.
KEPT_ON_RESUME: tuple[tuple[str, str], ...] = (
    ("accountant", "accountant"),
    ("noise_multiplier", "noise_multiplier"),
    ("max_grad_norm", "max_grad_norm (clipping norm)"),
    ("sample_rate", "sample rate (batch size x processes / examples)"),
    ("dataset_size", "number of training examples"),
    ("delta", "delta"),
    ("poisson_sampling", "poisson_sampling"),
)


def check_checkpoint_covered(name: str, accounted_steps: int, checkpoint_steps: int) -> None:
    """Refuse a resumed checkpoint that took optimizer steps the privacy account does not cover."""
    if accounted_steps < checkpoint_steps:
        raise PrivacyError(
            f"{_PREFIX}: the checkpoint has taken {checkpoint_steps} optimizer step(s), of which the privacy "
            f"account of {name!r} covers {accounted_steps}: the others were trained without "
            "DifferentialPrivacy (or under another name), so an epsilon reported from here would leave them "
            "out; resume only checkpoints written by this private run"
        )


def check_resumed_configuration(
    saved: Mapping[str, Any], current: Mapping[str, Any], world_size: int
) -> None:
    """Refuse to continue a checkpoint's account with another mechanism, naming every change.

    Args:
        saved: The plugin's state in the checkpoint (older checkpoints lack some keys; the noise
            multiplier and sample rate are then read from the last history entry).
        current: This run's values of the keys of :data:`KEPT_ON_RESUME`.
        world_size: This run's number of processes, for the message.
    """
    before = dict(saved)
    history = saved.get("history") or []
    if history:
        before.setdefault("noise_multiplier", history[-1][0])
        before.setdefault("sample_rate", history[-1][1])
    changed = []
    for key, words in KEPT_ON_RESUME:
        old, new = before.get(key), current[key]
        if old is None:
            continue
        floats = isinstance(old, float) and isinstance(new, float)
        if not (math.isclose(old, new, rel_tol=1e-9) if floats else old == new):
            changed.append(f"{words} {old!r} -> {new!r}")
    if changed:
        raise PrivacyError(
            f"{_PREFIX}: the checkpoint was trained with another privacy configuration than this run: "
            + "; ".join(changed)
            + ". Continuing would account the checkpoint's steps and this run's as one mechanism they are "
            "not; resume with the checkpoint's configuration (same noise or budget, clipping norm, batch "
            f"size on {world_size} process(es), dataset, delta and accountant)"
        )


def warn_compositions(plugin: Any) -> None:
    """Warn about techniques registered beside the privacy ``plugin`` whose combination with DP-SGD
    the user must judge."""
    if plugin.technique_registered("distillation"):
        rank_zero_warn(
            f"{_PREFIX} with KnowledgeDistillation: the (epsilon, delta) guarantee covers the student's "
            "training only if the teacher did not see the private training data (or was itself trained with "
            "DP, whose budget then adds up). Distillation terms are clipped per example only when they are "
            "per-example functions of the student's forward pass on the batch."
        )
