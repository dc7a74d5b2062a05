
import json, os, sys, torch
sys.path.insert(0, '/work/main/tests'); sys.path.insert(0, '/work/main/benchmarks')
from lightning.pytorch.strategies import ModelParallelStrategy
import lightning_shrink as ls
from lightning_shrink.testing.models import cpu_trainer
from test_large_models import LlamaModule, Tokens
from bench_memory import llama, _status
size, mode = '20M', 'pruning'
class Module(LlamaModule):
    def configure_model(self):
        if self.model is None:
            from torch.distributed.fsdp import fully_shard
            with torch.device("cpu"):
                self.model = llama(size)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
teacher = llama(size) if mode == "distillation" else None
callbacks = {"plain": [],
    "pruning": [ls.GradualMagnitudePruning(0.5, start_step=0, end_step=1, frequency=1)],
    "qat_int8": [ls.QuantizationAwareTraining(activations=None, embeddings=False)],
    "distillation": [ls.KnowledgeDistillation(teacher)] if teacher is not None else []}[mode]
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = cpu_trainer(callbacks=callbacks, strategy=strategy,
    devices=2, max_steps=2, use_distributed_sampler=False)
trainer.fit(Module(), torch.utils.data.DataLoader(Tokens(n=4, length=64), batch_size=2))
result = {"peak_rss_bytes": _status("VmHWM")}
if teacher is not None:
    result["teacher_local_bytes"] = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in teacher.parameters())
    result["teacher_bytes"] = sum(p.numel() * p.element_size() for p in teacher.parameters())
with open(os.path.join('/work/main/benchmarks/results/extra/memory_20M', f"{mode}_rank{trainer.global_rank}.json"), "w") as f:
    json.dump(result, f)
