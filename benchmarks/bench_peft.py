"""LoRA (peft) benchmark on a small Llama from a config (CPU): what masking the adapters costs, and
the trade-off between the two export forms of a quantized LoRA model.

A ``LlamaForSequenceClassification`` (hidden 64, 2 layers) is first fine-tuned in full on the
token-counting task of :class:`~lightning_shrink.testing.models.TokenClassificationDataset` (the
"pretrained" model), then LoRA (r=8 on q/v/up/down projections, the head in ``modules_to_save``)
is fine-tuned on it with:

- ``lora``: no compression;
- ``prune masked``: GradualMagnitudePruning to 50 % of the base weights, adapters masked in forward
  (lightning-shrink's behaviour: training computes with the merged sparse weight);
- ``prune mask-at-merge``: the same run with the adapters' forward masking switched off (what
  masking only at merge time would train); reported are the accuracy training saw (unmerged,
  dense adapters) and the accuracy of the merged model with the mask applied;
- ``qat merged`` / ``qat base``: int8 QuantizationAwareTraining with ``adapters="merged"`` /
  ``"base"``, exported with ``merge_adapters=True`` / ``False``: file size, held-out accuracy of the
  loaded export, batch-1 latency of the loaded export (median of interleaved runs).

Usage::

    python benchmarks/bench_peft.py [--steps 150] [--threads 2]

Writes ``benchmarks/results/peft.json`` and prints a markdown section.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import lightning_shrink as ls
from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining
from lightning_shrink.adapters.lora_layer import adopt
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_llama,
    token_dataloader,
)

SEQ, VOCAB = 16, 64


def _data(n: int, seed: int, shuffle: bool = False) -> Any:
    return token_dataloader(n, batch_size=32, seq_len=SEQ, vocab_size=VOCAB, seed=seed, shuffle=shuffle)


def accuracy(model: nn.Module, data: Any) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in data:
            right += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return right / total


def logit_gap(a: nn.Module, b: nn.Module, data: Any) -> float:
    """The largest difference between the two models' logits over ``data``."""
    a.eval(), b.eval()
    with torch.no_grad():
        return max(float((a(**x).logits - b(**x).logits).abs().max()) for x in data)


def latency_ms(model: nn.Module, repeats: int = 200) -> float:
    batch = next(iter(token_dataloader(1, batch_size=1, seq_len=SEQ, vocab_size=VOCAB, seed=9)))
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(20):
            model(**batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pretrained(steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, vocab_size=VOCAB)
    cpu_trainer(max_steps=steps, max_epochs=-1).fit(
        TinyTransformerClassifier(model, lr=3e-3), _data(2048, 0, True)
    )
    return model


def with_lora(base: nn.Module) -> nn.Module:
    import peft

    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        task_type="SEQ_CLS",
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


class MaskAtMergeOnly(pl.Callback):
    """Switch the adapters' forward masking off (pruning still masks the base weights)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_shrink.adapters import lora_layers

        for layer in lora_layers(pl_module).values():
            adopt(layer, pruned=False)


def fine_tune(base: nn.Module, steps: int, *callbacks: pl.Callback) -> nn.Module:
    model = with_lora(base)
    trainer = cpu_trainer(callbacks=list(callbacks), max_steps=steps, max_epochs=-1)
    trainer.fit(TinyTransformerClassifier(model, lr=3e-3), _data(2048, 1, True))
    return model


def size_kb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = _data(1024, 7)
    results: dict[str, Any] = {"steps": args.steps}
    base = pretrained(args.steps)
    results["pretrained"] = accuracy(base, test)

    lora = fine_tune(base, args.steps)
    results["lora"] = accuracy(lora, test)

    def pruning() -> GradualMagnitudePruning:
        return GradualMagnitudePruning(target_sparsity=0.5, scope="layer", end_step=0.6, frequency=10)

    masked = fine_tune(base, args.steps, pruning())
    merged = copy.deepcopy(masked).merge_and_unload()
    results["prune masked"] = {
        "trained": accuracy(masked, test),
        "merged": accuracy(merged, test),
        "logit_gap": logit_gap(masked, merged, test),
    }
    unmasked = fine_tune(base, args.steps, pruning(), MaskAtMergeOnly())
    trained = accuracy(unmasked, test)
    as_trained = copy.deepcopy(unmasked)
    for layer in ls.adapters.lora_layers(unmasked).values():
        adopt(layer, pruned=True)
    merged = unmasked.merge_and_unload()
    results["prune mask-at-merge"] = {
        "trained": trained,
        "merged": accuracy(merged, test),
        "logit_gap": logit_gap(as_trained, merged, test),
    }

    exports: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        float_dir = ls.export(copy.deepcopy(lora).merge_and_unload(), Path(tmp) / "float")
        results["float merged"] = {"size_kb": size_kb(float_dir)}
        exports["float merged"] = ls.load(float_dir)
        for mode, merge in (("merged", True), ("base", False)):
            model = fine_tune(
                base, args.steps, QuantizationAwareTraining(activations="dynamic", adapters=mode)
            )
            directory = ls.export(model, Path(tmp) / mode, merge_adapters=merge)
            key = f"qat {mode}"
            exports[key] = ls.load(directory)
            results[key] = {"size_kb": size_kb(directory), "prepared": accuracy(model, test)}
    for key, model in exports.items():
        results[key]["accuracy"] = accuracy(model, test)
        results[key]["latency_ms"] = []
    for _ in range(3):  # interleaved repetitions
        for key, model in exports.items():
            results[key]["latency_ms"].append(latency_ms(model))
    for key in exports:
        results[key]["latency_ms"] = statistics.median(results[key]["latency_ms"])

    out = Path(__file__).parent / "results" / "peft.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"pretrained {results['pretrained']:.3f}, LoRA {results['lora']:.3f} ({args.steps} steps each)\n")
    print("| pruning 50 % of the base weights | accuracy training saw | merged model | max logit gap |")
    print("|---|---|---|---|")
    for key in ("prune masked", "prune mask-at-merge"):
        r = results[key]
        print(f"| {key} | {r['trained']:.3f} | {r['merged']:.3f} | {r['logit_gap']:.2e} |")
    print("\n| export | file (KiB) | accuracy | batch-1 latency (ms) |")
    print("|---|---|---|---|")
    for key in exports:
        r = results[key]
        print(f"| {key} | {r['size_kb']:.0f} | {r['accuracy']:.3f} | {r['latency_ms']:.2f} |")


if __name__ == "__main__":
    main()
