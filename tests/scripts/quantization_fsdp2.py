"""QAT under FSDP2 (ModelParallelStrategy + fully_shard), devices=2 on CPU, on a model built and
sharded in ``configure_model`` (run by tests/test_quantization_distributed.py): each rank saves
its gathered weights and the sharded model's outputs, and the same outputs recomputed by an
unsharded copy prepared the same way."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import lightning_shrink as ls
from lightning_shrink.quantization import is_prepared, prepare_qat
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data


class BuiltAndShardedInConfigureModel(TinyClassifier):
    """:class:`TinyClassifier` whose layers do not exist before ``configure_model``, which builds
    and then shards them (each Linear, then the whole module)."""

    def __init__(self) -> None:
        super().__init__(hidden=36, optimizer="adamw", lr=0.01)
        del self.net, self.classifier
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.net is not None:
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 36), nn.ReLU(), nn.Linear(36, 36), nn.ReLU())
        self.classifier = nn.Linear(36, 2)
        mesh = self.device_mesh["data_parallel"]
        for layer in (*self.net, self.classifier):
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


out = Path(sys.argv[1])
model = BuiltAndShardedInConfigureModel()
qat = ls.QuantizationAwareTraining(weight_bits=8, activations="dynamic")
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = cpu_trainer(callbacks=[qat], strategy=strategy, devices=2, max_steps=6)
trainer.fit(model, DataLoader(random_classification_data(64), batch_size=8))

first = model.net[0]
sharded = isinstance(first.weight, DTensor)
local_rows = first.weight.to_local().shape[0] if sharded else first.weight.shape[0]
weights = {
    k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()
}

x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
model.eval()
with torch.no_grad():
    sharded_out = model(x)

reference = TinyClassifier(hidden=36)
reference.load_state_dict(weights)
with torch.no_grad():
    float_out = reference(x)
    prepare_qat(reference, qat.config)
    reference_out = reference(x)
    converted_out = ls.convert(reference)(x)
torch.save(
    {
        "sharded": sharded,
        "local_rows": local_rows,
        "prepared": sum(is_prepared(m) for m in model.modules()),
        "weights": weights,
        "sharded_out": sharded_out,
        "reference_out": reference_out,
        "float_out": float_out,
        "converted_out": converted_out,
    },
    out / f"rank{trainer.global_rank}.pt",
)
