"""The teacher: loading it, finding the model inside a LightningModule, freezing it, and checking
that it is not still being trained."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["find_inner_model", "freeze", "is_transformers_model", "load_teacher", "validate_teacher_spec"]


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
                f"KnowledgeDistillation: `{argument}={path!r}` names no submodule of "
                f"{type(module).__name__} (its children: {children})"
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
    model); it shares a parameter (the same tensor or the same storage) with the LightningModule,
    so the student's optimizer would change it; or it is a LightningModule attached to a Trainer
    that is running ``fit`` right now.
    """
    if teacher is pl_module or teacher is student:
        raise ValueError(
            f"KnowledgeDistillation: the teacher is the student itself ({type(teacher).__name__}); "
            "give a separate, already trained model as `teacher`"
        )
    ids: set[int] = set()
    storages: set[int] = set()
    for p in pl_module.parameters():
        ids.add(id(p))
        if p.numel() and p.device.type != "meta":
            storages.add(p.untyped_storage().data_ptr())
    for name, p in teacher.named_parameters():
        shared = id(p) in ids or (
            p.numel() and p.device.type != "meta" and p.untyped_storage().data_ptr() in storages
        )
        if shared:
            raise ValueError(
                f"KnowledgeDistillation: the teacher ({type(teacher).__name__}) shares its parameter "
                f"{name!r} with the student ({type(pl_module).__name__}), so the student's optimizer "
                "would train the teacher; give the teacher as a separate copy (e.g. copy.deepcopy)"
            )
    trainer = getattr(teacher, "_trainer", None) if isinstance(teacher, pl.LightningModule) else None
    if trainer is not None:
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        if trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING:
            raise ValueError(
                f"KnowledgeDistillation: the teacher ({type(teacher).__name__}) is attached to a Trainer "
                "that is fitting it right now; distil from a trained teacher, not one in training"
            )
