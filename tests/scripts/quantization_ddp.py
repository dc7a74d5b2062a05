"""QAT with static activations under DDP devices=2 on CPU, on a model built in ``configure_model``
(run by tests/test_quantization_distributed.py): each rank saves its observer ranges, weights and
the outputs of the fake-quantized and the converted model."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning_shrink as ls
from lightning_shrink.quantization import is_prepared
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)


class BuiltInConfigureModel(TinyTransformerClassifier):
    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.model = None
        self.lr = 1e-3

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)
            self.model = tiny_bert()


class RecordSync(pl.Callback):
    synchronized: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.synchronized.append(
            pl_module.model.bert.encoder.layer[0].attention.self.query.shrink_qat.sync_observers
        )


out = Path(sys.argv[1])
module = BuiltInConfigureModel()
qat = ls.QuantizationAwareTraining(activations="static", freeze_observers_step=None, averaging_constant=0.5)
trainer = cpu_trainer(
    strategy="ddp", devices=2, max_steps=4, callbacks=[qat, RecordSync()], deterministic=False
)
# Shuffled with a different seed per rank (the distributed sampler): every rank sees other batches.
trainer.fit(module, token_dataloader(n=64, batch_size=4, shuffle=True))

model = module.model.eval()
batch = next(iter(token_dataloader(n=8, seed=3)))
with torch.no_grad():
    fake = model(**batch).logits
    converted = ls.convert(model)(**batch).logits
ranges = {
    k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("input_min", "input_max"))
}
torch.save(
    {
        "global_step": trainer.global_step,
        "prepared": sum(is_prepared(m) for m in model.modules()),
        "ranges": ranges,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "fake": fake,
        "converted": converted,
        "synchronized": RecordSync.synchronized,
    },
    out / f"rank{trainer.global_rank}.pt",
)
