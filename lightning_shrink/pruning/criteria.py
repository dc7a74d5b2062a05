"""Importance criteria: which weights a mask update prunes first.

Every criterion turns the pruned parameters into one non-negative float32 score per weight (lower is
pruned first), the input of :func:`~lightning_shrink.pruning.masks.compute_masks`; masks are then
selected exactly as for magnitudes (schedules, patterns, scopes, exact thresholds). Structured
patterns reduce these per-weight scores per unit.

* ``"magnitude"``: ``|w|`` (no state).
* ``"movement"`` (Sanh et al., 2020, hard movement pruning): a learned score ``S`` per weight,
  trained by the run's optimizer with the straight-through gradient ``dL/dS = W * dL/dW'``
  (``W'`` the masked weight the forward used); weights with the lowest ``S`` are pruned.
* ``"soft_movement"``: the same scores, also pulled down by the paper's regularizer
  ``regularization * mean(sigmoid(S))``; the mask keeps the scores above a threshold chosen at every
  mask update so that the scheduled sparsity is met exactly.
* ``"taylor"`` (PLATON, Zhang et al., 2022): exponential moving averages of the first-order Taylor
  importance ``I = |w * g|`` and of its uncertainty ``U = |I - Ibar|``; the score is ``Ibar * Ubar``.

When the gradients are read (see ``docs/pruning.md``, "Criteria"): movement scores get their gradient
in ``shrink_after_backward`` (rewritten at every micro-batch from the gradient accumulated so far, so
the last micro-batch of an optimizer step leaves ``W * (sum of the micro-batches' gradients)``; under
DDP that last backward returns after DDP's all-reduce, so the gradient is already averaged over
ranks; the bridge then averages the scores' gradients like every plugin parameter group). Taylor
statistics and the soft-movement regularizer are updated once per optimizer step in
``shrink_before_optimizer_step``, from the final gradient (accumulated, unscaled under AMP, averaged
over DDP ranks, after other plugins such as differential privacy changed it).

Frozen LoRA base weights (peft) have no gradient of their own: the plugin has autograd compute it for
the fit (:class:`~lightning_shrink.adapters.gradients.BaseGradients`), and the criteria score the LoRA
layer's effective weight ``W + M ⊙ s·B·A`` (the merged weight pruning removes entries of) with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from lightning_shrink.config import check_number
from lightning_shrink.pruning.masks import Pattern

__all__ = [
    "CRITERIA",
    "Criterion",
    "Magnitude",
    "Movement",
    "SoftMovement",
    "Taylor",
    "check_criterion_options",
    "make_criterion",
]

#: Options of each criterion and their defaults.
_OPTIONS: dict[str, dict[str, Any]] = {
    "magnitude": {},
    "movement": {"score_lr": None},
    "soft_movement": {"score_lr": None, "regularization": 1.0},
    "taylor": {"beta1": 0.85, "beta2": 0.95},
}

#: The names of the built-in criteria.
CRITERIA: tuple[str, ...] = tuple(_OPTIONS)


def check_criterion_options(
    owner: str, criterion: Any, options: Mapping[str, Any] | None
) -> tuple[tuple[str, Any], ...]:
    """Validate ``criterion`` and its ``criterion_options``; return every option of the criterion
    (defaults filled in) as sorted ``(name, value)`` pairs.

    Raises:
        TypeError: ``criterion`` is not a string, ``criterion_options`` not a mapping, or an option of
            the wrong type.
        ValueError: an unknown criterion, an option the criterion does not take, or one out of range.
    """
    if not isinstance(criterion, str):
        raise TypeError(f"{owner}: `criterion` must be one of {list(CRITERIA)}, got {criterion!r}")
    if criterion not in _OPTIONS:
        raise ValueError(f"{owner}: `criterion` must be one of {list(CRITERIA)}, got {criterion!r}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"{owner}: `criterion_options` must be a mapping of option names to values, got {options!r}"
        )
    allowed = _OPTIONS[criterion]
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        takes = f"takes {sorted(allowed)}" if allowed else "takes no options"
        raise ValueError(f"{owner}: `criterion_options` {unknown} unknown: criterion={criterion!r} {takes}")
    merged = {**allowed, **options}
    for key, value in merged.items():
        argument = f"criterion_options[{key!r}]"
        if key == "score_lr":
            merged[key] = check_number(owner, argument, value, low=0.0, low_inclusive=False, allow_none=True)
        elif key == "regularization":
            merged[key] = check_number(owner, argument, value, low=0.0)
        else:  # beta1, beta2
            merged[key] = check_number(
                owner, argument, value, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
            )
    return tuple(sorted(merged.items()))


class Criterion:
    """The interface of an importance criterion, bound to one plugin's pruned parameters.

    The plugin calls :meth:`bind` once per fit (at fit start, with the parameters on their device),
    :meth:`param_groups` right after, :meth:`after_backward` after every micro-batch's backward,
    :meth:`before_optimizer_step` once per optimizer step with the final gradients, and
    :meth:`scores` at mask updates. :meth:`state_dict` / :meth:`load_state_dict` carry the learned
    state through checkpoints (plain tensors on the CPU, by parameter name); it never enters the model.

    Args:
        owner: The name error messages start with.
        options: The criterion's validated options (:func:`check_criterion_options`).
    """

    #: The criterion's name, the value of ``criterion=``.
    name: ClassVar[str] = ""
    #: Whether the scores come from gradients (no scores before the first optimizer step).
    needs_gradients: ClassVar[bool] = False
    #: Whether :meth:`before_optimizer_step` reads the parameters' gradients.
    reads_step_gradients: ClassVar[bool] = False

    def __init__(self, owner: str, options: Mapping[str, Any]) -> None:
        self.owner = owner
        self.options = dict(options)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self._effective: list[Callable[[], torch.Tensor] | None] = []
        #: Optimizer steps whose gradients the criterion has seen (restored on resume).
        self.steps = 0

    def bind(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        effective: Sequence[Callable[[], torch.Tensor] | None] | None = None,
    ) -> None:
        """Attach to the pruned parameters (``names[i]`` is the qualified name of ``params[i]``).
        ``effective[i]``, where given, returns the weight the model computes with in place of
        ``params[i]`` (a LoRA layer's ``W + M ⊙ s·B·A``), which gradient criteria score."""
        self.names, self.params = list(names), list(params)
        self._effective = list(effective) if effective is not None else [None] * len(self.params)
        self.steps = 0
        self._allocate()

    def _allocate(self) -> None:
        """Create the criterion's per-parameter state for :attr:`params` (called by :meth:`bind`)."""

    def weight(self, i: int) -> torch.Tensor:
        """The (detached) weight parameter ``i`` stands for: its effective weight, else itself."""
        effective = self._effective[i] if i < len(self._effective) else None
        return effective() if effective is not None else self.params[i].detach()

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups of tensors the criterion learns, or ``None``."""
        return None

    def after_backward(self) -> None:
        """Called after every micro-batch's backward pass."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step with the final gradients."""

    def scores(
        self,
        indices: Sequence[int],
        keeps: Sequence[torch.Tensor],
        transposed: Sequence[bool],
        pattern: Pattern,
    ) -> list[torch.Tensor] | None:
        """Non-negative float32 scores of the parameters ``indices`` (one threshold group), shaped like
        them; ``None`` means magnitudes (``compute_masks``' default, computed one tensor at a time)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Values to log under the plugin's name (``{"regularization": ...}``), at every step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The learned state, as plain data and CPU tensors."""
        return {"criterion": self.name, "steps": self.steps, **self._state_tensors()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (values are copied into the bound tensors in place).

        Raises:
            ValueError: the state is another criterion's or its tensors do not fit the parameters.
        """
        if state.get("criterion") != self.name:
            raise ValueError(
                f"{self.owner}: the checkpoint's pruning state was written with criterion="
                f"{state.get('criterion')!r}, this run uses criterion={self.name!r}"
            )
        self.steps = int(state.get("steps", 0))
        for key, tensors in self._tensors().items():
            saved = state.get(key, {})
            for name, t in zip(self.names, tensors, strict=True):
                value = saved.get(name)
                if value is None or tuple(value.shape) != tuple(t.shape):
                    raise ValueError(
                        f"{self.owner}: the checkpoint's {self.name} state has no {key} of shape "
                        f"{tuple(t.shape)} for {name!r}"
                    )
                with torch.no_grad():
                    t.copy_(value.to(device=t.device, dtype=t.dtype))

    def _tensors(self) -> dict[str, list[torch.Tensor]]:
        """The criterion's per-weight tensors by state key."""
        return {}

    def _state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            key: {n: t.detach().cpu().clone() for n, t in zip(self.names, tensors, strict=True)}
            for key, tensors in self._tensors().items()
        }


class Magnitude(Criterion):
    """``|w|``: the default criterion, without state."""

    name = "magnitude"


class Movement(Criterion):
    """Hard movement pruning (Sanh, Wolf & Rush, 2020): learned scores ``S``, one per pruned weight.

    ``S`` (float32 ``nn.Parameter``\\ s, zero-initialized, owned by the plugin) is trained by the run's
    first optimizer in a parameter group of its own (``lr``: ``score_lr``, else the optimizer's default;
    ``weight_decay=0``; torch's fused implementation when the optimizer has one and the run did not
    choose ``foreach``/``fused``, see
    :func:`~lightning_shrink.lightning.param_groups.fused_available`). Its gradient is the straight-through
    estimate ``dL/dS = W * dL/dW'``: with SGD every step adds ``-lr * W * grad``, so weights moving
    away from zero gain score. Because the scores start equal and their gradient does not depend on
    them, their ranking does not depend on ``score_lr`` (SGD and Adam updates are proportional to
    it). Pruned weights are zero in place, so their scores stop moving; masks never shrink during a
    run.
    """

    name = "movement"
    needs_gradients = True

    def __init__(self, owner: str, options: Mapping[str, Any]) -> None:
        super().__init__(owner, options)
        self.score_params: list[torch.nn.Parameter] = []

    def _allocate(self) -> None:
        self.score_params = [
            torch.nn.Parameter(torch.zeros(p.shape, dtype=torch.float32, device=p.device))
            for p in self.params
        ]

    def param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self.score_params), "weight_decay": 0.0}
        if self.options.get("score_lr") is not None:
            group["lr"] = float(self.options["score_lr"])
        return [group]

    def after_backward(self) -> None:
        # The gradient accumulated so far, times the weight the forward used: rewritten (not added)
        # at every micro-batch, the last one of a step leaves W * (sum of the micro-batches' grads).
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(self.params, self.score_params, strict=True)):
                g = p.grad
                if g is None:
                    continue
                w = self.weight(i)
                if s.grad is None:
                    s.grad = torch.mul(w, g).to(torch.float32)
                elif g.dtype == torch.float32:
                    torch.mul(w, g, out=s.grad)
                else:
                    s.grad.copy_(w * g)

    def before_optimizer_step(self) -> None:
        self.steps += 1

    def scores(
        self,
        indices: Sequence[int],
        keeps: Sequence[torch.Tensor],
        transposed: Sequence[bool],
        pattern: Pattern,
    ) -> list[torch.Tensor]:
        raw = [self.score_params[i].detach() for i in indices]
        if pattern.kind == "rows":
            # A row is ranked by its mean score (blocks of movement pruning sum their scores).
            raw = [_row_mean(s, t) for s, t in zip(raw, transposed, strict=True)]
        # Scores are signed; compute_masks takes non-negative ones: shift by the group's minimum
        # (monotone: the ranking is kept, up to float32 rounding of the shifted values).
        low = min(float(s.min()) for s in raw)
        return [(s - low).float() for s in raw]

    def _tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"scores": list(self.score_params)}


class SoftMovement(Movement):
    """Soft movement pruning (Sanh et al., 2020): movement scores plus the regularizer
    ``regularization * mean(sigmoid(S))`` over the plugin's scores, whose gradient is added to the
    scores' gradient once per optimizer step.

    In the paper the mask keeps the weights with ``S`` above a fixed threshold and the sparsity is
    whatever the regularizer produces. Here the threshold is chosen at every mask update as the score
    value at the schedule's sparsity (one value per threshold group: with ``scope="global"`` one for
    all layers, as in the paper), so the run reaches exactly the scheduled sparsity; the regularizer
    still decides which scores fall below it. Unlike hard movement, the scores' scale matters here
    (``sigmoid`` saturates), so ``score_lr`` changes the result.
    """

    name = "soft_movement"

    def __init__(self, owner: str, options: Mapping[str, Any]) -> None:
        super().__init__(owner, options)
        #: ``regularization * mean(sigmoid(S))`` at the last optimizer step (logged).
        self.regularization_value = 0.0

    def before_optimizer_step(self) -> None:
        super().before_optimizer_step()
        lam = float(self.options["regularization"])
        total = sum(s.numel() for s in self.score_params)
        if lam == 0.0 or total == 0:
            return
        with torch.no_grad():
            value = 0.0
            for s in self.score_params:
                sig = torch.sigmoid(s)
                value += float(sig.sum())
                reg = sig.mul_(1.0 - sig).mul_(lam / total)  # d/dS of lam * mean(sigmoid(S))
                if s.grad is None:
                    s.grad = reg
                else:
                    s.grad.add_(reg)
            self.regularization_value = lam * value / total

    def metrics(self) -> dict[str, float]:
        return {"score_regularization": self.regularization_value} if self.steps else {}


class Taylor(Criterion):
    """First-order Taylor importance with exponential moving averages (PLATON, Zhang et al., 2022).

    Once per optimizer step, with the step's final gradient ``g`` and the weights ``w`` the forward
    used: ``I = |w * g|``, ``Ibar = beta1 * Ibar + (1 - beta1) * I``, ``U = |I - Ibar|`` (with the
    updated ``Ibar``), ``Ubar = beta2 * Ubar + (1 - beta2) * U``; the score is ``Ibar * Ubar``. Two
    float32 tensors per pruned weight; nothing is learned by the optimizer.
    """

    name = "taylor"
    needs_gradients = True
    reads_step_gradients = True

    def __init__(self, owner: str, options: Mapping[str, Any]) -> None:
        super().__init__(owner, options)
        self.importance: list[torch.Tensor] = []
        self.uncertainty: list[torch.Tensor] = []

    def _allocate(self) -> None:
        self.importance = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        self.uncertainty = [torch.zeros_like(t) for t in self.importance]

    def before_optimizer_step(self) -> None:
        beta1, beta2 = float(self.options["beta1"]), float(self.options["beta2"])
        with torch.no_grad():
            for i, (p, ibar, ubar) in enumerate(
                zip(self.params, self.importance, self.uncertainty, strict=True)
            ):
                g = p.grad
                current = (self.weight(i) * g).abs_().float() if g is not None else torch.zeros_like(ibar)
                ibar.mul_(beta1).add_(current, alpha=1.0 - beta1)
                current.sub_(ibar).abs_()
                ubar.mul_(beta2).add_(current, alpha=1.0 - beta2)
        self.steps += 1

    def scores(
        self,
        indices: Sequence[int],
        keeps: Sequence[torch.Tensor],
        transposed: Sequence[bool],
        pattern: Pattern,
    ) -> list[torch.Tensor]:
        return [self.importance[i] * self.uncertainty[i] for i in indices]

    def _tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"importance": self.importance, "uncertainty": self.uncertainty}


_CLASSES: dict[str, type[Criterion]] = {c.name: c for c in (Magnitude, Movement, SoftMovement, Taylor)}


def make_criterion(
    owner: str, criterion: str, options: Sequence[tuple[str, Any]] | Mapping[str, Any]
) -> Criterion:
    """The criterion object for a validated ``criterion`` name and its options."""
    return _CLASSES[criterion](owner, dict(options))


def _row_mean(score: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Each output row's mean score, broadcast to the row's weights."""
    if transposed:  # stored (in, out): a row is a column
        return score.mean(dim=0, keepdim=True).expand_as(score)
    flat = score.reshape(score.shape[0], -1) if score.dim() > 1 else score.reshape(-1, 1)
    return flat.mean(dim=1, keepdim=True).expand_as(flat).reshape(score.shape)
