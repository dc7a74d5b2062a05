"""Checks that need a CUDA device (skipped elsewhere): the techniques together on a GPU with
bf16 mixed precision, and Lightning's FSDP strategy (FSDP1 needs a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_shrink import (
    GradualMagnitudePruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    ShrinkCallback,
    convert,
)
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    tiny_bert,
    token_dataloader,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def linear_sparsities(model):
    return {
        name: float((m.weight == 0).float().mean())
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "classifier" not in name and "encoder" in name
    }


def test_gpu_bf16_pruning_qat_distillation_together():
    torch.manual_seed(0)
    teacher = tiny_bert()
    student = TinyTransformerClassifier(copy.deepcopy(teacher))
    trainer = cpu_trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=2,
        deterministic=False,
        callbacks=[
            KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5),
            QuantizationAwareTraining(weight_bits=8, activations="dynamic"),
            GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=8, frequency=2),
        ],
    )
    trainer.fit(student, token_dataloader(n=128, batch_size=8))
    assert trainer.global_step == 32
    assert ShrinkCallback.find(trainer) is not None
    sparsities = linear_sparsities(student.model)
    assert sparsities and all(s >= 0.45 for s in sparsities.values()), sparsities
    assert "distillation/kl" in trainer.logged_metrics or any(
        k.startswith("distillation") for k in trainer.logged_metrics
    )
    student = student.cpu()
    int8 = convert(student.model)
    batch = next(iter(token_dataloader(n=8, batch_size=8)))
    with torch.no_grad():
        out = int8(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(out).all()


def test_gpu_fsdp1_with_pruning():
    from lightning.pytorch.strategies import FSDPStrategy

    torch.manual_seed(0)
    module = TinyTransformerClassifier(tiny_bert())
    trainer = cpu_trainer(
        accelerator="gpu",
        devices=1,
        strategy=FSDPStrategy(),
        max_steps=8,
        deterministic=False,
        callbacks=[GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, frequency=1)],
    )
    trainer.fit(module, token_dataloader(n=128, batch_size=8))
    assert trainer.global_step == 8


def test_gpu_two_four_pruned_linears_become_semi_structured_with_the_same_outputs():
    from torch.sparse import SparseSemiStructuredTensor

    from lightning_shrink.testing.models import TinyClassifier, random_classification_data

    torch.manual_seed(0)
    # 2:4 needs shapes that are multiples of the kernels' tiles (64 x 64 covers float16 and bfloat16)
    model = TinyClassifier(in_features=64, hidden=128, num_classes=2)
    cb = GradualMagnitudePruning(0.5, pattern="2:4", schedule="constant", frequency=100)
    loader = torch.utils.data.DataLoader(random_classification_data(64, in_features=64), batch_size=16)
    trainer = cpu_trainer(accelerator="gpu", devices=1, max_steps=2, deterministic=False, callbacks=[cb])
    trainer.fit(model, loader)
    dense = model.net.cuda().half().eval()
    x = torch.randn(128, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = dense(x)
    sparse = convert(dense, semi_structured=True)
    assert isinstance(sparse[0].weight, SparseSemiStructuredTensor)
    assert isinstance(sparse[2].weight, SparseSemiStructuredTensor)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), expected, rtol=1e-2, atol=1e-2)
