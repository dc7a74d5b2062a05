"""Prune and quantize a small classifier on scikit-learn's handwritten digits, in one command.

    python examples/digits.py [--epochs 30] [--sparsity 0.8] [--output-dir digits-out]

Trains an MLP on the 8x8 digit images (1,797 real scans shipped with scikit-learn) twice: dense,
then with ``GradualMagnitudePruning`` (80 %) and ``QuantizationAwareTraining`` (int8); converts
and exports the compressed model, reloads the export, and prints the accuracy of each and the
compression report (also saved as a table and JSON, and a plot with matplotlib, in the output
directory). Takes seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsMLP(pl.LightningModule):
    """``64 -> hidden -> hidden -> 10`` MLP with ReLU; logs ``train_loss`` and ``val_acc``."""

    def __init__(self, hidden: int = 256, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train/test loaders of the digits (75 % / 25 %, stratified), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=seed, stratify=y
    )

    def tensors(a: Any, b: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))

    g = torch.Generator().manual_seed(seed)
    train = DataLoader(tensors(x_train, y_train), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(tensors(x_test, y_test), batch_size=256)
    return train, test


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def fit(
    model: pl.LightningModule, epochs: int, callbacks: list[Any], log_dir: Path, train: DataLoader
) -> Any:
    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=CSVLogger(str(log_dir), name="", version=""),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, train)
    return trainer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--output-dir", default=None, help="where the export and report go (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining, convert, export, load
    from lightning_shrink.report import save_report

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="digits-"))
    out.mkdir(parents=True, exist_ok=True)
    train, test = digits_loaders(seed=args.seed)

    pl.seed_everything(args.seed, verbose=False)
    dense = DigitsMLP(args.hidden)
    fit(dense, args.epochs, [], out / "dense-logs", train)
    dense_acc = accuracy(dense, test)
    print(f"dense:      test accuracy {dense_acc:.2%}")

    pl.seed_everything(args.seed, verbose=False)
    model = DigitsMLP(args.hidden)
    callbacks = [
        GradualMagnitudePruning(target_sparsity=args.sparsity, start_step=0.1, end_step=0.7),
        QuantizationAwareTraining(weight_bits=8, activations="dynamic"),
    ]
    trainer = fit(model, args.epochs, callbacks, out / "logs", train)
    rep = save_report(trainer, directory=out / "report")
    qat_acc = accuracy(model, test)
    print(f"compressed: test accuracy {qat_acc:.2%} (fake-quantized, {args.sparsity:.0%} sparsity target)")

    converted = convert(model)
    converted_acc = accuracy(converted, test)
    export(converted, out / "export", overwrite=True)
    reloaded = load(out / "export", model=DigitsMLP(args.hidden))
    reloaded_acc = accuracy(reloaded, test)
    print(f"converted:  test accuracy {converted_acc:.2%}; reloaded export {reloaded_acc:.2%}")
    print(rep.to_table())

    results = {
        "dense_accuracy": dense_acc,
        "compressed_accuracy": qat_acc,
        "converted_accuracy": converted_acc,
        "reloaded_accuracy": reloaded_acc,
        "sparsity": [r.value for r in rep.select("pruning", "sparsity") if r.target == "pruned layers"],
        "output_dir": str(out),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results, export and report in {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
