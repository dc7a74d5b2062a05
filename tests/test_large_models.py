"""Memory that scales: the radix threshold selection, one boolean mask per weight, fake quantization
that recomputes in backward, the FSDP2-sharded teacher, and bf16 fits of every technique."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from legacy_selection import legacy_compute_masks
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import lightning_shrink as ls
from lightning_shrink.pruning import masks as masks_module
from lightning_shrink.pruning.distributed import Comm
from lightning_shrink.pruning.masks import compute_masks, parse_pattern
from lightning_shrink.testing.distributed import run_multiprocess_script
from lightning_shrink.testing.models import cpu_trainer

SCRIPT = Path(__file__).parent / "scripts" / "large_models_fsdp2.py"


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny ``LlamaForCausalLM`` from a config (vocabulary 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


LORA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def lora_llama() -> nn.Module:
    """:func:`tiny_llama` with peft LoRA adapters (r=4) on ``q/v/up_proj``, the base frozen."""
    import peft

    model = tiny_llama()
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="gaussian", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)


class ConfiguredLlama(pl.LightningModule):
    """A tiny Llama (``lora=True``: with peft LoRA adapters) built in ``configure_model``; under
    ``ModelParallelStrategy`` each decoder layer and then the whole model are sharded with FSDP2
    (``fully_shard``), as Lightning's docs do."""

    def __init__(self, lr: float = 1e-2, lora: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.lora = lora
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Built on the CPU, not on ModelParallelStrategy's meta device (whose materialization
        # re-initializes the weights): both runs start from the same seeded weights.
        with torch.device("cpu"):
            self.model = lora_llama() if self.lora else tiny_llama()
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            llama = self.model.get_base_model() if self.lora else self.model
            for layer in llama.model.layers:
                fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.model, mesh=mesh["data_parallel"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Tokens(Dataset):
    """Random token sequences of one length (every token has a label)."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 0) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def compressed_fit(
    strategy: str | pl.strategies.Strategy = "auto",
    devices: int = 1,
    lora: bool = False,
    gradients: bool = False,
):
    """Pruning (global) + weight-only int8 QAT + distillation from a larger Llama, four steps of global
    batches of 8: with ``devices=2`` each rank takes every other example of a batch (its own loader,
    in order), so both runs see the same batches. ``lora=True``: the student has LoRA adapters (the
    base weights are pruned, QAT fake-quantizes the merged weight), three steps. ``gradients=True``:
    two pruning callbacks with gradient criteria instead, ``movement`` on the attention and ``taylor``
    on the MLP (returned as a list)."""
    teacher = tiny_llama(hidden=48, layers=3, seed=1)
    if gradients:
        schedule = dict(target_sparsity=0.5, start_step=1, end_step=2, frequency=1)
        pruning = [
            ls.GradualMagnitudePruning(criterion="movement", modules="*.self_attn.*", **schedule),
            ls.GradualMagnitudePruning(criterion="taylor", modules="*.mlp.*", **schedule),
        ]
    else:
        pruning = ls.GradualMagnitudePruning(0.5, start_step=0, end_step=2, frequency=1)
    callbacks = [
        *(pruning if gradients else [pruning]),
        ls.QuantizationAwareTraining(activations=None),
        ls.KnowledgeDistillation(teacher),
    ]
    model = ConfiguredLlama(lora=lora)
    trainer = cpu_trainer(
        callbacks=callbacks,
        strategy=strategy,
        devices=devices,
        max_steps=3 if lora else 4,
        use_distributed_sampler=False,
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    data = Subset(Tokens(), range(rank, len(Tokens()), devices))
    trainer.fit(model, DataLoader(data, batch_size=8 // devices))
    return trainer, model, teacher, pruning


# ------------------------------------------------------------------------------- threshold selection


def _ties_heavy(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights drawn from a handful of values (many exact ties, zeros and negative zeros)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, -0.0, 0.5, -0.5, 0.25, 1.0, 3.0, -3.0])
    w = values[torch.randint(len(values), shape, generator=g)]
    noisy = torch.rand(shape, generator=g) < 0.3
    return torch.where(noisy, torch.randn(shape, generator=g), w).to(dtype)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "rows"])
@pytest.mark.parametrize("given_scores", [False, True])
@pytest.mark.parametrize("candidates", [1 << 20, 40, 0])
def test_radix_selection_equals_the_previous_selection(pattern, given_scores, candidates, monkeypatch):
    # Chunks smaller than the parameters: selections that cross chunk boundaries; all the candidates
    # of the threshold's high bin kept, some (the third pass finds them again after the 40th), none.
    monkeypatch.setattr(masks_module, "CHUNK", 96)
    monkeypatch.setattr(masks_module, "CANDIDATES", candidates)
    parsed = parse_pattern(pattern)
    for seed in range(6):
        shapes = [(12, 16), (8, 32), (20, 8), (4, 4)]
        weights = [_ties_heavy(s, seed * 10 + i) for i, s in enumerate(shapes)]
        transposed = [False, False, True, False]
        g = torch.Generator().manual_seed(seed)
        keeps = [torch.rand(s, generator=g) > 0.15 * (seed % 3) for s in shapes]
        if pattern == "2:4":
            keeps = [torch.ones(s, dtype=torch.bool) for s in shapes]
        scores = (
            [_ties_heavy(s, 100 + seed * 10 + i).abs() for i, s in enumerate(shapes)]
            if given_scores
            else None
        )
        for sparsity in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
            args = (weights, keeps, transposed, [w.numel() for w in weights], sparsity, parsed, Comm())
            given = [x.clone() for x in scores] if scores else None
            new = compute_masks(*args, scores=scores)
            assert given is None or all(torch.equal(a, b) for a, b in zip(scores, given, strict=True))
            old = legacy_compute_masks(*args, scores=scores)
            for a, b in zip(new, old, strict=True):
                assert a.dtype == torch.bool and a.shape == b.shape
                assert torch.equal(a, b), (pattern, seed, sparsity)


def test_radix_selection_of_bf16_weights_is_exact():
    w = [_ties_heavy((64, 48), 3, torch.bfloat16), _ties_heavy((32, 64), 4, torch.bfloat16)]
    keeps = [torch.ones_like(x, dtype=torch.bool) for x in w]
    args = (w, keeps, [False, False], [x.numel() for x in w], 0.6, parse_pattern("unstructured"), Comm())
    new = compute_masks(*args)
    assert sum(int((~m).sum()) for m in new) == round(0.6 * sum(x.numel() for x in w))
    assert all(torch.equal(a, b) for a, b in zip(new, legacy_compute_masks(*args), strict=True))


# ------------------------------------------------------------------------ fake quantization backward


def _prepared(layer: torch.nn.Module, **config) -> torch.nn.Module:
    from lightning_shrink.quantization.config import LayerSettings, QuantizationConfig
    from lightning_shrink.quantization.fake_layers import prepare_module

    prepare_module(layer, LayerSettings(QuantizationConfig(**config)))
    return layer


def _grads_and_saved(layer, x, recompute, monkeypatch):
    from lightning_shrink.quantization import fake_layers

    monkeypatch.setattr(fake_layers, "RECOMPUTE_IN_BACKWARD", recompute)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    # The outermost hooks see what autograd keeps, except what the layer's own hooks replaced.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [g.clone() for g in grads], sum(saved)


@pytest.mark.parametrize(
    "kind, config",
    [
        ("linear", {}),
        ("linear", {"weight_bits": 4, "group_size": 16, "activations": None}),
        ("conv", {}),
        ("conv1d_hf", {"activations": None}),
        ("linear_bf16", {}),
    ],
)
def test_fake_quant_recomputes_its_weight_in_backward_with_identical_gradients(kind, config, monkeypatch):
    torch.manual_seed(0)
    if kind.startswith("linear"):
        dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
        layer, x = torch.nn.Linear(64, 48).to(dtype), torch.randn(3, 5, 64, dtype=dtype)
    elif kind == "conv":
        layer, x = torch.nn.Conv2d(4, 8, 3), torch.randn(2, 4, 9, 9)
    else:
        from transformers.pytorch_utils import Conv1D

        layer, x = Conv1D(48, 64), torch.randn(3, 5, 64)
    layer = _prepared(layer, **config)
    weight_bytes = layer.weight.untyped_storage().nbytes()
    kept, kept_saved = _grads_and_saved(layer, x, False, monkeypatch)
    recomputed, recomputed_saved = _grads_and_saved(layer, x, True, monkeypatch)
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)
    # The fake-quantized copy (the size of the weight) is no longer held for backward.
    assert kept_saved - recomputed_saved >= weight_bytes


def test_fake_quant_copies_are_freed_after_forward(monkeypatch):
    """No fake-quantized weight is alive between forward and backward: not saved by autograd, and not
    held by anything else (the saved-tensor hooks stay with the graph, so a hook that closed over the
    copy would keep every layer's copy alive until backward, which no saved-tensor count shows)."""
    import weakref

    from lightning_shrink.quantization import fake_layers

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    for layer in (model[0], model[2]):
        _prepared(layer, activations=None)
    alive: list[weakref.ref] = []
    quantize = fake_layers._FakeQuantMixin._quantize

    def recorded(self, weight):
        out = quantize(self, weight)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(fake_layers._FakeQuantMixin, "_quantize", recorded)
    loss = model(torch.randn(4, 32)).pow(2).sum()
    assert len(alive) == 2 and all(ref() is None for ref in alive)
    loss.backward()  # recomputes them
    assert len(alive) > 2 and model[0].weight.grad is not None


def test_fake_quant_refuses_a_weight_changed_between_forward_and_backward():
    layer = _prepared(torch.nn.Linear(8, 4))
    out = layer(torch.randn(2, 8, requires_grad=True))
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        out.sum().backward()


# ----------------------------------------------------------------------------------------- FSDP2


@pytest.mark.slow
def test_fsdp2_pruning_qat_and_distillation_from_a_sharded_teacher_equal_one_process(tmp_path):
    run_multiprocess_script(SCRIPT, tmp_path, cwd=tmp_path, timeout=600)
    trainer, model, teacher, pruning = compressed_fit()
    expected = {k: v for k, v in model.model.state_dict().items() if k.endswith("weight")}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    # each rank logs the distillation loss of its own half of the last batch
    kl = float(trainer.callback_metrics["distillation/kl"])
    assert sum(rank["kl"] for rank in ranks) / 2 == pytest.approx(kl, rel=1e-4)
    for rank in ranks:
        assert rank["sparsity"] == pytest.approx(pruning.sparsity)
        assert rank["selection_checks"] and all(rank["selection_checks"])
        # every teacher parameter is sharded: each rank holds (at most 1.1 x) half of the teacher
        assert rank["teacher_local"] <= 1.1 * teacher_params / 2
        assert rank["teacher_sharded"] == rank["teacher_tensors"]
        assert set(rank["weights"]) == set(expected)
        for key, value in rank["weights"].items():
            torch.testing.assert_close(torch.tensor(value), expected[key], atol=2e-5, rtol=1e-4)
    _check_fsdp2_lora(ranks)


def _check_fsdp2_lora(ranks: list[dict]) -> None:
    """The LoRA student of the same launch: base weights pruned (global 50 %) with the same zeros as in
    one process, adapters dense and trained alike, the merged model at the target sparsity."""
    trainer, model, _, pruning = compressed_fit(lora=True)
    params = dict(model.model.named_parameters())
    expected = {n: p.detach() for n, p in params.items() if "lora_" in n or "base_layer" in n}
    base = [n for n in expected if n.endswith("base_layer.weight")]
    assert [t.name for t in pruning.plugin.targets] == [f"model.{n}" for n in base]
    kl = float(trainer.callback_metrics["distillation/kl"])
    assert sum(rank["lora"]["kl"] for rank in ranks) / 2 == pytest.approx(kl, rel=1e-4)
    first = {k: torch.tensor(v) for k, v in ranks[0]["lora"]["weights"].items()}
    for rank in ranks:
        lora = rank["lora"]
        assert lora["sparsity"] == pytest.approx(0.5) and lora["targets"] == ranks[0]["lora"]["targets"]
        assert set(base) <= set(lora["sharded"])  # the base weights under the adapters really were sharded
        assert "sharded (FSDP2) outside a forward pass" in lora["merge_error"]
        weights = {k: torch.tensor(v) for k, v in lora["weights"].items()}
        assert set(weights) == set(expected)
        for key, value in weights.items():
            assert torch.equal(value, first[key]), key  # both ranks hold the same (gathered) weights
            if key in base:  # frozen: pruned to the same zeros, nothing else changes them
                assert torch.equal(value, expected[key]), key
            else:
                torch.testing.assert_close(value, expected[key], atol=2e-6, rtol=1e-4)
                assert bool((value != 0).all()), key  # adapters dense
    assert sum(int((first[n] == 0).sum()) for n in base) == sum(first[n].numel() for n in base) // 2
    merged = model.model.merge_and_unload()
    layers = [getattr(m, name) for m in merged.model.layers for name in ("self_attn", "mlp")]
    kept = [getattr(m, t).weight for m in layers for t in LORA_TARGETS if hasattr(m, t)]
    assert sum(int((w == 0).sum()) for w in kept) == sum(w.numel() for w in kept) // 2


# ------------------------------------------------------------------------------------------- bf16


class LlamaModule(ConfiguredLlama):
    """:class:`ConfiguredLlama` with an optimizer that keeps bf16 parameters trainable."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("technique", ["pruning", "qat", "distillation", "privacy"])
def test_bf16_fits(technique, precision):
    from lightning_shrink.testing.models import TinyClassifier, random_classification_data

    if technique == "privacy":
        model = TinyClassifier()
        callback = ls.DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
        data = DataLoader(random_classification_data(32), batch_size=8)
    else:
        model = LlamaModule()
        data = DataLoader(Tokens(n=16), batch_size=8)
        callback = {
            "pruning": lambda: ls.GradualMagnitudePruning(0.5, start_step=0, end_step=1, frequency=1),
            "qat": lambda: ls.QuantizationAwareTraining(weight_bits=4, group_size=16),
            "distillation": lambda: ls.KnowledgeDistillation(tiny_llama(48, 3, seed=1)),
        }[technique]()
    trainer = cpu_trainer(callbacks=[callback], precision=precision, max_steps=2)
    trainer.fit(model, data)
    assert trainer.global_step == 2
    weights = [p for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in weights)
    if precision == "bf16-true":
        assert all(p.dtype == torch.bfloat16 for p in weights)
    if technique == "pruning":
        assert callback.sparsity == pytest.approx(0.5, abs=0.01)
        assert all(m.dtype == torch.bool for m in callback.plugin.masks.values())
    if technique == "distillation":
        assert torch.isfinite(torch.as_tensor(trainer.callback_metrics["distillation/kl"]))
