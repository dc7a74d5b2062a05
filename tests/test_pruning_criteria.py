"""Importance criteria of pruning: each criterion's scores against a hand-computed reference on a real
``Trainer.fit`` (gradients recorded as the optimizer saw them), masks from those scores, learned state
resumed bit-exactly and kept out of the model, validation."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_shrink import GradualMagnitudePruning
from lightning_shrink.pruning.criteria import CRITERIA, check_criterion_options
from lightning_shrink.testing.distributed import run_multiprocess_script
from lightning_shrink.testing.models import TinyClassifier, cpu_trainer, random_classification_data

LR, SCORE_LR = 0.05, 0.5
PRUNED = ("net.0.weight", "net.2.weight")


class PlainSGD(TinyClassifier):
    """SGD without momentum: each step is ``p -= lr * grad``, for every group (scores included)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Recorder(pl.Callback):
    """The pruned weights and their final gradients at every optimizer step (before the step)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        named = dict(pl_module.named_parameters())
        self.steps.append({n: (named[n].detach().clone(), named[n].grad.detach().clone()) for n in PRUNED})


def _loader(n: int = 64) -> DataLoader:
    return DataLoader(random_classification_data(n), batch_size=8)


def _fit(criterion: str, options: dict[str, Any] | None = None, model=None, steps: int = 4, **kwargs: Any):
    """One-shot pruning to 50 % after ``steps`` optimizer steps (the last one), micro-batches of 2."""
    torch.manual_seed(0)
    model = model or PlainSGD()
    cb = GradualMagnitudePruning(
        0.5, start_step=steps, schedule="constant", criterion=criterion, criterion_options=options, **kwargs
    )
    recorder = Recorder()
    trainer = cpu_trainer(callbacks=[cb, recorder], max_steps=steps, accumulate_grad_batches=2)
    trainer.fit(model, _loader())
    return model, cb, recorder


def _lowest(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Reference keep-masks: prune the ``fraction`` of weights with the lowest scores (one threshold)."""
    flat = torch.cat([scores[n].reshape(-1) for n in PRUNED])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[: round(fraction * flat.numel())]] = True
    out, offset = {}, 0
    for n in PRUNED:
        size = scores[n].numel()
        out[n] = ~pruned[offset : offset + size].view_as(scores[n])
        offset += size
    return out


def _assert_masks(cb: GradualMagnitudePruning, expected: dict[str, torch.Tensor]) -> None:
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3)
    for n in PRUNED:
        assert torch.equal(cb.masks[n], expected[n]), n


def test_movement_scores_are_minus_lr_times_the_sum_of_w_grad_and_masks_keep_the_top():
    model, cb, recorder = _fit("movement", {"score_lr": SCORE_LR})
    assert len(recorder.steps) == 4  # 8 batches, accumulated in pairs
    scores = dict(zip(cb.plugin.criterion.names, cb.plugin.criterion.score_params, strict=True))
    for n in PRUNED:
        expected = -SCORE_LR * sum(w * g for w, g in (s[n] for s in recorder.steps))
        torch.testing.assert_close(scores[n].detach(), expected, rtol=1e-5, atol=1e-7)
    _assert_masks(cb, _lowest({n: s.detach() for n, s in scores.items()}, 0.5))
    # the scores are plugin tensors: not in the model, not in its state_dict
    assert set(model.state_dict()) == set(TinyClassifier().state_dict())
    assert not {id(s) for s in scores.values()} & {id(p) for p in model.parameters()}


def test_movement_ranks_rows_by_their_mean_score():
    _, cb, _ = _fit("movement", {"score_lr": SCORE_LR}, pattern="rows")
    crit = cb.plugin.criterion
    means = {
        n: s.detach().mean(dim=1, keepdim=True) for n, s in zip(crit.names, crit.score_params, strict=True)
    }
    rows = torch.cat([means[n].reshape(-1) for n in PRUNED])
    widths = torch.cat([torch.full((crit.params[i].shape[0],), crit.params[i].shape[1]) for i in range(2)])
    # the largest prefix of rows, lowest mean first, holding at most half of the weights
    order = torch.argsort(rows, stable=True)
    count = int((torch.cumsum(widths[order], 0) <= widths.sum() // 2).sum())
    pruned = set(order[:count].tolist())
    got = torch.cat([~cb.masks[n].all(dim=1) for n in PRUNED])
    assert set(got.nonzero().reshape(-1).tolist()) == pruned
    assert cb.sparsity == pytest.approx(0.5, abs=0.02)


def test_soft_movement_adds_the_sigmoid_regularizer_gradient():
    lam = 50.0
    _, cb, recorder = _fit("soft_movement", {"score_lr": SCORE_LR, "regularization": lam})
    crit = cb.plugin.criterion
    total = sum(s.numel() for s in crit.score_params)
    reference = {n: torch.zeros_like(recorder.steps[0][n][0]) for n in PRUNED}
    for step in recorder.steps:
        for n in PRUNED:
            w, g = step[n]
            sig = torch.sigmoid(reference[n])
            reference[n] = reference[n] - SCORE_LR * (w * g + lam / total * sig * (1 - sig))
    scores = dict(zip(crit.names, crit.score_params, strict=True))
    for n in PRUNED:
        torch.testing.assert_close(scores[n].detach(), reference[n], rtol=1e-5, atol=1e-7)
    _assert_masks(cb, _lowest(reference, 0.5))
    assert 0 < crit.metrics()["score_regularization"] < lam


def test_taylor_scores_are_platon_moving_averages_of_importance_and_uncertainty():
    beta1, beta2 = 0.6, 0.7
    _, cb, recorder = _fit("taylor", {"beta1": beta1, "beta2": beta2})
    crit = cb.plugin.criterion
    ibar = {n: torch.zeros_like(recorder.steps[0][n][0]) for n in PRUNED}
    ubar = {n: torch.zeros_like(recorder.steps[0][n][0]) for n in PRUNED}
    for step in recorder.steps:
        for n in PRUNED:
            w, g = step[n]
            importance = (w * g).abs()
            ibar[n] = beta1 * ibar[n] + (1 - beta1) * importance
            ubar[n] = beta2 * ubar[n] + (1 - beta2) * (importance - ibar[n]).abs()
    for i, n in enumerate(crit.names):
        torch.testing.assert_close(crit.importance[i], ibar[n], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(crit.uncertainty[i], ubar[n], rtol=1e-5, atol=1e-9)
    _assert_masks(cb, _lowest({n: ibar[n] * ubar[n] for n in PRUNED}, 0.5))


def test_magnitude_is_the_default_and_prunes_the_smallest_weights():
    assert GradualMagnitudePruning(0.5).config.criterion == "magnitude"
    model, cb, _ = _fit("magnitude")
    named = dict(model.named_parameters())
    # the pruned weights are zero now, and were the smallest when the masks were computed
    _assert_masks(cb, _lowest({n: named[n].detach().abs() for n in PRUNED}, 0.5))
    assert cb.plugin.criterion.state_dict() == {"criterion": "magnitude", "steps": 0}


# ---------------------------------------------------------------------------------------------- resume

RUN = dict(target_sparsity=0.8, start_step=2, end_step=0.875, frequency=3, scope="global")


def _resumable_fit(tmp_path, criterion: str, ckpt_path=None, save: bool = False):
    """3 epochs of 8 AdamW steps (the learned scores have Adam moments); updates at 2, 5, 8, ..."""
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.05)  # no dropout: the run is deterministic
    cb = GradualMagnitudePruning(**RUN, criterion=criterion, criterion_options=None)
    extra = (
        [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
        if save
        else []
    )
    trainer = cpu_trainer(callbacks=[cb, *extra], max_epochs=3, enable_checkpointing=save)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return model, cb, trainer


@pytest.mark.parametrize("criterion", ["movement", "taylor"])
def test_resume_mid_schedule_with_learned_scores_is_bit_exact(tmp_path, criterion):
    model_a, cb_a, _ = _resumable_fit(tmp_path, criterion, save=True)
    ckpt = tmp_path / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    state = saved["lightning_shrink"]["pruning"]
    assert state["last_update_step"] == 8 and state["criterion"]["criterion"] == criterion
    assert state["criterion"]["steps"] == 8
    # learned state lives in the plugin's checkpoint state, never among the model's weights
    assert set(saved["state_dict"]) == set(model_a.state_dict())
    model_b, cb_b, _ = _resumable_fit(tmp_path, criterion, ckpt_path=ckpt)
    assert cb_b.plugin.update_count == cb_a.plugin.update_count
    for (na, a), (nb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b), na
    for n, mask in cb_a.masks.items():
        assert torch.equal(mask, cb_b.masks[n]), n
    ca, cb_ = cb_a.plugin.criterion.state_dict(), cb_b.plugin.criterion.state_dict()
    assert ca["steps"] == cb_["steps"] == 24
    for key in ("scores", "importance", "uncertainty"):
        for n in ca.get(key, {}):
            assert torch.equal(ca[key][n], cb_[key][n]), (key, n)
    assert cb_b.sparsity == pytest.approx(0.8, abs=1e-3)


def test_resume_with_another_criterion_is_refused(tmp_path):
    _resumable_fit(tmp_path, "movement", save=True)
    torch.manual_seed(0)
    cb = GradualMagnitudePruning(**RUN, criterion="taylor")
    trainer = cpu_trainer(callbacks=[cb], max_epochs=3)
    with pytest.raises(ValueError, match="`criterion` was 'movement', is 'taylor'"):
        trainer.fit(
            TinyClassifier(optimizer="adamw", lr=0.05), _loader(), ckpt_path=tmp_path / "epoch=0.ckpt"
        )


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_criterion_and_bad_options_are_refused_at_construction():
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        GradualMagnitudePruning(0.5, criterion="fisher")
    with pytest.raises(TypeError, match="`criterion`"):
        GradualMagnitudePruning(0.5, criterion=None)
    with pytest.raises(ValueError, match=r"`criterion_options` \['beta1'\] unknown: criterion='movement'"):
        GradualMagnitudePruning(0.5, criterion="movement", criterion_options={"beta1": 0.9})
    with pytest.raises(ValueError, match="takes no options"):
        GradualMagnitudePruning(0.5, criterion_options={"score_lr": 0.1})
    with pytest.raises(ValueError, match=r"`criterion_options\['beta2'\]` must be a number in \(0, 1\)"):
        GradualMagnitudePruning(0.5, criterion="taylor", criterion_options={"beta2": 1.0})
    with pytest.raises(ValueError, match="score_lr"):
        GradualMagnitudePruning(0.5, criterion="movement", criterion_options={"score_lr": 0.0})
    with pytest.raises(TypeError, match="`criterion_options` must be a mapping"):
        GradualMagnitudePruning(0.5, criterion="taylor", criterion_options=[0.9])
    assert set(CRITERIA) == {"magnitude", "movement", "soft_movement", "taylor"}
    options = dict(check_criterion_options("X", "taylor", {"beta1": 0.5}))
    assert options == {"beta1": 0.5, "beta2": 0.95}
    config = GradualMagnitudePruning(0.5, criterion="soft_movement").config
    assert config.describe()["criterion_options"] == {"regularization": 1.0, "score_lr": None}


class NoOptimizer(TinyClassifier):
    def configure_optimizers(self) -> None:
        return None


def test_movement_without_an_optimizer_is_refused_before_the_first_step():
    cb = GradualMagnitudePruning(0.5, start_step=1, criterion="movement")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError, match="criterion='movement' learns its scores with the run's optimizer"
        ):
            cpu_trainer(callbacks=[cb], max_steps=2).fit(NoOptimizer(), _loader())


@pytest.mark.parametrize("criterion", ["movement", "taylor"])
def test_gradient_criteria_refuse_to_prune_before_the_first_gradient(criterion):
    cb = GradualMagnitudePruning(0.5, schedule="constant", start_step=0, criterion=criterion)
    with pytest.raises(ValueError, match="before any gradient: set `start_step` >= 1"):
        cpu_trainer(callbacks=[cb], max_steps=2).fit(PlainSGD(), _loader())


def test_score_lr_sets_the_scores_group_lr_and_weight_decay_is_zero():
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adamw", lr=0.01)
    cb = GradualMagnitudePruning(0.5, start_step=1, criterion="movement", criterion_options={"score_lr": 0.3})
    trainer = cpu_trainer(callbacks=[cb], max_steps=2)
    trainer.fit(model, _loader())
    group = trainer.optimizers[0].param_groups[-1]
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(s) for s in cb.plugin.criterion.score_params]


class AdamWChoosing(TinyClassifier):
    """AdamW with the given implementation arguments (``foreach=`` / ``fused=``), or torch's choice."""

    def __init__(self, **implementation: Any) -> None:
        super().__init__()
        self.implementation = implementation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, **self.implementation)


def _movement_scores(model: TinyClassifier) -> tuple[dict[str, Any], list[torch.Tensor]]:
    torch.manual_seed(0)
    cb = GradualMagnitudePruning(0.5, start_step=3, schedule="constant", criterion="movement")
    trainer = cpu_trainer(callbacks=[cb], max_steps=3)
    trainer.fit(model, _loader())
    scores = [s.detach().clone() for s in cb.plugin.criterion.score_params]
    return trainer.optimizers[0].param_groups[-1], scores


def test_movement_scores_use_the_fused_optimizer_step_unless_the_run_chose_an_implementation():
    # Off CUDA torch steps with its for-loop implementation unless told otherwise; the scores' group
    # (one float32 per pruned weight) takes the fused one, the same update in one kernel per tensor.
    torch.manual_seed(0)
    fused_group, fused_scores = _movement_scores(AdamWChoosing())
    assert fused_group["fused"] is True
    torch.manual_seed(0)
    loop_group, loop_scores = _movement_scores(AdamWChoosing(foreach=False))
    assert not loop_group["fused"] and loop_group["foreach"] is False  # the run's choice is kept
    for fused, loop in zip(fused_scores, loop_scores, strict=True):
        assert fused.abs().max() > 0
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    sgd_group, _ = _movement_scores(PlainSGD())  # SGD has a fused implementation too
    assert sgd_group["fused"] is True


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_learned_criteria_and_structured_patterns_give_identical_masks_on_every_rank(tmp_path):
    script = Path(__file__).parent / "scripts" / "pruning_criteria_ddp.py"
    run_multiprocess_script(script, tmp_path, "movement", "taylor", "structured", cwd=tmp_path)
    # Heads and neurons: rank 1 rescales its weights so that its own magnitudes rank the groups the
    # other way; both ranks still hold rank 0's masks, of whole heads.
    s0, s1 = (torch.load(tmp_path / f"structured-rank{r}.pt", weights_only=False) for r in range(2))
    assert s0["global_step"] == s1["global_step"] == 6
    assert s0["sparsity"] == s1["sparsity"] == pytest.approx([0.5, 0.5])
    assert set(s0["masks"]) == set(s1["masks"])
    for name, mask in s0["masks"].items():
        assert torch.equal(mask, s1["masks"][name]), name
    query = s0["masks"]["model.bert.encoder.layer.0.attention.self.query.weight"]
    assert int((~query).all(1).sum()) in (0, 8, 16, 24)  # whole 8-row heads
    for criterion, key in (("movement", "scores"), ("taylor", "importance")):
        r0, r1 = (torch.load(tmp_path / f"{criterion}-rank{r}.pt", weights_only=False) for r in range(2))
        assert (
            r0["global_step"] == r1["global_step"] == 8
        )  # 32 examples per rank: 4 batches, 2 steps an epoch
        assert r0["updates"] == r1["updates"] == 4  # steps 1, 3, 5, 6
        assert r0["criterion"]["steps"] == 8
        for n in r0["masks"]:
            assert torch.equal(r0["masks"][n], r1["masks"][n]), n
            # computed from DDP-averaged gradients: the scores agree too, not only rank 0's masks
            assert torch.equal(r0["criterion"][key][n], r1["criterion"][key][n]), n
        for n, w in r0["weights"].items():
            assert torch.equal(w, r1["weights"][n]), n
        assert r0["sparsity"] == pytest.approx(0.7, abs=1e-3)
        # on_after_backward of a step's last micro-batch sees gradients averaged by DDP; earlier ones
        # (under no_sync) see this rank's own
        for (last, g0), (_, g1) in zip(r0["grads"], r1["grads"], strict=True):
            assert torch.equal(g0, g1) == last


def test_criteria_other_than_magnitude_refuse_fsdp2_sharded_parameters():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = TinyClassifier()
        sharded = distribute_tensor(model.net[0].weight.detach(), mesh, [Shard(0)])
        model.net[0].weight = torch.nn.Parameter(sharded)
        for criterion in ("movement", "taylor"):
            plugin = GradualMagnitudePruning(0.5, criterion=criterion, modules="net.0").plugin
            plugin.shrink_configure_model(model, "fit")
            with pytest.raises(ValueError, match=f"criterion='{criterion}' is not supported on FSDP2"):
                plugin.shrink_optimizer_param_groups(None, model)
        plugin = GradualMagnitudePruning(0.5, modules="net.0").plugin
        plugin.shrink_configure_model(model, "fit")
        assert plugin.shrink_optimizer_param_groups(None, model) is None  # magnitude: as before
    finally:
        dist.destroy_process_group()
