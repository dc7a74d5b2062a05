"""Structured pruning: which weights make up an attention head or an FFN neuron, by model family, and
the masks that prune whole groups of them.

A :class:`GroupSpec` describes the groups of one layer: ``count`` groups (heads, KV groups or FFN
intermediate neurons), each made of equal slices of several parameters (:class:`Slice`). The specs
are discovered from the transformers ``config.model_type`` and the module names of a small table of
families (:data:`FAMILIES`):

* BERT family (``bert``, ``roberta``, ``xlm-roberta``, ``electra``, ``camembert``): a head is its rows
  of ``attention.self.query/key/value`` (weights and biases) and its input columns of
  ``attention.output.dense``; a neuron is a row of ``intermediate.dense`` (and its bias) and an input
  column of ``output.dense``.
* GPT-2 (``gpt2``, transformers' ``Conv1D`` stores weights ``(in, out)``): a head is its three column
  blocks (q, k, v) of ``attn.c_attn`` with their biases and its input rows of ``attn.c_proj``; a neuron
  is a column of ``mlp.c_fc`` (and its bias) and an input row of ``mlp.c_proj``.
* Llama / Qwen2 / Mistral (grouped-query attention): a group is a **whole KV group**, one key head and
  one value head with the ``num_attention_heads / num_key_value_heads`` query heads that share them
  (their rows of ``q_proj``, ``k_proj``, ``v_proj`` and biases if any, and their input columns of
  ``o_proj``), so the GQA ratio is kept and transformers' ``repeat_kv`` still applies; with
  ``num_key_value_heads == num_attention_heads`` a group is one head. A neuron is a row of both
  ``gate_proj`` and ``up_proj`` and an input column of ``down_proj``.

The importance of a group is the sum of per-weight scores over its weights (biases are masked with
their rows but not scored): :meth:`GroupSpec.group_scores` takes any per-weight scores, so every
criterion plugs in; magnitude uses ``w**2`` (the group's squared L2 norm). Every layer keeps at least
one group (a layer without heads or neurons cannot be represented by transformers' modules).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_shrink.pruning.config import OWNER
from lightning_shrink.pruning.selection import PruneTarget, is_conv1d

if TYPE_CHECKING:
    from lightning_shrink.pruning.config import PruningConfig

__all__ = [
    "FAMILIES",
    "STRUCTURED_KINDS",
    "Family",
    "GroupSpec",
    "Slice",
    "check_structured_config",
    "discover",
    "group_masks",
    "pruned_groups",
    "select_groups",
    "squared_magnitude",
    "structured_shortfall",
    "structured_targets",
    "structured_update",
    "unsupported_message",
]

#: The pattern kinds that prune whole groups.
STRUCTURED_KINDS: tuple[str, ...] = ("heads", "neurons")


@dataclass(frozen=True)
class Slice:
    """Group ``g`` of a :class:`GroupSpec` covers indices ``offset + g*unit ... offset + (g+1)*unit - 1``
    along dimension ``dim`` of parameter ``param`` (a qualified name)."""

    param: str
    dim: int
    offset: int
    unit: int
    scored: bool = True


@dataclass(frozen=True)
class GroupSpec:
    """The prunable groups of one layer.

    Attributes:
        kind: ``"heads"`` or ``"neurons"``.
        name: The qualified name of the module that owns the groups (the attention or MLP module).
        family: The :class:`Family` name.
        count: The number of groups the layer has now.
        original: The number the model's config gives (more when the layer was already shrunk).
        slices: The parameter slices of each group.
        modules: The qualified names of the layers the slices belong to.
    """

    kind: str
    name: str
    family: str
    count: int
    original: int
    slices: tuple[Slice, ...]
    modules: tuple[str, ...]

    @property
    def params(self) -> list[str]:
        """The parameters the groups are made of, in order, each once."""
        return list(dict.fromkeys(s.param for s in self.slices))

    def group_scores(self, per_weight_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The importance of each group: the sum of ``per_weight_scores`` (tensors shaped like the
        parameters, by qualified name) over the group's scored weights, float64 ``(count,)``."""
        total = torch.zeros(self.count, dtype=torch.float64)
        for s in self.slices:
            if not s.scored:
                continue
            score = per_weight_scores[s.param].narrow(s.dim, s.offset, self.count * s.unit)
            score = score.movedim(s.dim, 0).reshape(self.count, -1)
            total += score.sum(dim=1, dtype=torch.float64).cpu()
        return total

    def masks(self, pruned: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean keep-masks of the spec's parameters (shaped like ``like[name]``) that prune the groups
        where ``pruned`` (bool ``(count,)``) is true."""
        out = {p: torch.ones_like(like[p], dtype=torch.bool) for p in self.params}
        rows = pruned.nonzero().flatten().tolist()
        for s in self.slices:
            for g in rows:
                out[s.param].narrow(s.dim, s.offset + g * s.unit, s.unit).fill_(False)
        return out

    def kept_indices(self, param: str, size: int, pruned: torch.Tensor) -> torch.Tensor:
        """The indices along the grouped dimension of ``param`` (of ``size``) that survive removing the
        groups where ``pruned`` is true."""
        keep = torch.ones(size, dtype=torch.bool)
        for s in self.slices:
            if s.param != param:
                continue
            for g in pruned.nonzero().flatten().tolist():
                keep[s.offset + g * s.unit : s.offset + (g + 1) * s.unit] = False
        return keep.nonzero().flatten()


def _out(module: nn.Module) -> int:
    if is_conv1d(module):
        return int(module.weight.shape[1])
    out = getattr(module, "out_features", None)
    return int(out) if out is not None else int(module.weight.shape[0])


def _w(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), torch.Tensor)


def _linear_slices(name: str, module: nn.Module, dim: int, offset: int, unit: int) -> list[Slice]:
    """The slices of a layer's weight along ``dim`` (0: output rows of ``(out, in)``) and, for output
    slices, its bias."""
    out = [Slice(f"{name}.weight", dim, offset, unit)]
    output_side = (dim == 1) if is_conv1d(module) else (dim == 0)
    if output_side and _w(module, "bias"):
        out.append(Slice(f"{name}.bias", 0, offset, unit, scored=False))
    return out


def _rows(module: nn.Module) -> int:
    """The weight dimension of a layer's outputs (1 for ``Conv1D``)."""
    return 1 if is_conv1d(module) else 0


@dataclass(frozen=True)
class Family:
    """A supported model family: its ``model_type`` values and the module names of its layers."""

    name: str
    model_types: tuple[str, ...]
    layer: str  # regex of a layer's name relative to the transformers model
    attention: str
    heads: tuple[str, ...]  # q, k, v relative to ``attention`` ("" for a fused q/k/v layer)
    attention_out: str
    mlp: str
    up: tuple[str, ...]
    down: str


#: The supported families (see the module docstring).
FAMILIES: tuple[Family, ...] = (
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        r"(?:.*\.)?encoder\.layer\.\d+",
        "attention",
        ("self.query", "self.key", "self.value"),
        "output.dense",
        "",
        ("intermediate.dense",),
        "output.dense",
    ),
    Family("gpt2", ("gpt2",), r"(?:.*\.)?h\.\d+", "attn", ("c_attn",), "c_proj", "mlp", ("c_fc",), "c_proj"),
    Family(
        "llama",
        ("llama", "qwen2", "mistral"),
        r"(?:.*\.)?layers\.\d+",
        "self_attn",
        ("q_proj", "k_proj", "v_proj"),
        "o_proj",
        "mlp",
        ("gate_proj", "up_proj"),
        "down_proj",
    ),
)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _head_spec(family: Family, config: object, prefix: str, layer: nn.Module) -> GroupSpec:
    attn_name = _join(prefix, family.attention)
    attn = layer.get_submodule(family.attention)
    out_name = _join(attn_name, family.attention_out)
    out_layer = attn.get_submodule(family.attention_out)
    heads = int(config.num_attention_heads)
    slices: list[Slice] = []
    if family.name == "gpt2":
        d = int(attn.head_dim)
        qkv = attn.get_submodule("c_attn")
        count = _out(qkv) // (3 * d)
        qkv_name = _join(attn_name, "c_attn")
        for j in range(3):
            slices += _linear_slices(qkv_name, qkv, 1, j * count * d, d)
        slices += _linear_slices(out_name, out_layer, 0, 0, d)
        original = heads
    elif family.name == "bert":
        d = int(attn.self.attention_head_size)
        count = _out(attn.self.query) // d
        for rel in family.heads:
            module = attn.get_submodule(rel)
            slices += _linear_slices(_join(attn_name, rel), module, _rows(module), 0, d)
        slices += _linear_slices(out_name, out_layer, 1 - _rows(out_layer), 0, d)
        original = heads
    else:
        d = int(attn.head_dim)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        ratio = heads // kv_heads
        count = _out(attn.k_proj) // d
        for rel, unit in zip(family.heads, (ratio * d, d, d), strict=True):
            module = attn.get_submodule(rel)
            slices += _linear_slices(_join(attn_name, rel), module, _rows(module), 0, unit)
        slices += _linear_slices(out_name, out_layer, 1 - _rows(out_layer), 0, ratio * d)
        original = kv_heads
    modules = tuple(dict.fromkeys(s.param.rpartition(".")[0] for s in slices))
    return GroupSpec("heads", attn_name, family.name, count, original, tuple(slices), modules)


def _neuron_spec(family: Family, config: object, prefix: str, layer: nn.Module) -> GroupSpec:
    mlp_name = _join(prefix, family.mlp)
    mlp = layer.get_submodule(family.mlp) if family.mlp else layer
    slices: list[Slice] = []
    up = mlp.get_submodule(family.up[0])
    count = _out(up)
    for rel in family.up:
        module = mlp.get_submodule(rel)
        slices += _linear_slices(_join(mlp_name, rel), module, _rows(module), 0, 1)
    down = mlp.get_submodule(family.down)
    slices += _linear_slices(_join(mlp_name, family.down), down, 1 - _rows(down), 0, 1)
    if family.name == "gpt2":
        original = int(getattr(config, "n_inner", None) or 4 * int(config.hidden_size))
    else:
        original = int(config.intermediate_size)
    modules = tuple(dict.fromkeys(s.param.rpartition(".")[0] for s in slices))
    name = mlp_name if family.mlp else _join(prefix, family.up[0]).rpartition(".")[0]
    return GroupSpec("neurons", name, family.name, count, original, tuple(slices), modules)


def _transformers_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers ``PreTrainedModel`` modules of ``model``, with their names."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        if any(n == "" or name.startswith(f"{n}.") for n, _ in found):
            continue
        found.append((name, module))
    return found


def _family(model_type: object) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def discover(model: nn.Module, kind: str) -> list[GroupSpec]:
    """The :class:`GroupSpec` of every layer of ``kind`` (``"heads"`` or ``"neurons"``) of the
    supported transformers models inside ``model``, names relative to ``model``; empty when there are
    none."""
    specs: list[GroupSpec] = []
    for hf_name, hf in _transformers_models(model):
        family = _family(getattr(hf.config, "model_type", None))
        if family is None:
            continue
        pattern = re.compile(family.layer)
        for rel, layer in hf.named_modules():
            if not rel or not pattern.fullmatch(rel):
                continue
            prefix = _join(hf_name, rel)
            build = _head_spec if kind == "heads" else _neuron_spec
            specs.append(build(family, hf.config, prefix, layer))
    return specs


def unsupported_message(owner: str, model: nn.Module, kind: str) -> str:
    """The set-up error for a model whose layers of ``kind`` this module cannot find."""
    found = _transformers_models(model)
    named = [f"{type(m).__name__} (model_type {getattr(m.config, 'model_type', None)!r})" for _, m in found]
    what = ", ".join(named) or f"{type(model).__name__} (no transformers model inside)"
    supported = ", ".join(f"{f.name}: {list(f.model_types)}" for f in FAMILIES)
    return (
        f"{owner}: `pattern='{kind}'` prunes whole {'attention heads' if kind == 'heads' else 'FFN neurons'} "
        f"of transformers models of a supported family ({supported}); {what} is not one. Use "
        "pattern='rows' or 'unstructured' for other models"
    )


def squared_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The per-weight score of magnitude for groups: ``w**2`` (summed: the group's squared L2 norm)."""
    w = weight.detach().float()
    return w * w


def pruned_groups(spec: GroupSpec, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Bool ``(count,)``: the groups whose scored slices are all false (masks) or all zero (weights)
    in ``tensors``."""
    alive = torch.zeros(spec.count, dtype=torch.bool)
    for s in spec.slices:
        if not s.scored:
            continue
        t = tensors[s.param].narrow(s.dim, s.offset, spec.count * s.unit).movedim(s.dim, 0)
        alive |= t.reshape(spec.count, -1).ne(0).any(dim=1).cpu()
    return ~alive


def select_groups(
    specs: Sequence[GroupSpec],
    scores: Sequence[torch.Tensor],
    already: Sequence[torch.Tensor],
    sparsity: float,
) -> list[torch.Tensor]:
    """Which groups to prune so that ``round(sparsity * total groups)`` are pruned (never fewer than
    are already pruned), lowest scores first, ties by position (spec order, then group index); each
    spec keeps at least its highest-scoring group.

    Args:
        specs: The specs sharing one threshold (all layers under ``scope="global"``, one under
            ``"layer"``).
        scores: Per spec, its :meth:`GroupSpec.group_scores`.
        already: Per spec, bool ``(count,)``: groups pruned before (pruned first, they stay pruned).
        sparsity: The scheduled fraction of groups.

    Returns:
        Per spec, bool ``(count,)``: the groups pruned.
    """
    keys = []
    for score, done in zip(scores, already, strict=True):
        key = score.to(torch.float64).masked_fill(done, -1.0)
        key[int(torch.argmax(key.masked_fill(done, -2.0)))] = float("inf")  # the one group kept
        keys.append(key)
    total = sum(s.count for s in specs)
    k = max(round(sparsity * total), int(sum(int(d.sum()) for d in already)))
    k = min(k, total - len(specs))
    flat = torch.cat(keys)
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        pruned[order[:k]] = True
    return list(torch.split(pruned, [s.count for s in specs]))


def group_masks(
    specs: Sequence[GroupSpec],
    weights: Mapping[str, torch.Tensor],
    keeps: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New keep-masks of every parameter of ``specs`` for the scheduled fraction of groups.

    Args:
        specs: The layers' specs.
        weights: The parameters, by qualified name.
        keeps: Their current keep-masks; groups all of whose scored weights are masked stay pruned.
        sparsity: The scheduled fraction of groups to prune.
        scope: ``"global"``: one ranking over all layers of the same kind; ``"layer"``: every layer
            prunes the fraction of its own groups.
        scores: Per-weight scores by parameter name; ``None``: :func:`squared_magnitude` of the weights.
    """
    if scores is None:
        names = {s.param for spec in specs for s in spec.slices if s.scored}
        scores = {n: squared_magnitude(weights[n]) for n in names}
    group_scores = [spec.group_scores(scores) for spec in specs]
    already = [pruned_groups(spec, keeps) for spec in specs]
    sets = [list(range(len(specs)))] if scope == "global" else [[i] for i in range(len(specs))]
    out: dict[str, torch.Tensor] = {}
    for idx in sets:
        chosen = select_groups(
            [specs[i] for i in idx], [group_scores[i] for i in idx], [already[i] for i in idx], sparsity
        )
        for i, pruned in zip(idx, chosen, strict=True):
            out.update(specs[i].masks(pruned, weights))
    return out


def check_structured_config(config: PruningConfig) -> None:
    """Refuse arguments that a structured ``pattern`` cannot honour (called by the configuration)."""
    kind = config.pattern.kind
    if kind not in STRUCTURED_KINDS:
        return
    refused = []
    if config.module_types is not None:
        refused.append("`module_types`")
    if tuple(config.parameter_names) != ("weight",):
        refused.append("`parameter_names`")
    if config.prune_output_layer:
        refused.append("`prune_output_layer=True`")
    if config.sparsity_overrides:
        refused.append("`sparsity_overrides`")
    if refused:
        raise ValueError(
            f"{OWNER}: `pattern='{kind}'` prunes whole {kind} (the weights and biases that make them up, "
            f"found from the model's family); {', '.join(refused)} cannot be combined with it. Select layers "
            "with `modules` / `exclude_modules` (attention or MLP module names) and use `scope='layer'` for "
            "the same fraction in every layer"
        )


def structured_targets(model: nn.Module, config: PruningConfig) -> tuple[list[PruneTarget], list[GroupSpec]]:
    """The pruned parameters and the group specs of a structured ``config.pattern`` in ``model``.

    A layer is selected when its attention (``"heads"``) or MLP (``"neurons"``) module is selected by
    ``modules`` / ``exclude_modules`` and all its parameters are trainable (a frozen teacher is never
    pruned).

    Raises:
        ValueError: ``model`` holds no transformers model of a supported family, or nothing is selected.
    """
    kind = config.pattern.kind
    specs = discover(model, kind)
    if not specs:
        raise ValueError(unsupported_message(OWNER, model, kind))
    owners = {s.name for s in specs}

    def supported(name: str, module: nn.Module) -> str | None:
        if name in owners:
            return None
        return f"it is not the {'attention' if kind == 'heads' else 'MLP'} module of a supported layer"

    selected = set(config.selector.select(model, supported))
    params = dict(model.named_parameters(remove_duplicate=False))
    chosen = [s for s in specs if s.name in selected and all(params[p].requires_grad for p in s.params)]
    if not chosen:
        raise ValueError(
            f"{OWNER}: `pattern='{kind}'`: no trainable layer is selected (modules="
            f"{list(config.modules) if config.modules is not None else None}, exclude_modules="
            f"{list(config.exclude_modules)}); the {kind} of layers such as {sorted(owners)[:2]} can be "
            "pruned"
        )
    targets = [
        PruneTarget(
            name=p,
            module_name=p.rpartition(".")[0],
            transposed=False,
            final_sparsity=config.target_sparsity,
            group="__global__" if config.scope == "global" else spec.name,
        )
        for spec in chosen
        for p in spec.params
    ]
    return targets, chosen


def structured_update(
    specs: Sequence[GroupSpec],
    targets: Sequence[PruneTarget],
    params: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    sparsity: float,
    scope: str,
    scores: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """New keep-masks, in target order, for the scheduled fraction of groups (see :func:`group_masks`;
    ``scores``: per-weight scores in target order, ``None`` for magnitude)."""
    names = [t.name for t in targets]
    by_name = dict(zip(names, params, strict=True))
    score_map = dict(zip(names, scores, strict=True)) if scores is not None else None
    masks = group_masks(specs, by_name, dict(zip(names, keeps, strict=True)), sparsity, scope, score_map)
    return [masks[n].to(k.device) for n, k in zip(names, keeps, strict=True)]


def structured_shortfall(
    specs: Sequence[GroupSpec], targets: Sequence[PruneTarget], keeps: Sequence[torch.Tensor], scope: str
) -> list[str]:
    """The layers (or the global set) whose pruned groups fall short of the final fraction, described."""
    by_name = {t.name: k for t, k in zip(targets, keeps, strict=True)}
    final = targets[0].final_sparsity
    done = [int(pruned_groups(s, by_name).sum()) for s in specs]
    sets = [list(range(len(specs)))] if scope == "global" else [[i] for i in range(len(specs))]
    short = []
    for idx in sets:
        total = sum(specs[i].count for i in idx)
        want = min(round(final * total), total - len(idx))
        have = sum(done[i] for i in idx)
        if have < want:
            what = specs[idx[0]].name if scope == "layer" else f"{len(idx)} layers under the global threshold"
            short.append(f"{what} at {have}/{total} {specs[idx[0]].kind} pruned (target {want})")
    return short
