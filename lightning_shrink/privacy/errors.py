"""The error of the privacy technique, and the messages both per-sample engines raise it with.

No Opacus import, so that :class:`PrivacyError` can always be imported and caught.
"""

from __future__ import annotations

from torch import nn

__all__ = ["PrivacyError", "batch_mismatch_message", "no_backward_message"]


class PrivacyError(RuntimeError):
    """The run cannot be made differentially private as configured.

    Raised before the first optimizer step for everything that can be checked then, and at the
    step itself, before any update, for what only a batch reveals (a layer that sees the examples
    along another dimension than the one configured, a parameter that got no per-sample gradient).
    """


def batch_mismatch_message(
    mode: str,
    name: str,
    module: nn.Module,
    shape: tuple[int, ...],
    dim: int,
    examples: int,
    batch_first: bool,
) -> str:
    """Why a step is refused when a layer's batch dimension does not hold the batch's examples."""
    seen = shape[dim] if len(shape) > dim else "no"
    if batch_first:
        hint = (
            "for a time-major model (inputs (T, B, ...), the default of nn.RNN and nn.Transformer) pass "
            "batch_first=False"
        )
    else:
        hint = (
            "with batch_first=False an input with two or more leading dimensions must be (T, B, ...) and "
            "one with a single leading dimension (B, ...)"
        )
    return (
        f"DifferentialPrivacy(grad_sample_mode={mode!r}): layer {name!r} ({type(module).__name__}) got an "
        f"input of shape {shape}, whose batch dimension {dim} (batch_first={batch_first}) holds {seen} "
        f"entries, but the batch has {examples} example(s). Its per-sample gradients would not be per "
        "example: clipping would bound each entry instead of each example and the reported epsilon would be "
        f"false, so the step is refused before any update. {hint[0].upper()}{hint[1:]}; an index the batch "
        "shares needs a batch dimension of size 1, as (1, T) position ids have"
    )


def no_backward_message(examples: int) -> str:
    """Why a step is refused when a non-empty batch produced no per-sample gradient."""
    return (
        f"DifferentialPrivacy: the batch has {examples} example(s) but no per-sample gradient was computed "
        "(training_step returned None, so there was no backward pass). Skipping the update for this batch "
        "would depend on its data, which DP-SGD does not allow: train on every batch (training_step may "
        "return None only for an empty Poisson batch, whose step is noise only)"
    )
