"""LoRA (peft) models under the techniques: pruning and quantization-aware training act on the base
weights under the adapters, the merged model keeps the pruned zeros and the fake-quantized values,
both export forms load back, distillation trains a LoRA student, and differential privacy clips the
adapters' per-example gradients (compared with a ``torch.func`` reference)."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader

import lightning_shrink as ls
from lightning_shrink import (
    DifferentialPrivacy,
    GradualMagnitudePruning,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    ShrinkCallback,
    hookimpl,
)
from lightning_shrink.privacy import PrivacyError
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_llama,
    tiny_qwen2,
    token_dataloader,
)

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
TARGETS = ["q_proj", "v_proj", "up_proj"]


def lora_model(arch: str = "llama", dropout: float = 0.0, **config: Any) -> nn.Module:
    torch.manual_seed(0)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="SEQ_CLS"
    )
    return peft.get_peft_model(BUILDERS[arch](), lora, **config)


def lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import Linear

    return {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, Linear)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


BATCH = next(iter(token_dataloader(8, seed=1)))


# ---------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruning_prunes_the_base_weights_and_the_merged_model_keeps_the_zeros(arch: str) -> None:
    model = lora_model(arch, dropout=0.1)
    before = lora_weights(model)
    pruning = GradualMagnitudePruning(target_sparsity=0.5, scope="layer", frequency=1, end_step=3)
    cpu_trainer(callbacks=[pruning], max_steps=5).fit(
        TinyTransformerClassifier(model, lr=1e-2), token_dataloader()
    )

    targets = [t.name for t in pruning.plugin.targets]
    assert targets and all(name.endswith(".base_layer.weight") for name in targets)
    assert len(targets) == 2 * len(TARGETS)  # the LoRA layers' base weights, nothing else
    # the adapters are trained and dense
    after = lora_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)
    assert all(bool((w != 0).all()) for w in after.values())
    for name, base in base_layers(model).items():
        assert not base.weight.requires_grad
        assert float((base.weight == 0).float().mean()) == 0.5, name
    unmerged = logits(model, BATCH)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged, BATCH), unmerged, rtol=1e-5, atol=1e-5)  # trained as merged
    for layer in merged.model.layers:
        for weight in (
            layer.self_attn.q_proj.weight,
            layer.self_attn.v_proj.weight,
            layer.mlp.up_proj.weight,
        ):
            assert float((weight == 0).float().mean()) == 0.5
    assert pruning.plugin.sparsity == 0.5


def test_modules_to_save_copies_are_pruned_only_when_selected() -> None:
    model = lora_model()
    pruning = GradualMagnitudePruning(target_sparsity=0.5, modules=["*score.modules_to_save*", "*q_proj*"])
    cpu_trainer(callbacks=[pruning], max_steps=2).fit(TinyTransformerClassifier(model), token_dataloader())
    names = [t.name for t in pruning.plugin.targets]
    assert any("score.modules_to_save.default" in n for n in names)
    assert not any("original_module" in n or "lora_" in n for n in names)
    with pytest.raises(TypeError, match="LoRA adapter matrix"):
        cpu_trainer(
            callbacks=[
                GradualMagnitudePruning(
                    target_sparsity=0.5,
                    modules=["model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"],
                )
            ],
            max_steps=1,
        ).fit(TinyTransformerClassifier(lora_model()), token_dataloader())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(use_dora=True), r"uses the LoRA variant Dora"),
        (dict(lora_bias=True), r"has lora_bias=True"),
    ],
    ids=["dora", "lora-bias"],
)
def test_lora_variants_are_refused_at_set_up(config: dict, match: str) -> None:
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS", **config)
    model = peft.get_peft_model(tiny_llama(), lora)
    with pytest.raises(ValueError, match=match):
        cpu_trainer(callbacks=[GradualMagnitudePruning(target_sparsity=0.5)], max_steps=1).fit(
            TinyTransformerClassifier(model), token_dataloader()
        )


def test_other_peft_methods_are_refused_naming_the_method() -> None:
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_llama(),
        peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(ValueError, match=r"peft method 'ia3'"):
        cpu_trainer(callbacks=[QuantizationAwareTraining()], max_steps=1).fit(
            TinyTransformerClassifier(model), token_dataloader()
        )


class GradientRecorder:
    """Each step's batch and LoRA model (after the masks were applied), and, before pruning reads them,
    the LoRA base weights' gradients and the movement scores' gradients."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.models: list[nn.Module] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.score_grads: list[dict[str, torch.Tensor]] = []
        self.movement: Any = None

    @hookimpl(trylast=True)
    def shrink_train_batch_start(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self.batches.append(copy.deepcopy(batch))
        self.models.append(copy.deepcopy(pl_module.model))

    @hookimpl(tryfirst=True)
    def shrink_before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.named_parameters() if n.endswith("base_layer.weight")}
        )
        criterion = self.movement.plugin.criterion
        self.score_grads.append(
            {n: s.grad.clone() for n, s in zip(criterion.names, criterion.score_params, strict=True)}
        )


def merged_gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """``(W_eff, dL/dW_eff)`` of every LoRA layer of ``model``, by autograd on a merged copy without LoRA
    layers (keyed by the LoRA layer's name under the PeftModel)."""
    names = list(base_layers(model))
    merged = copy.deepcopy(model).merge_and_unload()
    merged.train()
    weights = [merged.get_submodule(n.removeprefix("base_model.model.")).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(merged(**batch).loss, weights)
    return {n: (w.detach(), g) for n, w, g in zip(names, weights, grads, strict=True)}


def test_gradient_criteria_score_the_merged_weight_of_lora_layers_with_its_gradient() -> None:
    """movement and taylor on frozen LoRA base weights read dL/dW_eff of the effective weight
    W_eff = W + M ⊙ s·B·A, equal to autograd on a merged copy, and score W_eff with it."""
    model = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    schedule = dict(target_sparsity=0.5, start_step=1, end_step=2, frequency=1)
    movement = GradualMagnitudePruning(criterion="movement", modules="*q_proj*", **schedule)
    taylor = GradualMagnitudePruning(criterion="taylor", modules=["*v_proj*", "*up_proj*"], **schedule)
    recorder = GradientRecorder()
    recorder.movement = movement
    callbacks = [movement, taylor, ShrinkCallback(plugins=[recorder])]
    cpu_trainer(callbacks=callbacks, max_steps=2).fit(
        TinyTransformerClassifier(model, lr=1e-2), token_dataloader()
    )

    references = [merged_gradients(m, b) for m, b in zip(recorder.models, recorder.batches, strict=True)]
    # the base weights' gradients, read before pruning's hook, are dL/dW_eff (the masked step included)
    for grads, reference in zip(recorder.grads, references, strict=True):
        assert len(grads) == 2 * len(TARGETS)
        for name, (_, expected) in reference.items():
            torch.testing.assert_close(
                grads[f"model.{name}.base_layer.weight"], expected, rtol=1e-4, atol=1e-7
            )
    beta1 = dict(taylor.config.criterion_options)["beta1"]
    importance = dict(zip(taylor.plugin.criterion.names, taylor.plugin.criterion.importance, strict=True))
    assert len(importance) == 2 * len(recorder.score_grads[0]) == 4
    for name in base_layers(model):
        key = f"model.{name}.base_layer.weight"
        (w0, g0), (w1, g1) = references[0][name], references[1][name]
        if key in importance:  # EMA of |W_eff * g| over the two steps
            expected = beta1 * (1 - beta1) * (w0 * g0).abs() + (1 - beta1) * (w1 * g1).abs()
            torch.testing.assert_close(importance[key], expected, rtol=1e-4, atol=1e-9)
        else:  # the scores' gradient at each step is W_eff * dL/dW_eff
            for step, (w, g) in enumerate(((w0, g0), (w1, g1))):
                torch.testing.assert_close(recorder.score_grads[step][key], w * g, rtol=1e-4, atol=1e-9)
    # the optimizer never updated the base weights; they are frozen again, without gradients
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p[p != 0], frozen[name][p != 0]), name
    assert movement.sparsity == taylor.sparsity == 0.5


def test_taylor_on_lora_base_weights_refuses_a_gradient_scaler() -> None:
    from lightning.pytorch.plugins import MixedPrecision

    model = lora_model()
    taylor = GradualMagnitudePruning(0.5, criterion="taylor", start_step=1, end_step=2)
    trainer = cpu_trainer(callbacks=[taylor], max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match=r"criterion='taylor' on the frozen base weights of LoRA layers"):
        trainer.fit(TinyTransformerClassifier(model), token_dataloader())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


# ---------------------------------------------------------------------------- quantization and export


def _train_qat(arch: str, adapters: str, prune: bool = True) -> nn.Module:
    model = lora_model(arch, dropout=0.1)
    callbacks: list[pl.Callback] = [QuantizationAwareTraining(activations=None, adapters=adapters)]
    if prune:
        callbacks.append(GradualMagnitudePruning(target_sparsity=0.5, scope="layer", frequency=1, end_step=2))
    cpu_trainer(callbacks=callbacks, max_steps=4).fit(
        TinyTransformerClassifier(model, lr=1e-2), token_dataloader()
    )
    return model


@pytest.mark.parametrize(("arch", "adapters"), [("llama", "merged"), ("qwen2", "base")])
def test_qat_with_lora_converts_exports_and_loads_in_both_forms(
    arch: str, adapters: str, tmp_path: Path
) -> None:
    model = _train_qat(arch, adapters)
    prepared = {n: type(m).__name__ for n, m in model.named_modules()}
    assert not any(t.startswith("FakeQuant") for n, t in prepared.items() if "lora_" in n)
    assert all(prepared[f"{n}.base_layer"] == "FakeQuantLinear" for n in base_layers(model))
    expected = logits(model, BATCH)

    converted = ls.convert(model)
    torch.testing.assert_close(logits(converted, BATCH), expected, rtol=1e-5, atol=1e-5)
    if adapters == "merged":
        # merged, the model is a plain transformers model: the default export is Hugging Face-native
        hf = ls.export(model, tmp_path / "hf")
        assert json.loads((hf / "config.json").read_text())["quantization_config"]
        torch.testing.assert_close(logits(ls.load(hf), BATCH), expected, rtol=1e-5, atol=1e-5)
    directory = ls.export(model, tmp_path / "export", format="native")
    metadata = json.loads((directory / "shrink_config.json").read_text())
    loaded = ls.load(directory)
    torch.testing.assert_close(logits(loaded, BATCH), expected, rtol=1e-5, atol=1e-5)
    int8 = metadata["quantization"]["layers"]
    assert not any("lora_" in name for name in int8)
    if adapters == "merged":
        # one int8 weight per layer, no peft layer left, the pruned zeros kept
        assert type(converted).__name__ == type(loaded).__name__ == "LlamaForSequenceClassification"
        assert "peft" not in metadata
        assert "model.layers.0.self_attn.q_proj" in int8
        # pruned positions are int8 zeros (rounding may add a few more)
        assert float((loaded.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) >= 0.5
        assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in loaded.modules())
    else:
        # int8 base layers, float adapters, the PeftModel rebuilt from the recorded LoraConfig fields
        assert isinstance(loaded, peft.PeftModel) and isinstance(converted, peft.PeftModel)
        section = metadata["peft"]
        assert section["lora_config"]["r"] == 4 and section["lora_config"]["target_modules"] == sorted(
            TARGETS
        )
        assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in int8
        loaded_lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
        assert loaded_lora and all(p.dtype == torch.float32 for p in loaded_lora.values())
        for name, value in lora_weights(model).items():
            torch.testing.assert_close(loaded_lora[name], value)


@pytest.mark.parametrize("merged_qat", [False, True], ids=["masked-delta", "merged-qat"])
def test_weight_sized_lora_tensors_are_recomputed_in_backward(merged_qat: bool, monkeypatch: Any) -> None:
    """The masked delta M ⊙ s·B·A and the fake-quantized merged weight (each the size of the base
    weight) are not kept from forward to backward (under FSDP2 a copy per layer would cancel the
    resharding): they are made again in backward, and the gradients are bitwise those of keeping them."""
    import weakref

    from lightning_shrink.adapters import lora_layer
    from lightning_shrink.quantization import fake_layers

    if merged_qat:
        model = _train_qat("llama", "merged")
    else:
        model = lora_model("llama", dropout=0.1)
        pruning = GradualMagnitudePruning(target_sparsity=0.5, scope="layer", frequency=1, end_step=2)
        trainer = cpu_trainer(callbacks=[pruning], max_steps=3)
        trainer.fit(TinyTransformerClassifier(model), token_dataloader())
    recompute = lora_layer.recompute_in_backward
    alive: list[weakref.ref] = []

    def recorded(owner: str, value: torch.Tensor, *args: Any) -> torch.Tensor:
        alive.append(weakref.ref(value))
        return recompute(owner, value, *args)

    monkeypatch.setattr(lora_layer, "recompute_in_backward", recorded)
    grads = {}
    for kept in (True, False):
        monkeypatch.setattr(fake_layers, "RECOMPUTE_IN_BACKWARD", not kept)
        model.zero_grad(set_to_none=True)
        model.train()
        alive.clear()
        torch.manual_seed(3)  # the same dropout masks
        loss = model(**BATCH).loss
        # 3 target modules x 2 layers; merged: the merged weight and the dropout term's delta
        assert len(alive) == (12 if merged_qat else 6)
        held = sum(ref() is not None for ref in alive)
        assert held == 0 if not kept else held > 0
        loss.backward()
        grads[kept] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, kept_grad in grads[True].items():
        assert torch.equal(kept_grad, grads[False][name]), name
    # a base weight changed in place between forward and backward would make the recomputation differ
    # (autograd itself guards the adapters, which its products save)
    loss = model(**BATCH).loss
    with torch.no_grad():
        list(base_layers(model).values())[-1].weight.mul_(2.0)  # a layer whose input needs a gradient
    # (merged: the dropout term's delta comes last in forward, so it is the first recomputed)
    what = "(merged weight|masked adapter delta)" if merged_qat else "masked adapter delta"
    with pytest.raises(RuntimeError, match=f"modified in place between forward and backward; the {what}"):
        loss.backward()


def test_qat_merged_simulates_the_merged_int8_weight() -> None:
    """A model trained with adapters='merged' computes fq(W + s·B·A): exporting its base and
    adapters instead (or the reverse) is refused, and the two simulations differ."""
    model = _train_qat("llama", "merged", prune=False)
    with pytest.raises(ValueError, match=r"merge_adapters=False deploys int8 base weights \+ float adapters"):
        ls.convert(model, merge_adapters=False)
    base = _train_qat("llama", "base", prune=False)
    with pytest.raises(ValueError, match=r"adapters='base'\) fake-quantized the base weight alone"):
        ls.convert(base, merge_adapters=True)
    # the same weights simulated as int8 base + float adapters compute other values
    from lightning_shrink.quantization.config import LayerSettings

    expected = logits(model, BATCH)
    layers = [m for m in model.modules() if hasattr(m, "shrink_qat")]
    other = LayerSettings(dataclasses.replace(layers[0].shrink_qat.config, adapters="base"), "quantization")
    for module in layers:
        module.__dict__["shrink_qat"] = other
    assert not torch.allclose(logits(model, BATCH), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="`adapters` must be one of"):
        QuantizationAwareTraining(adapters="both")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["lora_config"].update(use_dora=True), r"sets \['use_dora'\], which a lightning-shrink"),
        (lambda s: s["lora_config"].update(r=0), r"lora_config.r` .* must be an int >= 1"),
        (lambda s: s.update(masked_layers=["base_model.model.score"]), r"is not a peft LoRA Linear"),
    ],
    ids=["unknown-field", "bad-rank", "bad-masked-layer"],
)
def test_a_damaged_peft_section_is_refused(edit: Any, match: str, tmp_path: Path) -> None:
    model = lora_model()
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight[0, :4] = 0
    from lightning_shrink.adapters import mask_lora_deltas

    mask_lora_deltas(model, ["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    directory = ls.export(model, tmp_path / "export", merge_adapters=False)
    config_path = directory / "shrink_config.json"
    metadata = json.loads(config_path.read_text())
    assert metadata["peft"]["masked_layers"] == ["base_model.model.model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(logits(ls.load(directory), BATCH), logits(model, BATCH))
    edit(metadata["peft"])
    config_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=match):
        ls.load(directory)


# ---------------------------------------------------------------------------- distillation


def test_distillation_trains_a_lora_student_from_a_separate_teacher() -> None:
    torch.manual_seed(1)
    teacher = tiny_llama(hidden_size=48)
    model = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = lora_weights(model)
    kd = KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5)
    trainer = cpu_trainer(callbacks=[kd], max_steps=3)
    trainer.fit(TinyTransformerClassifier(model, lr=1e-2), token_dataloader())
    assert any(k.startswith("distillation/") for k in trainer.callback_metrics)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    after = lora_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)


@pytest.mark.parametrize(
    ("teacher", "match"),
    [
        (
            lambda m: m.get_base_model(),
            r"the teacher is the student itself \(LlamaForSequenceClassification\)",
        ),
        (
            lambda m: m,
            r"shares its parameter 'base_model\.model\.model\.embed_tokens\.weight' .* a frozen weight",
        ),
        (
            lambda m: m.get_base_model().model.layers[0],
            r"shares its parameter 'self_attn\.q_proj\.base_layer",
        ),
    ],
    ids=["base-model", "peft-model", "shared-layer"],
)
def test_a_teacher_sharing_the_lora_students_weights_is_refused(teacher: Any, match: str) -> None:
    """The student's base model (or any module holding its weights) is not a dense teacher: its base
    weights are pruned or fake-quantized in place."""
    model = lora_model()
    kd = KnowledgeDistillation(teacher(model))
    with pytest.raises(ValueError, match=match) as error:
        cpu_trainer(callbacks=[kd, GradualMagnitudePruning(0.5)], max_steps=1).fit(
            TinyTransformerClassifier(model), token_dataloader()
        )
    assert "copy of the base model made before get_peft_model" in str(error.value)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # nothing frozen


# ---------------------------------------------------------------------------- differential privacy


class LoraClassifier(TinyClassifier):
    """TinyClassifier with LoRA on its two hidden layers (peft injected, base frozen)."""

    def __init__(self, hidden: int = 32, shared: bool = False) -> None:
        super().__init__(hidden=hidden)
        torch.manual_seed(0)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="gaussian")
        self.net = peft.inject_adapter_in_model(config, self.net)
        for name, p in self.net.named_parameters():
            p.requires_grad_("lora_" in name)
        if shared:
            self.net[2].lora_A.default.weight = self.net[0].lora_A.default.weight


class Recorder:
    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.summed: list[dict[str, torch.Tensor]] = []
        self.grads_before: list[dict[str, bool]] = []

    @hookimpl
    def shrink_train_batch_start(self, batch: Any) -> None:
        self.batches.append(copy.deepcopy(batch))

    @hookimpl(trylast=True)
    def shrink_before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        self.summed.append(
            {n: p.summed_grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        )
        self.grads_before.append({n: p.grad is not None for n, p in pl_module.named_parameters()})


def lora_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict]:
    """Per-example gradients of the trainable (adapter) parameters by torch.func, clipped as Opacus does."""
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(trainable, x, y)
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in per_example.values()], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: torch.einsum("b,b...->...", factor, g) for k, g in per_example.items()}


class Snapshot(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = copy.deepcopy(pl_module)
        for module in self.initial.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
                hooks.clear()
            module._is_full_backward_hook = None


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_clips_only_the_adapter_gradients_per_example(mode: str) -> None:
    model = LoraClassifier()
    model.classifier.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("base_layer.weight") for n in frozen)
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, accountant="rdp", grad_sample_mode=mode
    )
    recorder, snapshot = Recorder(), Snapshot()
    trainer = cpu_trainer(callbacks=[dp, snapshot, ShrinkCallback(plugins=[recorder])], max_steps=1)
    trainer.fit(model, DataLoader(random_classification_data(64), batch_size=8))

    x, y = recorder.batches[0]
    norms, clipped = lora_reference(snapshot.initial, x, y, dp.config.max_grad_norm)
    assert (norms > dp.config.max_grad_norm).any()
    torch.testing.assert_close(dp.plugin.last_per_sample_norms, norms, rtol=1e-4, atol=1e-6)
    assert sorted(recorder.summed[0]) == sorted(clipped) and all("lora_" in n for n in clipped)
    for name, expected in clipped.items():
        torch.testing.assert_close(recorder.summed[0][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    # frozen base weights get no gradient and no noise
    assert not any(recorder.grads_before[0][n] for n in frozen)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_dp_noise_reaches_the_adapters_only() -> None:
    model = LoraClassifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    cpu_trainer(callbacks=[dp], max_steps=2).fit(
        model, DataLoader(random_classification_data(64), batch_size=8)
    )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_loading_a_lora_export_without_peft_names_the_extra(tmp_path: Path, monkeypatch: Any) -> None:
    directory = ls.export(lora_model(), tmp_path / "export", merge_adapters=False)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r'needs peft: pip install "lightning-shrink\[peft\]"'):
        ls.load(directory)


def test_dp_refuses_a_trainable_parameter_shared_between_adapters() -> None:
    model = LoraClassifier(hidden=16, shared=True)
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(PrivacyError, match=r"adapter parameter net.0.lora_A.default.weight is shared with"):
        cpu_trainer(callbacks=[dp], max_steps=1).fit(
            model, DataLoader(random_classification_data(64), batch_size=8)
        )


@pytest.mark.parametrize(
    "technique",
    [
        lambda: GradualMagnitudePruning(target_sparsity=0.5),
        lambda: QuantizationAwareTraining(activations=None, adapters="merged"),
    ],
    ids=["pruned-base", "merged-qat"],
)
def test_dp_refuses_lora_layers_with_a_dense_adapter_path(technique: Any) -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(PrivacyError, match=r"compute their adapter as a dense delta"):
        cpu_trainer(callbacks=[dp, technique()], max_steps=1).fit(
            LoraClassifier(), DataLoader(random_classification_data(64), batch_size=8)
        )


def test_dp_with_a_gradient_criterion_on_lora_base_weights_is_refused() -> None:
    # The base weights' gradients would be plain sums, neither clipped nor noised: refused, whichever
    # technique notices first.
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    taylor = GradualMagnitudePruning(target_sparsity=0.5, start_step=1, criterion="taylor")
    with pytest.raises(ValueError, match=r"compute their adapter as a dense delta|does not clip or noise"):
        cpu_trainer(callbacks=[dp, taylor], max_steps=2).fit(
            LoraClassifier(), DataLoader(random_classification_data(64), batch_size=8)
        )
