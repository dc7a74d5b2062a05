"""Export size of a demo recipe on all-MiniLM-L6-v2 against the FP32 checkpoint, per data set.

No fine-tune: 2 optimizer steps on 4 training examples, with pruning reaching the recipe's target
at step 1, so that every pruned layer is at the recipe's sparsity; accuracy is not measured (the
size does not depend on it). Usage: ``python benchmarks/demo_export_size.py [RECIPE]``; writes
``benchmarks/results/extra/demo_export_size_<RECIPE>.json``.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
t0 = time.time()
import lightning.pytorch as pl  # noqa: E402

import lightning_shrink  # noqa: E402
from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining  # noqa: E402
from lightning_shrink.demo import SequenceClassifier, load_tokenizer, make_dataloader  # noqa: E402
from lightning_shrink.demo.datasets import load_dataset  # noqa: E402
from lightning_shrink.demo.measure import directory_size, machine_info, sparsity_of_linears  # noqa: E402
from lightning_shrink.demo.recipe import RECIPES  # noqa: E402
from lightning_shrink.demo.run import _save_fp32  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "sparse50-int8-kd"
out = {}
for ds in ("rotten_tomatoes", "tweet_sentiment"):
    data = load_dataset(ds, verbose=False).subsample(4, 4)
    tok = load_tokenizer("minilm")
    loader = make_dataloader(data.train, tok, 2, 16, shuffle=False)
    recipe = RECIPES[name]
    model = SequenceClassifier("minilm", num_labels=len(data.label_names), lr=1e-5)
    work = Path(tempfile.mkdtemp())
    _save_fp32(model.model, work / "dense" / "model.safetensors")
    args = recipe.pruning_arguments(1)
    args.update(start_step=0, end_step=1)
    cbs = [GradualMagnitudePruning(**args), QuantizationAwareTraining(**recipe.quantization_arguments())]
    pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=cbs,
    ).fit(model, loader)
    sp = sparsity_of_linears(model.model)
    conv = lightning_shrink.convert(model.model)
    lightning_shrink.export(conv, work / "model")
    fp32, exp = directory_size(work / "dense" / "model.safetensors"), directory_size(work / "model")
    out[ds] = {
        "recipe": name,
        "sparsity_of_linear_weights": sp,
        "fp32_checkpoint_bytes": fp32,
        "export_bytes": exp,
        "size_ratio": fp32 / exp,
    }
    print(ds, out[ds], flush=True)
out["wall_seconds"] = time.time() - t0
out["command"] = " ".join(["python", "benchmarks/demo_export_size.py", *sys.argv[1:]])
out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
out["machine"] = machine_info()
target = Path(__file__).resolve().parent / "results" / "extra" / f"demo_export_size_{name}.json"
target.write_text(json.dumps(out, indent=2) + "\n")
print("wall", out["wall_seconds"])
