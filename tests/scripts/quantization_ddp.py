"""QAT under DDP devices=2 on CPU (run by tests/test_quantization.py): each rank writes what it saw."""

import json
import sys
from pathlib import Path

import torch

import lightning_shrink as ls
from lightning_shrink.quantization import is_prepared
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

out = Path(sys.argv[1])
torch.manual_seed(0)
model = TinyTransformerClassifier(tiny_bert)
qat = ls.QuantizationAwareTraining(activations="static", freeze_observers_step=2)
trainer = cpu_trainer(strategy="ddp", devices=2, max_steps=4, callbacks=[qat], deterministic=False)
trainer.fit(model, token_dataloader(n=64, batch_size=4, shuffle=True))
query = model.model.bert.encoder.layer[0].attention.self.query
state = {k: v.detach() for k, v in model.state_dict().items()}
result = {
    "rank": trainer.global_rank,
    "global_step": trainer.global_step,
    "prepared": sum(is_prepared(m) for m in model.modules()),
    "observed": [float(query.input_min), float(query.input_max)],
    "checksum": float(sum(v.double().abs().sum() for v in state.values())),
    "fake_quant_weight_sum": float(query._fake_weight().detach().double().abs().sum()),
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
