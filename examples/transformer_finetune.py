"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes snippets with pruning, int8 QAT and distillation.

    python examples/transformer_finetune.py [--steps 600] [--output-dir minilm-out]

The plain-script version of ``lightning-shrink demo``, written the way a team writes its own
training script: a LightningModule whose ``training_step`` calls ``self.model(**batch)``, a data
module, and the compression callbacks added to the ``Trainer``. A short dense fine-tune first
gives the teacher; the compressed run starts from the teacher's weights. Then the model is
converted to int8, exported, and the compression report is written beside the logs.

Use ``--data my.csv --text-column review --label-column sentiment`` for your own data.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_shrink import (
    GradualMagnitudePruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    convert,
    export,
)
from lightning_shrink.demo import SequenceClassifier, TextClassificationData, evaluate_accuracy
from lightning_shrink.report import save_report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="'minilm', 'tiny' or a transformers path")
    parser.add_argument("--data", default=None, help="a CSV file or a Hugging Face dataset id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--group-column", default=None)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--output-dir", default="minilm-out")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    pl.seed_everything(0, verbose=False)

    data = TextClassificationData(
        data=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        group_column=args.group_column,
        batch_size=args.batch_size,
    )
    data.prepare_data()
    data.setup("fit")
    num_labels = len(data.dataset.label_names)

    def trainer(steps: int, name: str, callbacks: list[Any]) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            callbacks=callbacks,
            logger=CSVLogger(str(out), name=name, version=""),
            log_every_n_steps=5,
            limit_val_batches=0,
            enable_checkpointing=False,
        )

    # The dense teacher.
    teacher = SequenceClassifier(args.model, num_labels=num_labels, lr=args.lr)
    trainer(args.teacher_steps, "teacher", []).fit(teacher, datamodule=data)
    teacher_acc = evaluate_accuracy(teacher.model, data.test_dataloader())
    print(f"teacher test accuracy: {teacher_acc:.2%}")

    # The compressed student, from the teacher's weights, distilled from the teacher.
    student = SequenceClassifier(
        args.model, num_labels=num_labels, lr=args.lr, backbone=copy.deepcopy(teacher.model)
    )
    callbacks = [
        GradualMagnitudePruning(target_sparsity=args.sparsity, start_step=0.05, end_step=0.7, scope="layer"),
        QuantizationAwareTraining(weight_bits=8, activations="dynamic"),
        KnowledgeDistillation(teacher.model, temperature=2.0, alpha=0.5),
    ]
    fit = trainer(args.steps, "student", callbacks)
    fit.fit(student, datamodule=data)
    rep = save_report(fit, directory=out / "report")
    print(rep.to_table())

    int8 = convert(student.model)
    int8_acc = evaluate_accuracy(int8, data.test_dataloader())
    export(int8, out / "export", overwrite=True)
    sparsity = [r.value for r in rep.select("pruning", "sparsity") if r.target == "pruned layers"]
    results = {
        "teacher_accuracy": teacher_acc,
        "int8_accuracy": int8_acc,
        "sparsity": sparsity[0] if sparsity else None,
        "export_bytes": sum(p.stat().st_size for p in (out / "export").iterdir()),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"int8 test accuracy: {int8_acc:.2%}; export in {out / 'export'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
