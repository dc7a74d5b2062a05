"""What the student computed in ``training_step``, and what the teacher computed on the same inputs.

A forward hook on the student records the inputs and the output of the call that ``training_step``
makes (only between the start of a training batch and its loss terms: validation and test forwards
are ignored); forward hooks on the submodules that ``layer_map`` names record their outputs, on the
student during its call and on the teacher during its call. The functions below read logits,
hidden states and attention maps out of a model's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_shrink.distillation.config import OWNER, LayerKey
from lightning_shrink.distillation.teacher import is_transformers_model

__all__ = ["Capture", "ForwardCapture", "indexed_output", "logits_of", "plain"]


class Capture:
    """One forward call: its positional and keyword inputs and its output."""

    __slots__ = ("args", "kwargs", "output")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.output = output


class ForwardCapture:
    """The hooks that record the student's call and the mapped layers' outputs of both models.

    Args:
        output_request: Keyword arguments added to a transformers student's call while armed
            (``output_hidden_states``, ``output_attentions``), when a term needs them.
    """

    def __init__(self, output_request: dict[str, bool]) -> None:
        self.output_request = output_request
        self.armed = False
        self.calls: list[Capture] = []
        self.recorded: Capture | None = None
        self.student_layers: dict[str, Any] = {}
        self.teacher_layers: dict[str, Any] = {}
        self._in_teacher = False
        self._handles: list[Any] = []

    def attach(
        self, student: nn.Module, teacher: nn.Module, layer_pairs: tuple[tuple[LayerKey, LayerKey], ...]
    ) -> None:
        """Put the hooks on ``student`` and, for named layers, on both models (replacing old ones)."""
        self.detach()
        self._handles.append(student.register_forward_pre_hook(self._student_pre_hook, with_kwargs=True))
        self._handles.append(student.register_forward_hook(self._student_hook, with_kwargs=True))
        for s_key, t_key in layer_pairs:
            if isinstance(s_key, str) and isinstance(t_key, str):
                layer = student.get_submodule(s_key)
                self._handles.append(
                    layer.register_forward_hook(self._layer_hook(self.student_layers, s_key))
                )
                layer = teacher.get_submodule(t_key)
                self._handles.append(
                    layer.register_forward_hook(self._layer_hook(self.teacher_layers, t_key))
                )

    def detach(self) -> None:
        """Remove every hook and forget what was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def reset(self) -> None:
        """Disarm and forget what was recorded."""
        self.armed = False
        self.calls.clear()
        self.recorded = None
        self.student_layers.clear()
        self.teacher_layers.clear()

    def arm(self) -> None:
        """Start recording (a training batch begins)."""
        self.reset()
        self.armed = True

    def record(self, student_output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Take this call instead of what the hook captured (:meth:`KnowledgeDistillation.record`)."""
        self.recorded = Capture(tuple(args), dict(kwargs), student_output)

    @contextmanager
    def teacher_call(self) -> Iterator[None]:
        """Record the teacher's named layers during the ``with`` block."""
        self.teacher_layers.clear()
        self._in_teacher = True
        try:
            yield
        finally:
            self._in_teacher = False

    def student_call(self, where: str, student: nn.Module) -> Capture:
        """The one call to distil, in this step.

        Raises:
            RuntimeError: the student was not called, or called more than once, and no call was
                recorded with ``KnowledgeDistillation.record``.
        """
        if self.recorded is not None:
            return self.recorded
        if not self.calls:
            raise RuntimeError(
                f"{OWNER}: the student ({where}, {type(student).__name__}) was not called during "
                "training_step, so there is nothing to distil into; call the model as a module "
                "(self.model(...) or self(...), not .forward), set `student=` to the attribute that is "
                "called, or call KnowledgeDistillation.record(self, outputs, *inputs) in training_step"
            )
        if len(self.calls) > 1:
            raise RuntimeError(
                f"{OWNER}: the student ({where}) was called {len(self.calls)} times in one training_step; "
                "say which call to distil with KnowledgeDistillation.record(self, outputs, *inputs) in "
                "training_step"
            )
        return self.calls[0]

    def layer_output(self, side: str, key: str) -> torch.Tensor:
        """The output the named layer of ``side`` (``"student"``/``"teacher"``) produced in this step."""
        store = self.student_layers if side == "student" else self.teacher_layers
        if key not in store:
            raise RuntimeError(
                f"{OWNER}: the {side}'s layer {key!r} (from `layer_map`) did not run during its forward call"
            )
        return plain(store[key])

    def _student_pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        if not self.armed or not self.output_request or not is_transformers_model(module):
            return None
        return args, {**kwargs, **self.output_request}

    def _student_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.armed:
            self.calls.append(Capture(tuple(args), dict(kwargs), output))

    def _layer_hook(self, store: dict[str, Any], key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._in_teacher if store is self.teacher_layers else self.armed:
                store[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: hooks and recorded tensors stay behind.
        state = self.__dict__.copy()
        state.update(_handles=[], calls=[], recorded=None, student_layers={}, teacher_layers={}, armed=False)
        return state


def plain(t: Any) -> Any:
    """An inference-mode tensor made usable by autograd (a clone); anything else unchanged."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        return t.clone()
    return t


def logits_of(output: Any, side: str, logits_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The logits in a model's output: ``logits_fn(output)``, the output itself, ``.logits``,
    ``["logits"]`` or the first element of a tuple."""
    if logits_fn is not None:
        logits = logits_fn(output)
    elif isinstance(output, torch.Tensor):
        logits = output
    else:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, Mapping):
            logits = output.get("logits")
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{OWNER}: cannot find logits in the {side}'s output ({type(output).__name__}); pass "
            "`logits_fn=` (output -> logits tensor)"
        )
    return plain(logits)


def indexed_output(output: Any, field: str, key: int, side: str, argument: str) -> torch.Tensor:
    """``output.<field>[key]`` (``hidden_states`` or ``attentions`` of a transformers output)."""
    values = getattr(output, field, None)
    if values is None and isinstance(output, Mapping):
        values = output.get(field)
    if not values:
        raise RuntimeError(
            f"{OWNER}: the {side}'s output has no `{field}` (needed by `{argument}`); a transformers model "
            f"returns them when called with output_{field}=True (set automatically unless the model ignores "
            "it or is called with return_dict=False)"
        )
    if not -len(values) <= key < len(values):
        raise IndexError(
            f"{OWNER}: `{argument}`: {side} layer {key} is out of range; the {side} returned {len(values)} "
            f"{field} (indices 0..{len(values) - 1})"
        )
    return plain(values[key])
