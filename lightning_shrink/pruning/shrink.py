"""Physical removal of pruned heads and neurons, and the per-layer structure an export records.

:func:`shrink_zero_groups` (called by :func:`lightning_shrink.convert`) finds every group (see
:mod:`lightning_shrink.pruning.structured`) whose weights are all zero and removes it: the layers get
smaller weights (``nn.Linear`` and transformers' ``Conv1D``, float or fake-quantized, keep their
class), and the attention modules their new head counts (``num_attention_heads`` / ``all_head_size``
for BERT, ``num_heads`` / ``split_size`` for GPT-2). Removing a group whose output-side weights are
zero changes no output, so the converted model computes what the masked one did. Per-layer sizes may
differ; every layer keeps at least one group.

:func:`structure_of` describes the shrunk layers for an export (``metadata["structure"]``), and
:func:`apply_structure` shrinks a freshly built model to that structure before the tensors are
loaded, checking every recorded number and shape (the export is data: nothing in it runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_shrink.pruning.selection import is_conv1d
from lightning_shrink.pruning.structured import STRUCTURED_KINDS, GroupSpec, discover, pruned_groups

__all__ = ["METADATA_KEY", "apply_structure", "remove_groups", "shrink_zero_groups", "structure_of"]

#: The section of ``shrink_config.json`` that records shrunk layers.
METADATA_KEY = "structure"
FORMAT_VERSION = 1


def _float_layer(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and module.weight.is_floating_point()


def _slice_param(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, attr)
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))


def remove_groups(model: nn.Module, spec: GroupSpec, pruned: torch.Tensor) -> None:
    """Remove the groups of ``spec`` where ``pruned`` (bool ``(count,)``) is true from ``model``, in
    place: smaller weights, and the attention module's head count."""
    params = dict(model.named_parameters(remove_duplicate=False))
    dims = {s.param: s.dim for s in spec.slices}
    for name, dim in dims.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        _slice_param(module, attr, dim, spec.kept_indices(name, params[name].shape[dim], pruned))
    for module_name in spec.modules:
        module = model.get_submodule(module_name)
        if is_conv1d(module):
            module.nx, module.nf = (int(d) for d in module.weight.shape)
        else:
            module.out_features, module.in_features = (int(d) for d in module.weight.shape)
    kept = spec.count - int(pruned.sum())
    if spec.kind != "heads":
        owner = model.get_submodule(spec.name)
        if hasattr(owner, "intermediate_size"):
            owner.intermediate_size = kept
        return
    attn = model.get_submodule(spec.name)
    if spec.family == "bert":
        attn.self.num_attention_heads = kept
        attn.self.all_head_size = kept * attn.self.attention_head_size
    elif spec.family == "gpt2":
        attn.num_heads = kept
        attn.split_size = kept * attn.head_dim
    else:
        ratio = int(attn.num_key_value_groups)
        for attr, value in (("num_heads", kept * ratio), ("num_key_value_heads", kept)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)


def shrink_zero_groups(model: nn.Module) -> dict[str, int]:
    """Remove every head and neuron of ``model`` whose weights are all zero (keeping at least one per
    layer); returns the number of groups removed per layer (empty: nothing to remove)."""
    removed: dict[str, int] = {}
    for kind in STRUCTURED_KINDS:
        for spec in discover(model, kind):
            if not all(_float_layer(model.get_submodule(m)) for m in spec.modules):
                continue  # already int8: shrunk before quantization converted it, or never
            params = dict(model.named_parameters(remove_duplicate=False))
            with torch.no_grad():
                pruned = pruned_groups(spec, {p: params[p] for p in spec.params})
            if bool(pruned.all()):
                pruned[0] = False
            if bool(pruned.any()):
                remove_groups(model, spec, pruned)
                removed[spec.name] = int(pruned.sum())
    return removed


def _shapes(model: nn.Module, spec: GroupSpec) -> dict[str, list[int]]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {p: list(tensors[p].shape) for p in spec.params if p in tensors}


def structure_of(model: nn.Module) -> dict[str, Any] | None:
    """The layers of ``model`` with fewer heads or neurons than its config gives, as plain data for
    ``metadata["structure"]``; ``None`` when there are none."""
    layers: dict[str, Any] = {}
    for kind in STRUCTURED_KINDS:
        for spec in discover(model, kind):
            if spec.count != spec.original:
                layers[spec.name] = {
                    "kind": kind,
                    "groups": spec.count,
                    "of": spec.original,
                    "shapes": _shapes(model, spec),
                }
    if not layers:
        return None
    return {"format_version": FORMAT_VERSION, "layers": layers}


def _damaged(problem: str) -> ValueError:
    return ValueError(f"load: metadata[{METADATA_KEY!r}] of the export {problem} (the export is damaged)")


def apply_structure(model: nn.Module, section: Any) -> None:
    """Shrink a freshly built ``model`` to the structure ``section`` (:func:`structure_of`) records.

    Raises:
        ValueError: the section is malformed, names a layer the model does not have, records more
            groups than the layer has or fewer than one, or shapes that removing them does not give.
    """
    if not isinstance(section, Mapping) or section.get("format_version") != FORMAT_VERSION:
        raise _damaged(f"is {section!r}, not an object of format_version {FORMAT_VERSION}")
    layers = section.get("layers")
    if not isinstance(layers, Mapping):
        raise _damaged("has no `layers` object")
    specs = {(spec.kind, spec.name): spec for kind in STRUCTURED_KINDS for spec in discover(model, kind)}
    for name, entry in layers.items():
        if not isinstance(entry, Mapping) or entry.get("kind") not in STRUCTURED_KINDS:
            raise _damaged(f"has entry {name!r} = {entry!r}, not an object with `kind` 'heads' or 'neurons'")
        spec = specs.get((entry["kind"], name))
        if spec is None:
            raise _damaged(
                f"records {entry['kind']} of layer {name!r}, which {type(model).__name__} does not have"
            )
        groups = entry.get("groups")
        if type(groups) is not int or not 1 <= groups <= spec.count:
            raise _damaged(f"records {groups!r} {entry['kind']} for {name!r}, which has 1 to {spec.count}")
        pruned = torch.arange(spec.count) >= groups
        if bool(pruned.any()):
            remove_groups(model, spec, pruned)
        shapes = entry.get("shapes")
        actual = _shapes(model, spec)
        if shapes != actual:
            raise _damaged(f"records shapes {shapes!r} for {name!r}; {groups} {entry['kind']} give {actual}")
