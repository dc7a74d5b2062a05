"""Structured pruning: masks that remove whole attention heads and FFN neurons during fit (BERT, GPT-2,
Llama with grouped-query attention), ``convert`` that physically shrinks the layers with the masked
model's outputs, export -> load of the smaller shapes, QAT after structure, resume, refusals."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_shrink import GradualMagnitudePruning, QuantizationAwareTraining, convert, export, load
from lightning_shrink.pruning.structured import discover, pruned_groups
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_gpt2,
    token_dataloader,
)


def bert4():
    """A 2-layer BERT with 4 heads of 8 and 64 intermediate neurons."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config)


def llama():
    """A 2-layer Llama, 4 query heads in 2 KV groups, biased projections, 64 neurons."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        pad_token_id=0,
        max_position_embeddings=64,
    )
    return LlamaForSequenceClassification(config)


BUILDERS = {"bert": bert4, "gpt2": tiny_gpt2, "llama": llama}


def _fit(build, *callbacks, steps=6, ckpt_path=None, extra=()):
    torch.manual_seed(0)
    module = TinyTransformerClassifier(build(), lr=1e-2)
    trainer = cpu_trainer(callbacks=[*callbacks, *extra], max_steps=steps)
    trainer.fit(module, token_dataloader(n=48, batch_size=8), ckpt_path=ckpt_path)
    return module, trainer


def _structured(frac_heads=0.5, frac_neurons=0.5, scope="layer", **kwargs):
    run = dict(start_step=0, end_step=4, frequency=2, scope=scope, **kwargs)
    return (
        GradualMagnitudePruning(frac_heads, pattern="heads", **run),
        GradualMagnitudePruning(frac_neurons, pattern="neurons", name="neurons", **run),
    )


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_head_masks_remove_whole_heads_and_their_biases_per_layer():
    heads, neurons = _structured(0.5, 0.25, scope="layer")
    module, _ = _fit(bert4, heads, neurons)
    params = dict(module.named_parameters())
    for spec in heads.plugin.group_specs:
        pruned = pruned_groups(spec, params)
        assert int(pruned.sum()) == 2  # half of 4 heads in every layer
        for s in spec.slices:  # every slice of a pruned head is exactly zero, biases included
            for g in pruned.nonzero().flatten().tolist():
                assert not params[s.param].narrow(s.dim, s.offset + g * s.unit, s.unit).any(), s.param
        query = params[f"{spec.name}.self.query.weight"]
        assert int((query.abs().sum(1) == 0).sum()) == 16  # two 8-row heads of the query
    for spec in neurons.plugin.group_specs:
        assert int(pruned_groups(spec, params).sum()) == 16  # 25% of 64 neurons
    assert heads.sparsity == pytest.approx(0.5) and neurons.sparsity == pytest.approx(0.25)


def test_global_neuron_masks_rank_all_layers_together_and_keep_one_per_layer():
    torch.manual_seed(0)
    model = tiny_gpt2()
    with torch.no_grad():  # layer 1's MLP is tiny: a global threshold prunes it first
        model.transformer.h[1].mlp.c_fc.weight.mul_(1e-3)
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e-3)
    cb = GradualMagnitudePruning(0.5, pattern="neurons", schedule="constant", frequency=100)
    module, _ = _fit(lambda: model, cb, steps=1)
    params = dict(module.named_parameters())
    counts = [int(pruned_groups(s, params).sum()) for s in cb.plugin.group_specs]
    assert sum(counts) == 128 and counts[1] == 127  # of 2 x 128 neurons; every layer keeps one
    c_fc = params["model.transformer.h.1.mlp.c_fc.weight"]  # Conv1D (in, out): pruned neurons are columns
    assert int((c_fc.abs().sum(0) == 0).sum()) == 127


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_convert_shrinks_the_layers_with_the_masked_outputs_and_export_load_round_trips(family, tmp_path):
    heads, neurons = _structured(0.5, 0.5, scope="global")
    module, _ = _fit(BUILDERS[family], heads, neurons)
    masked = module.model
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    expected = _logits(masked, ids)
    small = convert(masked)
    torch.testing.assert_close(_logits(small, ids), expected, rtol=1e-5, atol=1e-5)
    before = sum(p.numel() for p in masked.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert after < before
    for kind in ("heads", "neurons"):
        dense_counts = [s.count for s in discover(masked, kind)]
        small_counts = [s.count for s in discover(small, kind)]
        assert sum(small_counts) == sum(dense_counts) // 2 and all(c >= 1 for c in small_counts)
    # the smaller shapes are recorded, rebuilt from the transformers config and refilled
    loaded = load(export(small, tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "shrink_config.json").read_text())
    assert set(meta["structure"]["layers"]) == {
        s.name for k in ("heads", "neurons") for s in discover(small, k)
    }
    for (name, a), (_, b) in zip(small.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.shape == b.shape, name
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_llama_prunes_whole_kv_groups_and_keeps_the_gqa_ratio():
    heads = GradualMagnitudePruning(0.5, pattern="heads", schedule="constant", frequency=100, scope="layer")
    module, _ = _fit(llama, heads, steps=1)
    small = convert(module.model)
    for layer in small.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == 8  # one KV head of 8 left
        assert attn.q_proj.out_features == attn.o_proj.in_features == 16  # its two query heads
        assert attn.num_key_value_groups == 2


def test_load_refuses_a_recorded_structure_that_does_not_fit(tmp_path):
    heads = GradualMagnitudePruning(0.5, pattern="heads", schedule="constant", frequency=100)
    module, _ = _fit(bert4, heads, steps=1)
    directory = export(convert(module.model), tmp_path / "export")
    path = directory / "shrink_config.json"
    meta = json.loads(path.read_text())
    name = next(iter(meta["structure"]["layers"]))
    for groups in (9, 0, "2"):
        bad = copy.deepcopy(meta)
        bad["structure"]["layers"][name]["groups"] = groups
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"structure.*damaged"):
            load(directory)
    bad = copy.deepcopy(meta)
    bad["structure"]["layers"]["bert.encoder.layer.7.attention"] = bad["structure"]["layers"][name]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not have"):
        load(directory)
    bad = copy.deepcopy(meta)
    shapes = bad["structure"]["layers"][name]["shapes"]
    shapes[next(iter(shapes))] = [1, 1]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="records shapes"):
        load(directory)


def test_qat_after_structure_converts_the_smaller_layers_to_int8(tmp_path):
    heads, neurons = _structured(0.5, 0.5)
    qat = QuantizationAwareTraining(start_step=0)
    module, _ = _fit(bert4, heads, neurons, qat)
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    fake = _logits(module.model, ids)
    small = convert(module.model)
    layer = small.bert.encoder.layer[0]
    assert type(layer.attention.self.query).__name__ == "Int8Linear"
    assert layer.attention.self.query.out_features == 16 and layer.intermediate.dense.out_features == 32
    int8 = _logits(small, ids)
    torch.testing.assert_close(int8, fake, rtol=0.05, atol=0.05)
    loaded = load(export(small, tmp_path / "export"))
    torch.testing.assert_close(_logits(loaded, ids), int8)


def test_distillation_with_structured_pruning_leaves_the_teacher_whole():
    from lightning_shrink import KnowledgeDistillation

    torch.manual_seed(0)
    teacher = bert4()
    heads, neurons = _structured(0.5, 0.5)
    kd = KnowledgeDistillation(copy.deepcopy(teacher), temperature=2.0, alpha=0.5)
    module, trainer = _fit(lambda: copy.deepcopy(teacher), heads, neurons, kd)
    assert any(k.startswith("distillation") for k in trainer.callback_metrics)
    assert all(not s.name.startswith("teacher") for s in heads.plugin.group_specs)
    assert bool((kd.plugin.teacher.bert.encoder.layer[0].attention.self.query.weight != 0).all())
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(convert(module.model), ids), _logits(module.model, ids))


def test_resume_mid_schedule_restores_the_structured_masks_and_schedule(tmp_path):
    def run(ckpt_path=None, save=False):  # dropout off: Lightning does not restore the global RNG
        heads = GradualMagnitudePruning(0.75, pattern="heads", start_step=0, end_step=6, frequency=2)
        extra = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")] if save else []
        torch.manual_seed(0)
        module = TinyTransformerClassifier(bert4(), lr=1e-2)
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        trainer = cpu_trainer(callbacks=[heads, *extra], max_steps=8, max_epochs=3, enable_checkpointing=save)
        trainer.fit(module, token_dataloader(n=24, batch_size=8), ckpt_path=ckpt_path)  # 3 steps an epoch
        return module, heads

    _, cb_full = run(save=True)
    ckpt = tmp_path / "epoch=0.ckpt"  # after step 3 of 8; mask updates at 0, 2, 4, 6
    assert 0 < torch.load(ckpt, weights_only=False)["lightning_shrink"]["pruning"]["sparsity"] < 0.75
    resumed, cb_resumed = run(ckpt_path=ckpt)
    for name, mask in cb_full.masks.items():
        assert torch.equal(mask, cb_resumed.masks[name]), name
    # (the weights are not compared: a plain resume of this model is not bit-exact either, measured here)
    assert cb_resumed.plugin.update_count == cb_full.plugin.update_count == 4
    assert cb_resumed.plugin.last_update_step == 6
    weights = dict(resumed.named_parameters())
    for name, mask in cb_resumed.masks.items():
        assert not weights[name][~mask].any(), name
    assert cb_resumed.sparsity == pytest.approx(0.75)


def test_an_unsupported_model_is_refused_at_set_up_naming_its_class_and_the_pattern():
    cb = GradualMagnitudePruning(0.5, pattern="heads")
    trainer = cpu_trainer(callbacks=[cb], max_steps=1)
    loader = torch.utils.data.DataLoader(random_classification_data(16), batch_size=8)
    with pytest.raises(ValueError, match=r"pattern='heads'.*TinyClassifier"):
        trainer.fit(TinyClassifier(), loader)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"sparsity_overrides": {"*": 0.2}}, "sparsity_overrides"),
        ({"parameter_names": "bias"}, "parameter_names"),
        ({"module_types": [torch.nn.Linear]}, "module_types"),
    ],
)
def test_arguments_a_structured_pattern_cannot_honour_are_refused(kwargs, argument):
    with pytest.raises(ValueError, match=rf"pattern='neurons'.*`{argument}`"):
        GradualMagnitudePruning(0.5, pattern="neurons", **kwargs)


def test_modules_select_layers_and_a_frozen_model_is_never_pruned():
    cb = GradualMagnitudePruning(
        0.5, pattern="heads", schedule="constant", frequency=100, exclude_modules="*.layer.0.*"
    )
    module, _ = _fit(bert4, cb, steps=1)
    assert [s.name for s in cb.plugin.group_specs] == ["model.bert.encoder.layer.1.attention"]
    layer0 = module.model.bert.encoder.layer[0].attention.self.query.weight
    assert bool((layer0 != 0).all())


def test_semi_structured_conversion_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("tests the refusal on a machine without CUDA")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"semi_structured=True.*CUDA"):
        convert(model, semi_structured=True)
    with pytest.raises(TypeError, match="semi_structured"):
        convert(model, semi_structured="yes")


def test_a_model_without_pruned_groups_has_nothing_to_convert():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="nothing to convert"):
            convert(bert4())


# The DDP test of identical structured masks runs in the launch of tests/test_pruning_criteria.py's
# DDP test (tests/scripts/pruning_structured_ddp.py).


@pytest.mark.parametrize("criterion", ["movement", "taylor"])
def test_structured_patterns_rank_groups_by_a_learned_criterion(criterion):
    """A learned criterion drives the structured pattern: whole heads are pruned to the target from the
    criterion's per-weight scores (summed over each group), which cover every pruned parameter."""
    run = dict(start_step=2, end_step=4, frequency=2, scope="layer")
    learned = GradualMagnitudePruning(0.5, pattern="heads", criterion=criterion, **run)
    module, _ = _fit(bert4, learned)
    params = dict(module.named_parameters())
    for spec in learned.plugin.group_specs:
        assert int(pruned_groups(spec, params).sum()) == 2
    assert learned.sparsity == pytest.approx(0.5)
    scores = learned.plugin.criterion.scores(
        list(range(len(learned.plugin.targets))),
        learned.plugin.keeps,
        [t.transposed for t in learned.plugin.targets],
        learned.plugin.config.pattern,
    )
    assert scores is not None and len(scores) == len(learned.plugin.targets)
