"""``lightning-shrink demo``: the command line of :func:`lightning_shrink.demo.run_demo`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["demo_parser", "run_demo_command"]

#: Options that override a field of the preset's ``DemoConfig``, with their type.
_OVERRIDES: dict[str, type] = {
    "train_size": int,
    "test_size": int,
    "teacher_steps": int,
    "student_steps": int,
    "batch_size": int,
    "max_length": int,
    "sparsity": float,
    "embedding_bits": int,
    "seed": int,
}


def demo_parser() -> argparse.ArgumentParser:
    from lightning_shrink.demo.datasets import DATASETS, DEFAULT_DATASET
    from lightning_shrink.demo.recipe import RECIPES

    parser = argparse.ArgumentParser(
        prog="lightning-shrink demo",
        description=(
            "Fine-tune all-MiniLM-L6-v2 on real labelled texts (by default Rotten Tomatoes review "
            "snippets, split by movie) dense, then compressed with the preset's recipe (pruning, int8 "
            "quantization-aware training and distillation from the dense teacher); convert, export, "
            "and report accuracy, sparsity, size and latency."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data sets (--dataset):\n"
        + "\n".join(f"  {d.name:<18}{d.description}" for d in DATASETS.values())
        + "\nrecipes (--recipe):\n"
        + "\n".join(f"  {r.name:<18}{r.summary}" for r in RECIPES.values()),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a short run (about 3 minutes on 2 CPU cores)")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random BERT on a few dozen examples (seconds; checks the pipeline, not the accuracy)",
    )
    parser.add_argument(
        "--output-dir", default="shrink-demo", help="results directory (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output-dir at the end"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset",
        default=None,
        choices=list(DATASETS),
        help=f"a data set the demo knows (default: {DEFAULT_DATASET})",
    )
    source.add_argument(
        "--data",
        default=None,
        help="a local CSV file or a Hugging Face dataset id instead of a named --dataset",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        choices=list(RECIPES),
        help="the compression recipe (default: the preset's; the run prints which and why)",
    )
    parser.add_argument("--text-column", default="text", help="text column of --data (default: %(default)s)")
    parser.add_argument(
        "--label-column", default="label", help="label column of --data (default: %(default)s)"
    )
    parser.add_argument("--group-column", default=None, help="CSV column kept on one side of the split")
    parser.add_argument(
        "--techniques",
        default=None,
        help="comma-separated subset of pruning,quantization,distillation (default: the recipe's)",
    )
    for name, kind in _OVERRIDES.items():
        option = name.replace("_", "-")
        parser.add_argument(f"--{option}", type=kind, default=None, help=f"override the preset's {option}")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (a line is printed every tenth of each fine-tune instead)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only the final summary (no library lines)"
    )
    return parser


def run_demo_command(args: Sequence[str]) -> int:
    """``lightning-shrink demo [options]``; exits with status 2 and a message naming the option on
    bad input, before anything is written."""
    from lightning_shrink.demo import DataError, DemoError, run_demo
    from lightning_shrink.demo.config import check_option
    from lightning_shrink.demo.summary import serve_hint, served_directory, summary_markdown

    parser = demo_parser()
    ns = parser.parse_args(args)
    preset = "smoke" if ns.smoke else "quick" if ns.quick else "default"
    overrides: dict[str, Any] = {
        name: getattr(ns, name) for name in _OVERRIDES if getattr(ns, name) is not None
    }
    if ns.recipe is not None:
        overrides["recipe"] = ns.recipe
    if ns.techniques is not None:
        overrides["techniques"] = tuple(t.strip() for t in ns.techniques.split(",") if t.strip())
    try:
        for name, value in overrides.items():
            check_option("lightning-shrink demo", f"--{name.replace('_', '-')}", name, value)
    except (TypeError, ValueError) as exc:
        parser.exit(2, f"lightning-shrink demo: error: {str(exc).removeprefix('lightning-shrink demo: ')}\n")
    try:
        results = run_demo(
            output_dir=ns.output_dir,
            preset=preset,
            data=ns.data,
            dataset=ns.dataset,
            text_column=ns.text_column,
            label_column=ns.label_column,
            group_column=ns.group_column,
            overwrite=ns.overwrite,
            verbose=not ns.quiet,
            progress=not (ns.no_progress or ns.quiet),
            **overrides,
        )
    except (DataError, DemoError) as exc:
        parser.exit(2, f"lightning-shrink demo: error: {exc}\n")
    if ns.quiet:
        print(summary_markdown(results))
        print(serve_hint(served_directory(Path(ns.output_dir).expanduser().resolve(), results)))
    return 0
