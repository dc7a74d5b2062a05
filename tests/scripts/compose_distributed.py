"""All techniques on a model built in configure_model under DDP, devices=2 on CPU (run by
tests/test_compose.py): pruning + QAT + distillation, then privacy + pruning; every rank saves what
it ended with."""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_compose import ConfiguredBert, ConfiguredMLP

import lightning_shrink as ls
from lightning_shrink.testing.models import (
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    token_dataloader,
)

out = Path(sys.argv[1])

torch.manual_seed(1)
teacher = tiny_bert()
pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
model = ConfiguredBert()
trainer = cpu_trainer(
    callbacks=[pruning, ls.QuantizationAwareTraining(), ls.KnowledgeDistillation(teacher=teacher)],
    strategy="ddp",
    devices=2,
    max_steps=4,
)
trainer.fit(model, token_dataloader(n=64, batch_size=4))
kl = float(trainer.callback_metrics["distillation/kl"])
kd = {
    "kd_sparsity": pruning.sparsity,
    "prepared": sum(ls.quantization.is_prepared(m) for m in model.modules()),
    "kl": kl,
    "kd_weights": {k: v.tolist() for k, v in model.state_dict().items() if k.endswith("weight")},
}

pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
privacy = ls.DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
mlp = ConfiguredMLP()
trainer = cpu_trainer(callbacks=[pruning, privacy], strategy="ddp", devices=2, max_steps=4)
trainer.fit(mlp, DataLoader(random_classification_data(64), batch_size=4))
result = {
    **kd,
    "global_step": trainer.global_step,
    "dp_sparsity": pruning.sparsity,
    "epsilon": privacy.epsilon,
    "dp_weights": {k: v.tolist() for k, v in mlp.state_dict().items()},
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
