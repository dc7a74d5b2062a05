"""What it takes to prune all-MiniLM-L6-v2 on the demo task: a sweep of pruning + distillation recipes.

Not one of the goal benchmarks: it is how the recipes of ``bench_accuracy.py`` and the demo were
chosen, and it records what was tried for the sparse goals. One dense teacher is fine-tuned (and
cached, ``--teacher-cache``), then each recipe continues from the teacher's weights with
``GradualMagnitudePruning`` + ``KnowledgeDistillation(teacher)`` for ``--steps`` steps and is
evaluated on the test snippets (all 10,231 / 2,577 snippets, split by movie). A recipe is a JSON
object whose keys override the defaults below, e.g.::

    python benchmarks/sweep_pruning_recipes.py --steps 400 \\
        '{"layer": {}, "global": {"scope": "global", "exclude": ["model.bert.pooler.*"]}}'

Keys: ``sparsity`` (0.8), ``scope`` ("layer"), ``exclude`` ([]), ``start`` (0.05), ``end`` (0.7),
``lr`` (5e-5), ``alpha`` (0.5), ``T`` (2.0), ``mse`` (0: weight of a hidden-state MSE over the six
layers). Results are appended to ``benchmarks/results/extra/pruning_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from bench_accuracy import _fit  # noqa: E402

from lightning_shrink import GradualMagnitudePruning, KnowledgeDistillation  # noqa: E402
from lightning_shrink.demo import (  # noqa: E402
    SequenceClassifier,
    evaluate_accuracy,
    load_data,
    load_tokenizer,
    make_dataloader,
)
from lightning_shrink.demo.run import machine_info  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "sparsity": 0.8,
    "scope": "layer",
    "exclude": [],
    "start": 0.05,
    "end": 0.7,
    "lr": 5e-5,
    "alpha": 0.5,
    "T": 2.0,
    "mse": 0.0,
}


def callbacks(recipe: dict[str, Any], teacher: torch.nn.Module) -> list[Any]:
    pruning = GradualMagnitudePruning(
        recipe["sparsity"],
        start_step=recipe["start"],
        end_step=recipe["end"],
        frequency=0.02,
        scope=recipe["scope"],
        exclude_modules=recipe["exclude"],
    )
    kd: dict[str, Any] = {"temperature": recipe["T"], "alpha": recipe["alpha"]}
    if recipe["mse"]:
        kd.update(hidden_mse_weight=recipe["mse"], layer_map={i: i for i in range(1, 7)})
    return [pruning, KnowledgeDistillation(teacher, **kd)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", help="JSON object: recipe name -> overrides of the defaults")
    parser.add_argument("--steps", type=int, default=400, help="steps of each pruned fine-tune")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-cache", default=None, help="a .pt file for the teacher's state dict")
    parser.add_argument("--out", default=str(ROOT / "results" / "extra" / "pruning_recipes.json"))
    args = parser.parse_args(argv)
    recipes = json.loads(args.recipes)
    for name, overrides in recipes.items():
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            parser.error(f"recipe {name!r}: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")

    pl.seed_everything(0, verbose=False)
    data = load_data(None, seed=0, verbose=False)
    tokenizer = load_tokenizer("minilm")
    train = make_dataloader(data.train, tokenizer, 16, 64, shuffle=True, seed=0)
    test = make_dataloader(data.test, tokenizer, 64, 64)
    if args.teacher_cache and Path(args.teacher_cache).is_file():
        state = torch.load(args.teacher_cache)
    else:
        teacher = SequenceClassifier("minilm", lr=5e-5)
        _fit(teacher, train, args.teacher_steps, [], "cpu")
        state = teacher.model.state_dict()
        if args.teacher_cache:
            torch.save(state, args.teacher_cache)
    frozen = SequenceClassifier("minilm").model
    frozen.load_state_dict(state)
    frozen.eval().requires_grad_(False)
    teacher_accuracy = evaluate_accuracy(frozen, test)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for name, overrides in recipes.items():
        recipe = {**DEFAULTS, **overrides}
        pl.seed_everything(1, verbose=False)
        student = SequenceClassifier("minilm", lr=recipe["lr"])
        student.model.load_state_dict(state)
        seconds = _fit(student, train, args.steps, callbacks(recipe, frozen), "cpu")
        accuracy = evaluate_accuracy(student.cpu().eval().model, test)
        print(f"[recipes] {name}: {accuracy:.4f} (teacher {teacher_accuracy:.4f}), fit {seconds:.0f} s")
        results["runs"].append(
            {
                "name": name,
                "recipe": recipe,
                "teacher_steps": args.teacher_steps,
                "steps": args.steps,
                "teacher_accuracy": teacher_accuracy,
                "accuracy": accuracy,
                "fit_seconds": round(seconds, 1),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": machine_info(),
            }
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
