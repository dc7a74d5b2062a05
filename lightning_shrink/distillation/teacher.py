"""The teacher: loading it, finding the model inside a LightningModule, freezing it, checking that it
is not still being trained and that it can read the student's token ids, placing it and running it."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = [
    "VocabularyGuard",
    "cast_floats",
    "check_not_training",
    "find_inner_model",
    "freeze",
    "is_sharded",
    "is_transformers_model",
    "load_teacher",
    "place_teacher",
    "run_teacher",
    "shard_teacher",
    "teacher_identity",
    "validate_teacher_spec",
]


def is_transformers_model(module: Any) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (without importing transformers:
    a module can only be one if transformers is already imported)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def find_inner_model(
    module: nn.Module, path: str | None = None, argument: str = "student"
) -> tuple[str, nn.Module]:
    """The model whose forward call distillation watches, as ``(dotted name, module)``.

    ``path`` names a submodule explicitly (``"model"``, ``"encoder.backbone"``; ``""`` is
    ``module`` itself). Without it: the outermost submodule that is a transformers
    ``PreTrainedModel``, else ``module`` itself.
    """
    if path is not None:
        if path == "":
            return "", module
        try:
            return path, module.get_submodule(path)
        except AttributeError:
            children = [name for name, _ in module.named_children()]
            raise AttributeError(
                f"KnowledgeDistillation: `{argument}={path!r}` names no submodule of {type(module).__name__} "
                f"(its children: {children})"
            ) from None
    for name, sub in module.named_modules():
        if name and is_transformers_model(sub):
            return name, sub
    return "", module


def validate_teacher_spec(teacher: Any) -> None:
    """Raise at construction for a teacher that cannot be one."""
    if isinstance(teacher, nn.Module):
        return
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"KnowledgeDistillation: `teacher={str(teacher)!r}` is a directory without config.json; "
                    "give a transformers model directory or a Lightning checkpoint file"
                )
            return
        if path.is_file():
            return
        raise FileNotFoundError(f"KnowledgeDistillation: `teacher={str(teacher)!r}` does not exist")
    raise TypeError(
        "KnowledgeDistillation: `teacher` must be an nn.Module, a LightningModule, or a path to a Lightning "
        f"checkpoint or a transformers model directory; got {type(teacher).__name__}"
    )


def load_teacher(teacher: Any, teacher_class: type | None, default_class: type) -> nn.Module:
    """Return the teacher module for a teacher argument (a module is returned as it is).

    A directory is loaded with transformers (``teacher_class.from_pretrained`` if given, else the
    class named in its ``config.json`` ``architectures``, else ``AutoModel``); a file is a Lightning
    checkpoint loaded with ``teacher_class.load_from_checkpoint`` (default: the student's
    LightningModule class), on the CPU.
    """
    if isinstance(teacher, nn.Module):
        return teacher
    path = Path(teacher)
    if path.is_dir():
        if teacher_class is not None:
            return teacher_class.from_pretrained(str(path))
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path))
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            cls = transformers.AutoModel
        return cls.from_pretrained(str(path))
    cls = teacher_class or default_class
    if not hasattr(cls, "load_from_checkpoint"):
        raise TypeError(
            f"KnowledgeDistillation: cannot load the checkpoint `teacher={str(teacher)!r}` with "
            f"{cls.__name__}: `teacher_class` must be a LightningModule class"
        )
    return cls.load_from_checkpoint(str(path), map_location="cpu")


def freeze(teacher: nn.Module, dtype: torch.dtype | None) -> None:
    """Freeze the teacher in place: no gradients, eval mode, optionally a lower precision."""
    teacher.requires_grad_(False)
    teacher.eval()
    if dtype is not None:
        teacher.to(dtype=dtype)


def check_not_training(teacher: nn.Module, pl_module: pl.LightningModule, student: nn.Module) -> None:
    """Raise if the teacher is still being trained.

    "Still training" means any of: the teacher *is* the student (the LightningModule or its inner
    model; for a LoRA student also its base model, which holds the adapters and the base weights
    compression changes in place); it shares a parameter (the same tensor or the same storage) with
    the LightningModule, so the student's optimizer or compression would change it; or it is a
    LightningModule attached to a Trainer that is running ``fit`` right now.
    """
    from lightning_shrink.adapters import has_lora

    lora = (
        " A LoRA student's base model is the student's own weights (the frozen base under the adapters, "
        "which pruning and quantization-aware training change in place), not a dense teacher: distil from "
        "a separate model, e.g. a copy of the base model made before get_peft_model, or a path"
        if has_lora(pl_module)
        else ""
    )
    if teacher is pl_module or teacher is student:
        raise ValueError(
            f"KnowledgeDistillation: the teacher is the student itself ({type(teacher).__name__}); give a "
            f"separate, already trained model as `teacher`.{lora}"
        )
    ids: dict[int, bool] = {}
    storages: set[int] = set()
    for p in pl_module.parameters():
        ids[id(p)] = p.requires_grad
        if p.numel() and p.device.type != "meta":
            storages.add(_local(p).untyped_storage().data_ptr())
    for name, p in teacher.named_parameters():
        shared = id(p) in ids or (
            p.numel() and p.device.type != "meta" and _local(p).untyped_storage().data_ptr() in storages
        )
        if shared:
            effect = (
                "so the student's optimizer would train the teacher"
                if ids.get(id(p), True)
                else "a frozen weight of the student, which the student's compression may change in place"
            )
            raise ValueError(
                f"KnowledgeDistillation: the teacher ({type(teacher).__name__}) shares its parameter "
                f"{name!r} with the student ({type(pl_module).__name__}), {effect}; give the teacher as a "
                f"separate copy (e.g. copy.deepcopy).{lora}"
            )
    trainer = None
    if isinstance(teacher, pl.LightningModule):
        try:
            trainer = teacher.trainer
        except RuntimeError:  # "... is not attached to a `Trainer`"
            trainer = None
    if trainer is not None:
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        if trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING:
            raise ValueError(
                f"KnowledgeDistillation: the teacher ({type(teacher).__name__}) is attached to a Trainer "
                "that is fitting it right now; distil from a trained teacher, not one in training"
            )


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or ``p``."""
    return p.to_local() if type(p).__name__ == "DTensor" else p


def place_teacher(
    teacher: nn.Module, pl_module: pl.LightningModule, strategy: Any = None, target: nn.Module | None = None
) -> None:
    """Put the teacher where it runs: the one place that decides the teacher's placement.

    Under ``ModelParallelStrategy`` whose student is sharded by FSDP2 (``fully_shard``), the model
    the teacher's forward calls (``target``, default the teacher) is sharded alike, on the student's
    mesh (:func:`shard_teacher`): each rank holds ``1 / world`` of it, and its forward gathers one
    block at a time. Otherwise a full copy on the LightningModule's
    device in every process (under DDP each rank runs its own copy on its own shard of the data; the
    teacher is never wrapped by the strategy). Called at set-up and again at fit start, after the
    strategy placed the model.
    """
    mesh = _student_mesh(pl_module, strategy)
    if mesh is not None:
        shard_teacher(teacher if target is None else target, mesh)
        return
    device = pl_module.device
    if any(p.device != device for p in teacher.parameters()) or any(
        b.device != device for b in teacher.buffers()
    ):
        teacher.to(device=device)


def _student_mesh(pl_module: pl.LightningModule, strategy: Any) -> Any:
    """The 1-D device mesh the student's parameters are sharded on by FSDP2 under
    ``ModelParallelStrategy``, or ``None``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return None
    for p in pl_module.parameters():
        if type(p).__name__ == "DTensor" and p.device_mesh.ndim == 1:
            return p.device_mesh
    return None


def is_sharded(teacher: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` sharded ``teacher``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(teacher, FSDPModule)


def shard_teacher(teacher: nn.Module, mesh: Any) -> None:
    """Shard a frozen teacher with FSDP2 on ``mesh``, in place (nothing happens when it is sharded).

    Each transformer block is its own FSDP2 unit (the classes a transformers model names in
    ``_no_split_modules``; for other models every direct child with parameters), then the whole
    teacher: its forward gathers one block's parameters at a time and frees them after the block.
    Parameters move to the mesh's device one unit at a time, as they are sharded.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(teacher):
        return
    names = set(getattr(teacher, "_no_split_modules", None) or ())
    blocks = [m for m in teacher.modules() if m is not teacher and type(m).__name__ in names]
    if not blocks:
        blocks = [m for m in teacher.children() if any(True for _ in m.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    teacher.requires_grad_(False)
    # Buffers are not sharded: they follow the parameters to the mesh's device.
    device = next(p.device for p in teacher.parameters())
    for module in teacher.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (nested in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast_floats(v, dtype) for v in value]
    return value


def run_teacher(
    target: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output_request: dict[str, bool],
    dtype: torch.dtype | None,
) -> Any:
    """Call the teacher on the student's inputs under ``torch.inference_mode``.

    A transformers teacher gets no ``labels`` (its loss is not needed) and the outputs the loss
    terms need (``output_hidden_states``, ``output_attentions``); with ``dtype``, floating inputs
    are cast to the teacher's dtype.
    """
    kwargs = dict(kwargs)
    if is_transformers_model(target):
        kwargs.pop("labels", None)
        kwargs.update(output_request)
    if dtype is not None:
        args = cast_floats(args, dtype)
        kwargs = cast_floats(kwargs, dtype)
    if target.training:
        target.eval()
    # FSDP2 gathers a sharded teacher's parameters into buffers it keeps between steps, which
    # inference mode would turn into inference tensors: no_grad there.
    with torch.no_grad() if _has_sharded_parameters(target) else torch.inference_mode():
        return target(*args, **kwargs)


def _has_sharded_parameters(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in itertools.islice(module.parameters(), 1))


def teacher_identity(teacher: nn.Module) -> dict[str, Any]:
    """Plain data that tells teachers apart: class, parameter count, dtypes and a fingerprint of the
    weights (the float64 sum of every parameter tensor, computed without copies)."""
    params = list(teacher.parameters())
    with torch.no_grad():
        # A sharded teacher's parameters are gathered one at a time: the fingerprint is the same
        # however the teacher is placed.
        sums = [
            torch.sum(
                p.full_tensor() if type(p).__name__ == "DTensor" else p.detach(), dtype=torch.float64
            ).cpu()
            for p in params
        ]
    return {
        "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "parameters": sum(p.numel() for p in params),
        "dtype": ", ".join(sorted({str(p.dtype) for p in params})),
        "fingerprint": torch.stack(sums).tolist() if sums else [],
    }


def _input_embedding_rows(model: nn.Module) -> int | None:
    """Rows of a transformers model's input (token) embedding, or ``None`` when not known."""
    if not is_transformers_model(model):
        return None
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if isinstance(rows, int) else None


def _largest_id(ids: Any) -> int | None:
    """The largest value of an integer tensor of ids, or ``None`` for anything else."""
    if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point() and not ids.is_complex():
        return int(ids.max())
    return None


class VocabularyGuard:
    """Makes a teacher that cannot read the student's token ids fail clearly, naming both sizes.

    :meth:`attach` compares the student's and the teacher's vocabularies at set-up when both are
    transformers models (sizes from their input embeddings) and raises there. When a size is not
    known from the models, every batch is checked instead, before the teacher runs: the
    ``input_ids`` given to a transformers teacher against its input embedding, and for any other
    teacher the indices reaching each of its ``nn.Embedding`` layers (checked by forward pre-hooks,
    before the lookup). Those checks read the largest id of the batch (one device synchronization
    per batch, only when the set-up could not decide).
    """

    def __init__(self) -> None:
        self._teacher_rows: int | None = None
        self._student_rows: int | None = None
        self._per_batch = False
        self._handles: list[Any] = []

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Check the vocabularies now if both sizes are known, else arm the per-batch checks."""
        self.detach()
        self._student_rows = _input_embedding_rows(student)
        self._teacher_rows = _input_embedding_rows(teacher)
        if self._student_rows is not None and self._teacher_rows is not None:
            if self._teacher_rows < self._student_rows:
                raise ValueError(
                    f"KnowledgeDistillation: the teacher's vocabulary ({type(teacher).__name__}, "
                    f"{self._teacher_rows} token ids) is smaller than the student's "
                    f"({type(student).__name__}, {self._student_rows} token ids): student token ids "
                    f"{self._teacher_rows}..{self._student_rows - 1} would index past the teacher's "
                    "embedding; distil from a teacher that shares the student's tokenizer"
                )
            self._per_batch = False
            return
        self._per_batch = True
        if self._teacher_rows is None:
            for name, module in teacher.named_modules():
                if isinstance(module, nn.Embedding):
                    self._handles.append(module.register_forward_pre_hook(self._embedding_hook(name or "")))

    def detach(self) -> None:
        """Remove the embedding hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before a transformers teacher runs: its ``input_ids`` must index its input embedding."""
        if not self._per_batch or self._teacher_rows is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        largest = _largest_id(ids)
        if largest is not None and largest >= self._teacher_rows:
            raise ValueError(
                f"KnowledgeDistillation: the batch holds token id {largest}, but the teacher's vocabulary "
                f"has {self._teacher_rows} token ids (0..{self._teacher_rows - 1}); the student and the "
                "teacher must share a tokenizer (checked before the teacher runs)"
            )

    def _embedding_hook(self, name: str) -> Any:
        def hook(module: nn.Embedding, args: tuple[Any, ...]) -> None:
            largest = _largest_id(args[0] if args else None)
            if largest is not None and largest >= module.num_embeddings:
                raise ValueError(
                    f"KnowledgeDistillation: the teacher's embedding {name!r} has {module.num_embeddings} "
                    f"rows (ids 0..{module.num_embeddings - 1}), but the inputs given to the teacher hold id "
                    f"{largest}; the student and the teacher must share a vocabulary (checked before the "
                    "lookup)"
                )

        return hook

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = []
        return state
