"""The knowledge-distillation technique: :class:`KnowledgeDistillation` and its plugin."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_shrink.distillation import losses
from lightning_shrink.distillation.cache import CacheKey, TeacherLogitCache, input_fingerprints
from lightning_shrink.distillation.teacher import (
    check_not_training,
    find_inner_model,
    freeze,
    is_transformers_model,
    load_teacher,
    validate_teacher_spec,
)
from lightning_shrink.hookspecs import hookimpl
from lightning_shrink.lightning import TechniqueCallback, TechniquePlugin

__all__ = ["PROJECTIONS_ATTRIBUTE", "DistillationPlugin", "KnowledgeDistillation", "Projection"]

#: Name under which the learned projections are registered on the LightningModule during ``fit``.
PROJECTIONS_ATTRIBUTE = "distill_projections"

LayerKey = int | str


def _check_weight(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"KnowledgeDistillation: `{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_alpha_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"KnowledgeDistillation: `alpha` must be in [0, 1], {where} gave {value!r}")
    return float(value)


def _check_layer_map(name: str, layer_map: Any, ints_only: bool) -> dict[LayerKey, LayerKey]:
    if not isinstance(layer_map, Mapping) or not layer_map:
        raise ValueError(
            f"KnowledgeDistillation: `{name}` must be a non-empty mapping {{student_layer: teacher_layer}}, "
            f"got {layer_map!r}"
        )
    allowed = (int,) if ints_only else (int, str)
    for s, t in layer_map.items():
        ok = all(isinstance(x, allowed) and not isinstance(x, bool) for x in (s, t))
        if not ok or type(s) is not type(t):
            kinds = "integer layer indices" if ints_only else "both integer indices or both submodule names"
            raise ValueError(f"KnowledgeDistillation: `{name}` entry {s!r}: {t!r} must be {kinds}")
    return dict(layer_map)


class Projection(nn.Module):
    """The learned linear map from a student layer's width to the teacher's (``y = x W^T + b``).

    Deliberately not an ``nn.Linear``: it is a training aid that exists only during ``fit``, and
    compression techniques that select layers by type (pruning, quantization) must not touch it.
    Initialized like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _projection_key(student_layer: LayerKey) -> str:
    return "layer_" + str(student_layer).replace(".", "__")


class KnowledgeDistillation(TechniqueCallback):
    """Distil a teacher into the model being fine-tuned, without changing its ``training_step``.

    The loss becomes ``(1 - alpha) * task_loss + alpha * (kl_weight * KL + hidden_mse_weight * MSE +
    hidden_cosine_weight * (1 - cos) + attention_weight * attention MSE)``; each term is logged as
    ``shrink/distill/<term>``.

    How it works: in ``setup`` a forward hook is put on the *student*, the model inside the
    LightningModule (the outermost transformers ``PreTrainedModel`` submodule, else the
    LightningModule itself; ``student=`` names another). The hook records the inputs and outputs
    of the forward call that ``training_step`` makes; right after ``training_step`` the teacher runs
    under ``torch.inference_mode`` on the same inputs and the loss terms are added. For modules
    where that cannot work (the student is called twice, or the teacher needs other inputs), call
    :meth:`KnowledgeDistillation.record` in ``training_step``.

    The teacher is frozen (``requires_grad=False``), in eval mode, kept on the plugin (never a
    submodule of the LightningModule, so never in its checkpoint or optimizer) and moved to the
    LightningModule's device at set-up and fit start.

    Args:
        teacher: An ``nn.Module``, a LightningModule, a path to a Lightning checkpoint (loaded with
            ``teacher_class.load_from_checkpoint``) or a transformers model directory. A
            LightningModule teacher is called through its own inner model when it has one at the
            student's attribute path (or a transformers submodule).
        temperature: Softening temperature ``T > 0`` of the KL term (scaled by ``T**2``).
        alpha: Weight of the distillation terms in ``[0, 1]``; the task loss gets ``1 - alpha``. A
            callable ``global_step -> alpha`` schedules it.
        kl_weight: Weight of the logit KL divergence.
        hidden_mse_weight: Weight of the hidden-state MSE over ``layer_map``.
        hidden_cosine_weight: Weight of the hidden-state ``1 - cosine`` loss over ``layer_map``.
        attention_weight: Weight of the attention-map MSE over ``attention_layer_map``.
        layer_map: ``{student_layer: teacher_layer}`` for the hidden-state losses: indices into a
            transformers model's ``hidden_states`` (0 is the embeddings' output), or names of
            submodules whose outputs are compared (for any model). A learned linear projection maps
            the student's width to the teacher's where they differ.
        attention_layer_map: ``{student_layer: teacher_layer}`` indices into ``attentions``
            (transformers models; attention is switched to the eager implementation during ``fit``
            since SDPA returns no attention maps, and switched back at fit end).
        student: Dotted attribute path of the student inside the LightningModule (``""`` for the
            LightningModule itself); ``None`` chooses as described above.
        teacher_class: Class used to load a path teacher (a LightningModule class for a checkpoint,
            a transformers class for a directory).
        teacher_dtype: Run the teacher in this floating dtype (e.g. ``torch.bfloat16``).
        cache_key: Cache the teacher's logits per example, keyed by this batch field (e.g. the
            dataset index, ``"idx"``) or by a function ``batch -> keys``. Only with the KL term
            alone (hidden and attention terms need the teacher's forward anyway).
        logits_fn: Function ``model output -> logits`` for outputs that are neither a tensor, nor
            have ``.logits``/``["logits"]``, nor are a tuple with the logits first.
        name: The plugin's registered name, the namespace of its loss terms, metrics, checkpoint state
            and report rows; ``None``: ``"distillation"`` (``"distillation-2"``... for further instances).
    """

    plugin_name = "distillation"

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike[str],
        temperature: float = 2.0,
        alpha: float | Callable[[int], float] = 0.5,
        *,
        kl_weight: float = 1.0,
        hidden_mse_weight: float = 0.0,
        hidden_cosine_weight: float = 0.0,
        attention_weight: float = 0.0,
        layer_map: Mapping[LayerKey, LayerKey] | None = None,
        attention_layer_map: Mapping[int, int] | None = None,
        student: str | None = None,
        teacher_class: type | None = None,
        teacher_dtype: torch.dtype | None = None,
        cache_key: CacheKey | None = None,
        logits_fn: Callable[[Any], torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        validate_teacher_spec(teacher)
        self.teacher = teacher
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"KnowledgeDistillation: `temperature` must be a number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(
                f"KnowledgeDistillation: `temperature` must be finite and > 0, got {temperature!r}"
            )
        self.temperature = float(temperature)
        if callable(alpha):
            _check_alpha_value(alpha(0), "alpha(0)")
        else:
            alpha = _check_alpha_value(alpha, "the argument")
        self.alpha = alpha
        self.kl_weight = _check_weight("kl_weight", kl_weight)
        self.hidden_mse_weight = _check_weight("hidden_mse_weight", hidden_mse_weight)
        self.hidden_cosine_weight = _check_weight("hidden_cosine_weight", hidden_cosine_weight)
        self.attention_weight = _check_weight("attention_weight", attention_weight)
        if not any(
            (self.kl_weight, self.hidden_mse_weight, self.hidden_cosine_weight, self.attention_weight)
        ):
            raise ValueError(
                "KnowledgeDistillation: `kl_weight`, `hidden_mse_weight`, `hidden_cosine_weight` and "
                "`attention_weight` are all 0; distillation would do nothing"
            )
        uses_hidden = bool(self.hidden_mse_weight or self.hidden_cosine_weight)
        if uses_hidden and layer_map is None:
            raise ValueError(
                "KnowledgeDistillation: `hidden_mse_weight`/`hidden_cosine_weight` need `layer_map`, e.g. "
                "{2: 4} to match the student's hidden state 2 with the teacher's 4"
            )
        self.layer_map = _check_layer_map("layer_map", layer_map, False) if layer_map is not None else {}
        if self.attention_weight and attention_layer_map is None:
            raise ValueError(
                "KnowledgeDistillation: `attention_weight` needs `attention_layer_map`, e.g. {1: 3}"
            )
        self.attention_layer_map = (
            _check_layer_map("attention_layer_map", attention_layer_map, True)
            if attention_layer_map is not None
            else {}
        )
        if student is not None and not isinstance(student, str):
            raise TypeError(
                f"KnowledgeDistillation: `student` must be an attribute path (str), got {student!r}"
            )
        self.student = student
        if teacher_class is not None and not isinstance(teacher_class, type):
            raise TypeError(f"KnowledgeDistillation: `teacher_class` must be a class, got {teacher_class!r}")
        self.teacher_class = teacher_class
        if teacher_dtype is not None and (
            not isinstance(teacher_dtype, torch.dtype) or not teacher_dtype.is_floating_point
        ):
            raise ValueError(
                f"KnowledgeDistillation: `teacher_dtype` must be a floating torch.dtype, "
                f"got {teacher_dtype!r}"
            )
        self.teacher_dtype = teacher_dtype
        if cache_key is not None:
            if not (isinstance(cache_key, str) or callable(cache_key)):
                raise TypeError(
                    f"KnowledgeDistillation: `cache_key` must be a batch field name or a function, "
                    f"got {cache_key!r}"
                )
            if uses_hidden or self.attention_weight:
                raise ValueError(
                    "KnowledgeDistillation: `cache_key` caches logits only; it cannot be combined with "
                    "hidden-state or attention losses, which need the teacher's forward at every step"
                )
        self.cache_key = cache_key
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"KnowledgeDistillation: `logits_fn` must be callable, got {logits_fn!r}")
        self.logits_fn = logits_fn

    def make_plugin(self) -> DistillationPlugin:
        return DistillationPlugin(self)

    def alpha_at(self, step: int) -> float:
        """The value of ``alpha`` at optimizer step ``step``."""
        if callable(self.alpha):
            return _check_alpha_value(self.alpha(step), f"alpha({step})")
        return self.alpha

    @staticmethod
    def record(pl_module: pl.LightningModule, student_output: Any, *args: Any, **kwargs: Any) -> None:
        """The one hook for modules that the automatic capture cannot serve.

        Call it in ``training_step`` with the student's output and the inputs to give the teacher::

            out = self.model(**batch)
            KnowledgeDistillation.record(self, out, **batch)

        A recorded call takes precedence over what the forward hook captured in that step; use it
        when the student is called more than once per step, or when the teacher must get other
        inputs than the student. Outside a distillation ``fit`` it does nothing.
        """
        trainer = getattr(pl_module, "_trainer", None)
        if trainer is None:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, KnowledgeDistillation) and cb._plugin is not None:
                cb._plugin.recorded = (args, kwargs, student_output)


class _Capture:
    __slots__ = ("args", "kwargs", "output")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.output = output


class DistillationPlugin(TechniquePlugin):
    """The hooks of :class:`KnowledgeDistillation` (one instance per callback)."""

    default_name = "distillation"

    def __init__(self, config: KnowledgeDistillation) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.teacher_target: nn.Module | None = None
        self.student_name = ""
        self.student_module: nn.Module | None = None
        self.projections: nn.ModuleDict | None = None
        self.projections_attribute = PROJECTIONS_ATTRIBUTE
        self.cache = TeacherLogitCache(config.cache_key) if config.cache_key is not None else None
        self.recorded: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._armed = False
        self._captures: list[_Capture] = []
        self._student_layers: dict[str, Any] = {}
        self._teacher_layers: dict[str, Any] = {}
        self._capturing_teacher = False
        self._handles: list[Any] = []
        self._attn_restore: list[tuple[nn.Module, str]] = []
        self._alpha = 0.0
        self._teacher_device: torch.device | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = []
        state["_captures"] = []
        state["recorded"] = None
        return state

    # ------------------------------------------------------------------ set-up

    @property
    def _uses_hidden(self) -> bool:
        return bool(self.config.hidden_mse_weight or self.config.hidden_cosine_weight)

    def _int_layers(self) -> bool:
        return any(isinstance(k, int) for k in self.config.layer_map)

    # trylast: plugins that swap modules (quantization) do it first, so the hooks and projections
    # made here attach to the final modules.
    @hookimpl(trylast=True)
    def shrink_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        cfg = self.config
        teacher = self.teacher
        if teacher is None:
            teacher = load_teacher(cfg.teacher, cfg.teacher_class, type(pl_module))
        self.student_name, self.student_module = find_inner_model(pl_module, cfg.student, "student")
        # Check before freezing: a teacher that is the student must not get frozen.
        check_not_training(teacher, pl_module, self.student_module)
        if self.teacher is None:
            freeze(teacher, cfg.teacher_dtype)
            self.teacher = teacher
        freeze(teacher, None)
        self.teacher_target = self._teacher_target(teacher)
        self._validate_layers()
        self._prepare_attention()
        self._make_projections(pl_module)
        self._register_hooks()
        self._move_teacher(pl_module.device)

    def _teacher_target(self, teacher: nn.Module) -> nn.Module:
        if not isinstance(teacher, pl.LightningModule):
            return teacher
        if self.student_name:
            try:
                return teacher.get_submodule(self.student_name)
            except AttributeError:
                pass
        return find_inner_model(teacher, None, "teacher")[1]

    def _validate_layers(self) -> None:
        cfg = self.config
        student, teacher = self.student_module, self.teacher_target
        assert student is not None and teacher is not None
        maps = []
        if self._uses_hidden:
            maps.append(("layer_map", cfg.layer_map, "hidden states", 1))
        if cfg.attention_weight:
            maps.append(("attention_layer_map", cfg.attention_layer_map, "attention maps", 0))
        for arg, layer_map, what, extra in maps:
            for s_key, t_key in layer_map.items():
                for side, model, key in (("student", student, s_key), ("teacher", teacher, t_key)):
                    if isinstance(key, str):
                        try:
                            model.get_submodule(key)
                        except AttributeError:
                            raise ValueError(
                                f"KnowledgeDistillation: `{arg}` entry {s_key!r}: {t_key!r}: the {side} "
                                f"({type(model).__name__}) has no submodule {key!r}"
                            ) from None
                        continue
                    if not is_transformers_model(model):
                        raise ValueError(
                            f"KnowledgeDistillation: `{arg}` uses integer layer indices, which index the "
                            f"{what} of a transformers model, but the {side} is a {type(model).__name__}; "
                            "name submodules instead (e.g. {'net.2': 'net.2'}) or set `student=`"
                        )
                    count = int(model.config.num_hidden_layers) + extra
                    if not -count <= key < count:
                        raise IndexError(
                            f"KnowledgeDistillation: `{arg}` entry {s_key!r}: {t_key!r}: {side} layer {key} "
                            f"is out of range; the {side} ({type(model).__name__}) has {count} {what} "
                            f"(indices 0..{count - 1}" + (", 0 = embeddings" if extra else "") + ")"
                        )

    def _prepare_attention(self) -> None:
        if not self.config.attention_weight or self._attn_restore:
            return
        for model in (self.student_module, self.teacher_target):
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if impl is not None and impl != "eager":
                model.set_attn_implementation("eager")
                self._attn_restore.append((model, impl))

    def _restore_attention(self) -> None:
        for model, impl in self._attn_restore:
            model.set_attn_implementation(impl)
        self._attn_restore.clear()

    @staticmethod
    def _width(model: nn.Module, key: LayerKey, side: str) -> int:
        if isinstance(key, int):
            return int(model.config.hidden_size)
        module = model.get_submodule(key)
        for attr in ("out_features", "embedding_dim", "hidden_size", "nf"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
        shape = getattr(module, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        raise ValueError(
            f"KnowledgeDistillation: cannot tell the output width of the {side}'s layer {key!r} "
            f"({type(module).__name__}); map layers with a known width (Linear, LayerNorm, Embedding)"
        )

    def _make_projections(self, pl_module: pl.LightningModule) -> None:
        if not self._uses_hidden:
            return
        if self.projections is None:
            projections = nn.ModuleDict()
            for s_key, t_key in self.config.layer_map.items():
                s_width = self._width(self.student_module, s_key, "student")
                t_width = self._width(self.teacher_target, t_key, "teacher")
                if s_width != t_width:
                    projections[_projection_key(s_key)] = Projection(s_width, t_width)
            if not len(projections):
                return
            # Projections are training aids: their weights travel in the plugin's checkpoint state,
            # not in the student's state_dict (so the student's checkpoint loads without them).
            projections.register_state_dict_post_hook(_drop_own_keys)
            projections.register_load_state_dict_pre_hook(_fill_own_keys)
            self.projections = projections.to(device=pl_module.device)
        # "distill_projections" for the first callback, "distill_projections_2" for a second one.
        suffix = (
            "" if self.name == self.default_name else "_" + re.sub(r"\W", "_", self.name.split("-", 1)[-1])
        )
        attribute = PROJECTIONS_ATTRIBUTE + suffix
        existing = getattr(pl_module, attribute, None)
        if existing is not None and existing is not self.projections:
            raise ValueError(
                f"KnowledgeDistillation: {type(pl_module).__name__} already has an attribute {attribute!r}; "
                "the learned projections cannot be registered under it (rename that attribute)"
            )
        self.projections_attribute = attribute
        pl_module.add_module(attribute, self.projections)

    def _remove_projections(self, pl_module: pl.LightningModule) -> None:
        attribute = self.projections_attribute
        if self.projections is not None and pl_module._modules.get(attribute) is self.projections:
            del pl_module._modules[attribute]

    def _register_hooks(self) -> None:
        self._remove_hooks()
        student, teacher = self.student_module, self.teacher_target
        assert student is not None and teacher is not None
        self._handles.append(student.register_forward_pre_hook(self._student_pre_hook, with_kwargs=True))
        self._handles.append(student.register_forward_hook(self._student_hook, with_kwargs=True))
        maps = list(self.config.layer_map.items()) if self._uses_hidden else []
        for s_key, t_key in maps:
            if isinstance(s_key, str):
                self._handles.append(
                    student.get_submodule(s_key).register_forward_hook(
                        self._layer_hook(self._student_layers, s_key)
                    )
                )
                self._handles.append(
                    teacher.get_submodule(t_key).register_forward_hook(
                        self._layer_hook(self._teacher_layers, t_key)
                    )
                )

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _output_request(self) -> dict[str, bool]:
        request = {}
        if self._uses_hidden and self._int_layers():
            request["output_hidden_states"] = True
        if self.config.attention_weight:
            request["output_attentions"] = True
        return request

    def _student_pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        if not self._armed or not is_transformers_model(module):
            return None
        request = self._output_request()
        if not request:
            return None
        return args, {**kwargs, **request}

    def _student_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self._armed:
            self._captures.append(_Capture(tuple(args), dict(kwargs), output))

    def _layer_hook(self, store: dict[str, Any], key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            armed = self._capturing_teacher if store is self._teacher_layers else self._armed
            if armed:
                store[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _move_teacher(self, device: torch.device) -> None:
        if self.teacher is not None and self._teacher_device != device:
            self.teacher.to(device=device)
            self._teacher_device = device

    # ------------------------------------------------------------------ fit

    @hookimpl
    def shrink_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._move_teacher(pl_module.device)
        optimized = {
            id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]
        }
        assert self.teacher is not None
        for name, p in self.teacher.named_parameters():
            if id(p) in optimized:
                raise ValueError(
                    f"KnowledgeDistillation: the teacher's parameter {name!r} is in the optimizer of "
                    f"{type(pl_module).__name__}; the teacher must stay frozen"
                )
        if self.projections is not None:
            missing = [n for n, p in self.projections.named_parameters() if id(p) not in optimized]
            if missing:
                raise ValueError(
                    f"KnowledgeDistillation: the projections {self.projections_attribute}.{missing[0]} "
                    f"(student width -> teacher width) are not in the optimizer; build it from "
                    f"self.parameters() in {type(pl_module).__name__}.configure_optimizers to train them"
                )

    @hookimpl
    def shrink_train_batch_start(self, trainer: pl.Trainer) -> None:
        self._captures.clear()
        self._student_layers.clear()
        self.recorded = None
        self._alpha = self.config.alpha_at(trainer.global_step)
        self._armed = True

    @hookimpl
    def shrink_loss_weight(self) -> float:
        return 1.0 - self._alpha

    @hookimpl
    def shrink_training_loss(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        self._armed = False
        try:
            return self._loss_terms(pl_module, batch)
        finally:
            self._captures.clear()
            self._student_layers.clear()
            self._teacher_layers.clear()
            self.recorded = None

    def _capture(self, pl_module: pl.LightningModule) -> _Capture:
        if self.recorded is not None:
            return _Capture(*self.recorded)
        where = (
            f"{type(pl_module).__name__}.{self.student_name}"
            if self.student_name
            else type(pl_module).__name__
        )
        if not self._captures:
            raise RuntimeError(
                f"KnowledgeDistillation: the student ({where}, {type(self.student_module).__name__}) was not "
                "called during training_step, so there is nothing to distil into; call the model as a module "
                "(self.model(...) or self(...), not .forward), set `student=` to the attribute that is "
                "called, or call KnowledgeDistillation.record(self, outputs, *inputs) in training_step"
            )
        if len(self._captures) > 1:
            raise RuntimeError(
                f"KnowledgeDistillation: the student ({where}) was called {len(self._captures)} times in one "
                "training_step; say which call to distil with KnowledgeDistillation.record(self, outputs, "
                "*inputs) in training_step"
            )
        return self._captures[0]

    def _loss_terms(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.config
        alpha = self._alpha
        capture = self._capture(pl_module)
        student_logits = self._logits(capture.output, "student") if cfg.kl_weight else None
        if alpha == 0.0:
            # Keep every trainable piece in the graph (DDP expects the same parameters every step).
            zero = torch.zeros((), device=pl_module.device)
            if self.projections is not None:
                zero = zero + sum(p.sum() * 0.0 for p in self.projections.parameters())
            return {f"{self.name}/{name}": zero for name in self._term_names()}
        mask = capture.kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None
        teacher_logits = None
        keys = fingerprints = None
        if self.cache is not None and student_logits is not None:
            batch_size = student_logits.shape[0]
            keys = self.cache.keys_for(batch, batch_size)
            fingerprints = input_fingerprints(capture.args, capture.kwargs, batch_size)
            cached = self.cache.lookup(keys, fingerprints)
            if cached is not None:
                teacher_logits = cached.to(student_logits.device)
        teacher_out = None
        if teacher_logits is None:
            teacher_out = self._run_teacher(pl_module, capture)
            if student_logits is not None:
                teacher_logits = self._logits(teacher_out, "teacher")
                if self.cache is not None:
                    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
                        losses._check_shapes("logits", student_logits, teacher_logits)
                    self.cache.store(keys, teacher_logits, fingerprints)
        terms: dict[str, torch.Tensor] = {}
        if student_logits is not None:
            kl_mask = mask if mask is not None and student_logits.dim() == 3 else None
            kl = losses.kl_divergence_loss(student_logits, teacher_logits, cfg.temperature, kl_mask)
            terms["kl"] = alpha * cfg.kl_weight * kl
        if self._uses_hidden:
            mse = cos = None
            for s_key, t_key in cfg.layer_map.items():
                s_h = self._hidden(capture.output, s_key, "student")
                t_h = self._hidden(teacher_out, t_key, "teacher")
                proj_key = _projection_key(s_key)
                if self.projections is not None and proj_key in self.projections:
                    s_h = self.projections[proj_key](s_h.to(self.projections[proj_key].weight.dtype))
                h_mask = mask if mask is not None and s_h.dim() == 3 else None
                if cfg.hidden_mse_weight:
                    value = losses.hidden_mse_loss(s_h, t_h, h_mask)
                    mse = value if mse is None else mse + value
                if cfg.hidden_cosine_weight:
                    value = losses.hidden_cosine_loss(s_h, t_h, h_mask)
                    cos = value if cos is None else cos + value
            n = len(cfg.layer_map)
            if mse is not None:
                terms["hidden_mse"] = alpha * cfg.hidden_mse_weight * mse / n
            if cos is not None:
                terms["hidden_cosine"] = alpha * cfg.hidden_cosine_weight * cos / n
        if cfg.attention_weight:
            total = None
            for s_key, t_key in cfg.attention_layer_map.items():
                s_a = self._indexed(capture.output, "attentions", s_key, "student", "attention_layer_map")
                t_a = self._indexed(teacher_out, "attentions", t_key, "teacher", "attention_layer_map")
                value = losses.attention_loss(s_a, t_a)
                total = value if total is None else total + value
            terms["attention"] = alpha * cfg.attention_weight * total / len(cfg.attention_layer_map)
        return {f"{self.name}/{name}": value for name, value in terms.items()}

    def _term_names(self) -> list[str]:
        cfg = self.config
        names = []
        if cfg.kl_weight:
            names.append("kl")
        if cfg.hidden_mse_weight:
            names.append("hidden_mse")
        if cfg.hidden_cosine_weight:
            names.append("hidden_cosine")
        if cfg.attention_weight:
            names.append("attention")
        return names

    def _run_teacher(self, pl_module: pl.LightningModule, capture: _Capture) -> Any:
        teacher, target = self.teacher, self.teacher_target
        assert teacher is not None and target is not None
        self._move_teacher(pl_module.device)
        if teacher.training:
            teacher.eval()
        args, kwargs = capture.args, dict(capture.kwargs)
        if is_transformers_model(target):
            kwargs.pop("labels", None)
            kwargs.update(self._output_request())
        if self.config.teacher_dtype is not None:
            args = _cast_floats(args, self.config.teacher_dtype)
            kwargs = _cast_floats(kwargs, self.config.teacher_dtype)
        self._teacher_layers.clear()
        self._capturing_teacher = True
        try:
            with torch.inference_mode():
                output = target(*args, **kwargs)
        finally:
            self._capturing_teacher = False
        return output

    def _logits(self, output: Any, side: str) -> torch.Tensor:
        if self.config.logits_fn is not None:
            logits = self.config.logits_fn(output)
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
                f"KnowledgeDistillation: cannot find logits in the {side}'s output "
                f"({type(output).__name__}); pass `logits_fn=` (output -> logits tensor)"
            )
        return _plain(logits)

    def _hidden(self, output: Any, key: LayerKey, side: str) -> torch.Tensor:
        if isinstance(key, str):
            store = self._student_layers if side == "student" else self._teacher_layers
            if key not in store:
                raise RuntimeError(
                    f"KnowledgeDistillation: the {side}'s layer {key!r} (from `layer_map`) did not run "
                    "during its forward call"
                )
            return _plain(store[key])
        return self._indexed(output, "hidden_states", key, side, "layer_map")

    @staticmethod
    def _indexed(output: Any, field: str, key: int, side: str, arg: str) -> torch.Tensor:
        values = getattr(output, field, None)
        if values is None and isinstance(output, Mapping):
            values = output.get(field)
        if not values:
            raise RuntimeError(
                f"KnowledgeDistillation: the {side}'s output has no `{field}` (needed by `{arg}`); a "
                f"transformers model returns them when called with output_{field}=True (set automatically "
                "unless the model ignores it or is called with return_dict=False)"
            )
        if not -len(values) <= key < len(values):
            raise IndexError(
                f"KnowledgeDistillation: `{arg}`: {side} layer {key} is out of range; the {side} returned "
                f"{len(values)} {field} (indices 0..{len(values) - 1})"
            )
        return _plain(values[key])

    # ------------------------------------------------------------------ metrics and state

    @hookimpl
    def shrink_metrics(self) -> dict[str, float]:
        # Called at the end of every training batch: disarm here too, so a training_step that
        # returned None (skipped batch, no shrink_training_loss call) leaves nothing captured.
        self._armed = False
        self._captures.clear()
        metrics = {f"{self.name}/alpha": self._alpha}
        if self.cache is not None:
            lookups = self.cache.hits + self.cache.misses
            metrics[f"{self.name}/cache_hit_rate"] = self.cache.hits / lookups if lookups else 0.0
        return metrics

    @hookimpl
    def shrink_save_state(self, state: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"version": 1}
        if self.projections is not None:
            entry["projections"] = {
                k: v.detach().cpu().clone() for k, v in _raw_state(self.projections).items()
            }
        state[self.name] = entry

    @hookimpl
    def shrink_load_state(self, pl_module: pl.LightningModule, state: Mapping[str, Any]) -> None:
        entry = state.get(self.name) or {}
        saved = entry.get("projections")
        if not saved:
            return
        if self.projections is None:
            raise ValueError(
                f"KnowledgeDistillation: the checkpoint holds learned projections for layers "
                f"{sorted({k.split('.')[0] for k in saved})}, but this run's `layer_map` needs none"
            )
        current = _raw_state(self.projections)
        if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
            raise ValueError(
                "KnowledgeDistillation: the checkpoint's learned projections "
                f"{ {k: tuple(v.shape) for k, v in saved.items()} } do not match this run's "
                f"{ {k: tuple(v.shape) for k, v in current.items()} }; use the same `layer_map` and models"
            )
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(saved[k].to(v.device, v.dtype))
        del pl_module

    # ------------------------------------------------------------------ finalize

    def _finalize(self, pl_module: pl.LightningModule) -> None:
        self._armed = False
        self._remove_hooks()
        self._restore_attention()
        self._remove_projections(pl_module)
        self._captures.clear()
        self._student_layers.clear()
        self._teacher_layers.clear()
        self.recorded = None

    @hookimpl
    def shrink_fit_end(self, pl_module: pl.LightningModule) -> None:
        self._finalize(pl_module)

    @hookimpl
    def shrink_teardown(self, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finalize(pl_module)


def _plain(t: Any) -> torch.Tensor:
    """An inference-mode tensor made usable by autograd (a clone); others unchanged."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        return t.clone()
    return t


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    return value


def _raw_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters and buffers by name, bypassing its state_dict hooks."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _drop_own_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # A student checkpoint has no projection weights (they are restored from the plugin's state by
    # shrink_load_state, which runs first): keep the current ones instead of reporting them missing.
    for name, value in _raw_state(module).items():
        state_dict.setdefault(prefix + name, value.detach())
