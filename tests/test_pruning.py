"""Gradual magnitude pruning: schedules, patterns, thresholds, enforcement, checkpoints, models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import lightning_shrink
from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.pruning.distributed import Comm
from lightning_shrink.pruning.masks import compute_masks, parse_pattern
from lightning_shrink.pruning.schedule import PruningSchedule
from lightning_shrink.testing.models import (
    TinyClassifier,
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_bert,
    tiny_gpt2,
    token_dataloader,
)


def _loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(random_classification_data(n), batch_size=batch_size)


def _zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


# ---------------------------------------------------------------------------------------- schedule


def test_schedule_values_match_formulas():
    s_i, s_f, t0, t_end, dt = 0.1, 0.8, 10, 50, 5
    cubic = PruningSchedule("cubic", s_i, s_f, t0, t_end, dt)
    linear = PruningSchedule("linear", s_i, s_f, t0, t_end, dt)
    for t in range(t0, t_end + 1):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3
        assert math.isclose(cubic.sparsity(t), expected, abs_tol=1e-12)
        assert math.isclose(linear.sparsity(t), s_i + (s_f - s_i) * (t - t0) / (t_end - t0), abs_tol=1e-12)
    assert cubic.sparsity(t0) == pytest.approx(s_i) and cubic.sparsity(t_end + 7) == s_f
    assert cubic.sparsity(t0 - 1) == 0.0
    # a per-layer override follows the same curve to its own target
    assert cubic.sparsity(30, final=0.5) == pytest.approx(0.5 + (0.1 - 0.5) * (1 - 20 / 40) ** 3)
    updates = [t for t in range(0, 60) if cubic.is_update_step(t)]
    assert updates == [10, 15, 20, 25, 30, 35, 40, 45, 50]
    odd = PruningSchedule("cubic", 0.0, 0.5, 0, 7, 3)
    assert [t for t in range(12) if odd.is_update_step(t)] == [0, 3, 6, 7]
    constant = PruningSchedule("constant", 0.0, 0.6, 4, 4, 1)
    assert [t for t in range(10) if constant.is_update_step(t)] == [4]
    assert constant.sparsity(4) == 0.6
    fn = PruningSchedule(lambda t: min(0.05 * t, 0.5), 0.0, 0.5, 0, 10, 1)
    assert fn.sparsity(4) == pytest.approx(0.2) and fn.sparsity(4, final=0.25) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        PruningSchedule(lambda t: 1.5, 0.0, 0.5, 0, 10, 1).sparsity(3)


# ---------------------------------------------------------------------------------------- patterns


def _masks(weights, pattern, sparsity, transposed=None, keeps=None):
    transposed = transposed or [False] * len(weights)
    keeps = keeps or [torch.ones_like(w, dtype=torch.bool) for w in weights]
    return compute_masks(
        weights, keeps, transposed, [w.numel() for w in weights], sparsity, parse_pattern(pattern), Comm()
    )


def test_unstructured_prunes_exactly_the_smallest():
    torch.manual_seed(0)
    w = torch.randn(37, 23)
    (keep,) = _masks([w], "unstructured", 0.6)
    k = round(0.6 * w.numel())
    assert int((~keep).sum()) == k
    assert w.abs()[~keep].max() <= w.abs()[keep].min()
    # ties at the threshold are broken by position: still exactly k
    (keep,) = _masks([torch.ones(10, 10)], "unstructured", 0.35)
    assert int((~keep).sum()) == 35 and not keep.view(-1)[:35].any()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_keeps_exactly_n_per_group_along_input_dim(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    (keep,) = _masks([w], pattern, 1 - n / m)
    groups = keep.view(16, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the largest of their group
    mags = w.abs().view(16, -1, m)
    assert (mags.masked_fill(~groups, float("inf")).amin(-1) >= mags.masked_fill(groups, -1).amax(-1)).all()
    # intermediate sparsity: only group candidates are pruned, never more than M-N per group
    (half,) = _masks([w], pattern, (1 - n / m) / 2)
    assert int((~half).sum()) == round((1 - n / m) / 2 * w.numel())
    assert ((~half).view(16, -1, m).sum(-1) <= m - n).all()
    assert not (~half & keep).any()


def test_nm_matches_pytorch_semi_structured_layout():
    # PyTorch's 2:4 layout: in every 4 consecutive elements of a row (input dim) at most 2 are non-zero.
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    (keep,) = _masks([w], "2:4", 0.5)
    dense = w * keep
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    assert ((dense.view(32, 16, 4) != 0).sum(-1) <= 2).all()
    # transformers Conv1D stores (in, out): groups run along dim 0
    (keep_t,) = _masks([w.t().contiguous()], "2:4", 0.5, transposed=[True])
    assert torch.equal(keep_t, keep.t())


def test_rows_prunes_whole_output_rows():
    torch.manual_seed(3)
    w = torch.randn(20, 8)
    w[[2, 5, 11]] *= 0.01
    (keep,) = _masks([w], "rows", 0.15)
    pruned_rows = (~keep).all(1)
    assert pruned_rows.sum() == 3 and set(pruned_rows.nonzero().view(-1).tolist()) == {2, 5, 11}
    assert (keep.all(1) | (~keep).all(1)).all()
    # transformers Conv1D (in, out): output rows are columns
    (keep_t,) = _masks([w.t().contiguous()], "rows", 0.15, transposed=[True])
    assert torch.equal(keep_t, keep.t())


def test_global_threshold_differs_from_layer_threshold():
    torch.manual_seed(4)
    small, large = torch.randn(16, 16) * 0.1, torch.randn(16, 16)
    glob = _masks([small, large], "unstructured", 0.5)
    # one global threshold: the small-magnitude layer takes almost all of the pruning
    assert int((~glob[0]).sum()) + int((~glob[1]).sum()) == 256
    assert _zero_fraction(glob[0].float()) > 0.8 and _zero_fraction(glob[1].float()) < 0.2
    threshold = max(small.abs()[~glob[0]].max(), large.abs()[~glob[1]].max())
    assert threshold <= min(small.abs()[glob[0]].min(), large.abs()[glob[1]].min())
    layer = [_masks([w], "unstructured", 0.5)[0] for w in (small, large)]
    assert [int((~m).sum()) for m in layer] == [128, 128]


def test_masks_never_regrow():
    torch.manual_seed(5)
    w = torch.randn(8, 8)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[0] = False  # pruned earlier even though the weights are large
    (new,) = _masks([w * 10], "unstructured", 0.3, keeps=[keep])
    assert not new[0].any() and int((~new).sum()) == round(0.3 * 64)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "rows"])
def test_masks_from_other_scores_than_magnitudes(pattern):
    torch.manual_seed(6)
    w = torch.randn(16, 32)
    sparsity = 0.5 if pattern != "rows" else 0.25
    default = _masks([w], pattern, sparsity)
    keeps, one = [torch.ones_like(w, dtype=torch.bool)], [w.numel()]
    explicit = compute_masks(
        [w], keeps, [False], one, sparsity, parse_pattern(pattern), Comm(), scores=[w.abs()]
    )
    assert torch.equal(default[0], explicit[0])
    # another importance (here: the inverse magnitude) ranks the weights instead; the scores are not changed
    scores = [1.0 / (w.abs() + 1e-3)]
    given = scores[0].clone()
    (inverse,) = compute_masks(
        [w], keeps, [False], one, sparsity, parse_pattern(pattern), Comm(), scores=scores
    )
    assert torch.equal(scores[0], given) and int((~inverse).sum()) == int((~default[0]).sum())
    if pattern == "unstructured":
        assert w.abs()[~inverse].min() >= w.abs()[inverse].max()


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("mask_gradients", [False, True])
def test_fit_enforces_masks_through_adamw_and_leaves_a_plain_model(tmp_path, mask_gradients):
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.05)
    keys = list(model.state_dict())
    cb = GradualMagnitudePruning(0.75, start_step=2, end_step=10, frequency=2, mask_gradients=mask_gradients)
    seen = []

    class Probe:
        @lightning_shrink.hookimpl(trylast=True)
        def shrink_after_optimizer_step(self, trainer, optimizer):
            plugin = cb.plugin
            for p, keep in zip(plugin.params, plugin.keeps, strict=True):
                assert not p[~keep].any(), "a pruned weight is non-zero after an optimizer step"
                state = optimizer.state[p]
                # moments of pruned weights are reset at each update; with masked gradients they
                # stay exactly zero at every step
                if mask_gradients or plugin.last_update_step == trainer.global_step + 1:
                    assert not state["exp_avg"][~keep].any() and not state["exp_avg_sq"][~keep].any()
            seen.append(plugin.sparsity)

    trainer = cpu_trainer(callbacks=[lightning_shrink.ShrinkCallback(plugins=[Probe()]), cb], max_epochs=2)
    trainer.fit(model, _loader())
    assert trainer.global_step == 16 and len(seen) == 16
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.75, abs=1e-3)
    # optimizer state of pruned weights is exactly zero, and so are their gradients' effects
    opt = trainer.optimizers[0]
    for p, keep in zip(cb.plugin.params, cb.plugin.keeps, strict=True):
        assert not opt.state[p]["exp_avg"][~keep].any() and not opt.state[p]["exp_avg_sq"][~keep].any()
    # the classifier (output layer) and biases are not pruned; keys unchanged; no hooks left
    assert set(cb.masks) == {"net.0.weight", "net.2.weight"}
    assert _zero_fraction(model.classifier.weight) == 0.0 and _zero_fraction(model.net[0].bias) == 0.0
    assert list(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    zeros = _zero_fraction(torch.cat([model.net[0].weight.view(-1), model.net[2].weight.view(-1)]))
    assert zeros == pytest.approx(0.75, abs=1e-3)
    # metrics and progress bar
    metrics = trainer.callback_metrics
    assert float(metrics["pruning/sparsity"]) == pytest.approx(0.75, abs=1e-3)
    assert float(metrics["pruning/target_sparsity"]) == pytest.approx(0.75)
    assert "pruning/sparsity/net.2.weight" in metrics
    assert {"pruning/sparsity", "pruning/target_sparsity"} <= set(trainer.progress_bar_metrics)
    # the compression report has a row per pruned layer
    rows = lightning_shrink.report(trainer).select("pruning", "sparsity")
    assert {r.target for r in rows} >= {"net.0.weight", "net.2.weight"}
    # a plain load_state_dict, no lightning_shrink involved
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    fresh = TinyClassifier()
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt"))
    assert torch.equal(fresh.net[2].weight, model.net[2].weight)
    # a second fit with the same model and callback keeps (never revives) the pruned weights
    pruned_before = {n: (w == 0) for n, w in model.named_parameters() if n in cb.masks}
    trainer2 = cpu_trainer(callbacks=[cb], max_epochs=1)
    trainer2.fit(model, _loader())
    for n, w in model.named_parameters():
        if n in pruned_before:
            assert (w[pruned_before[n]] == 0).all()
    assert cb.sparsity == pytest.approx(0.75, abs=1e-3)


def test_gradient_accumulation_and_bf16_count_optimizer_steps():
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = GradualMagnitudePruning(0.5, start_step=0, end_step=1.0, frequency=0.25, schedule="linear")
    trainer = cpu_trainer(callbacks=[cb], accumulate_grad_batches=2, precision="bf16-mixed", max_epochs=1)
    trainer.fit(model, _loader(64, 4))  # 16 batches -> 8 optimizer steps
    plugin = cb.plugin
    assert trainer.global_step == 8
    assert (plugin.schedule.start, plugin.schedule.end, plugin.schedule.frequency) == (0, 8, 2)
    assert plugin.update_count == 5  # steps 0, 2, 4, 6, 8
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3)
    for p, keep in zip(plugin.params, plugin.keeps, strict=True):
        assert not p[~keep].any()


def test_continues_from_an_already_sparse_model():
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.05)
    first = GradualMagnitudePruning(0.5, end_step=4, frequency=2)
    cpu_trainer(callbacks=[first], max_epochs=1).fit(model, _loader())
    zero_before = {n: w == 0 for n, w in model.named_parameters() if n in first.masks}
    # a new plain model loaded from the sparse weights, a new callback with a higher target
    sparse = TinyClassifier(optimizer="adamw", lr=0.05)
    sparse.load_state_dict(model.state_dict())
    second = GradualMagnitudePruning(0.8, start_step=4, end_step=8, frequency=2)
    seen = []

    class Probe:
        @lightning_shrink.hookimpl(trylast=True)
        def shrink_after_optimizer_step(self, trainer):
            seen.append(second.sparsity)

    trainer = cpu_trainer(callbacks=[lightning_shrink.ShrinkCallback(plugins=[Probe()]), second])
    trainer.fit(sparse, _loader())
    # before its start_step the existing zeros are kept (not trained back), then it goes on
    assert seen[0] == pytest.approx(0.5, abs=1e-3)
    assert seen[-1] == pytest.approx(0.8, abs=1e-3)
    for n, w in sparse.named_parameters():
        if n in zero_before:
            assert (w[zero_before[n]] == 0).all()


def test_tiny_bert_default_selection_and_plain_reload():
    torch.manual_seed(0)
    model = TinyTransformerClassifier(tiny_bert(), lr=1e-2)
    cb = GradualMagnitudePruning(0.5, pattern="2:4", end_step=4, frequency=2)
    cpu_trainer(callbacks=[cb], max_steps=6).fit(model, token_dataloader(n=48))
    names = set(cb.masks)
    assert "model.bert.encoder.layer.0.attention.self.query.weight" in names
    assert "model.bert.pooler.dense.weight" in names
    assert not any(
        "classifier" in n or "embeddings" in n or "LayerNorm" in n or n.endswith("bias") for n in names
    )
    for name, param in model.named_parameters():
        if name in names:
            assert ((param.view(param.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    plain = tiny_bert()
    plain.load_state_dict(model.model.state_dict())
    assert torch.equal(
        plain.bert.encoder.layer[1].output.dense.weight, model.model.bert.encoder.layer[1].output.dense.weight
    )


def test_tiny_gpt2_conv1d_is_pruned_along_its_input_dimension():
    torch.manual_seed(0)
    model = TinyTransformerClassifier(tiny_gpt2(), lr=1e-2)
    cb = GradualMagnitudePruning(0.5, pattern="2:4", end_step=4, frequency=2)
    cpu_trainer(callbacks=[cb], max_steps=5).fit(model, token_dataloader(n=40))
    names = set(cb.masks)
    assert (
        "model.transformer.h.0.attn.c_attn.weight" in names
        and "model.transformer.h.1.mlp.c_proj.weight" in names
    )
    assert not any("score" in n or "wte" in n or "wpe" in n for n in names)
    w = model.model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
    assert ((w.t().reshape(w.shape[1], -1, 4) != 0).sum(-1) == 2).all()
    assert cb.sparsity == pytest.approx(0.5)


def test_rows_pattern_in_training_and_overrides():
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = GradualMagnitudePruning(
        0.5, pattern="rows", scope="layer", end_step=4, frequency=2, sparsity_overrides={"net.0": 0.25}
    )
    cpu_trainer(callbacks=[cb], max_epochs=1).fit(model, _loader())
    w0, w2 = model.net[0].weight, model.net[2].weight
    assert int((w0 == 0).all(1).sum()) == 8 and int((w2 == 0).all(1).sum()) == 16
    assert int(((w2 == 0).any(1) & ~(w2 == 0).all(1)).sum()) == 0


def test_global_threshold_that_empties_a_layer_warns_once_naming_it():
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=1e-4)
    with torch.no_grad():
        model.net[2].weight.mul_(1e-3)  # an untrained-looking layer: all its weights are the smallest
    pruning = GradualMagnitudePruning(0.7, end_step=4, frequency=1)
    with pytest.warns(UserWarning, match=r"global threshold removed every weight of net\.2\.weight") as rec:
        cpu_trainer(callbacks=[pruning], max_epochs=1).fit(model, _loader())
    assert pruning.plugin.layer_sparsity["net.2.weight"] == 1.0
    assert sum("removed every weight" in str(w.message) for w in rec) == 1  # once, not at every update

    layerwise = TinyClassifier(optimizer="adamw", lr=1e-4)
    layerwise.load_state_dict(model.state_dict() | {"net.2.weight": torch.randn(32, 32)})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*removed every weight")
        cpu_trainer(callbacks=[GradualMagnitudePruning(0.7, end_step=4, frequency=1, scope="layer")]).fit(
            layerwise, _loader()
        )
