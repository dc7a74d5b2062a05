"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model``), devices=2 on CPU, run by
tests/test_large_models.py: pruning (global threshold over the shards) + weight-only QAT +
distillation from a teacher sharded like the student, on a tiny Llama; also the sharded radix selection
against the previous selection and the single-process one on ties-heavy tensors; then the same
compression of a tiny Llama with peft LoRA adapters. Every rank saves what it ended with."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from legacy_selection import legacy_compute_masks
from test_large_models import _ties_heavy, compressed_fit

from lightning_shrink.pruning.distributed import Comm
from lightning_shrink.pruning.masks import compute_masks, parse_pattern

out = Path(sys.argv[1])

trainer, model, teacher, pruning = compressed_fit(
    ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2
)
rank = trainer.global_rank
teacher_tensors = list(teacher.parameters())
result = {
    "sparsity": pruning.sparsity,
    "kl": float(trainer.callback_metrics["distillation/kl"]),
    "teacher_tensors": len(teacher_tensors),
    "teacher_sharded": sum(type(p).__name__ == "DTensor" for p in teacher_tensors),
    "teacher_local": sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in teacher_tensors
    ),
    "weights": {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
        for k, v in model.model.state_dict().items()
        if k.endswith("weight")
    },
}

# The sharded selection (shards of dim 0, one all-reduce of a fixed histogram per pass) equals the
# previous sharded selection and the one-process selection on the whole tensors, ties included.
comm = Comm(group=dist.group.WORLD, sharded=True)
checks = []
for seed in range(4):
    shapes = [(12, 16), (8, 32), (6, 4)]
    full = [_ties_heavy(s, seed * 10 + i) for i, s in enumerate(shapes)]
    keeps = [
        torch.rand(s, generator=torch.Generator().manual_seed(seed + i)) > 0.2 for i, s in enumerate(shapes)
    ]
    local = [w.chunk(2)[rank] for w in full]
    local_keeps = [k.chunk(2)[rank] for k in keeps]
    for pattern in ("unstructured", "2:4"):
        parsed = parse_pattern(pattern)
        kk = keeps if pattern == "unstructured" else [torch.ones_like(k) for k in keeps]
        lk = local_keeps if pattern == "unstructured" else [k.chunk(2)[rank] for k in kk]
        for sparsity in (0.3, 0.55, 0.8):
            totals = [w.numel() for w in full]
            args = (local, lk, [False] * 3, totals, sparsity, parsed)
            new = compute_masks(*args, comm)
            old = legacy_compute_masks(*args, comm)
            single = compute_masks(full, kk, [False] * 3, totals, sparsity, parsed, Comm())
            checks.append(
                all(torch.equal(a, b) for a, b in zip(new, old, strict=True))
                and all(torch.equal(a, s.chunk(2)[rank]) for a, s in zip(new, single, strict=True))
            )
result["selection_checks"] = checks


def full(value):
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach()


# The same compression of a LoRA student (pruned base weights, fake-quantized merged weights, the
# sharded teacher), in the same processes.
trainer, model, teacher, pruning = compressed_fit(
    ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2, lora=True
)
params = dict(model.model.named_parameters())
result["lora"] = {
    "sparsity": pruning.sparsity,
    "targets": [t.name for t in pruning.plugin.targets],
    "sharded": sorted(n for n, p in params.items() if type(p).__name__ == "DTensor"),
    "kl": float(trainer.callback_metrics["distillation/kl"]),
    "weights": {n: full(p).tolist() for n, p in params.items() if "lora_" in n or "base_layer" in n},
}
# Outside a forward the base weight is a shard: merging the masked delta is refused, not half done.
layer = model.model.get_base_model().model.layers[0].self_attn.q_proj
try:
    layer.get_delta_weight("default")
except RuntimeError as error:
    result["lora"]["merge_error"] = str(error)
(out / f"rank{rank}.json").write_text(json.dumps(result))
