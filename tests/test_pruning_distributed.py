"""Pruning across processes: identical masks on DDP ranks (one callback, and two callbacks with a
bit-exact resume; gradient criteria on the frozen base weights of a LoRA model, equal to one process);
exact global thresholds over FSDP2 shards; models built in ``configure_model``.

Each test runs real ``Trainer.fit`` calls with ``devices=2`` on CPU in a subprocess (Lightning launches
the second rank by re-running the script); every rank writes what it saw to a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_shrink.testing.distributed import run_multiprocess_script

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "scripts"


def _ranks(tmp_path: Path, prefix: str) -> list[dict]:
    return [torch.load(tmp_path / f"{prefix}rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """One launch of pruning_ddp.py for both DDP tests below (their fits run one after the other)."""
    out = tmp_path_factory.mktemp("pruning-ddp")
    run_multiprocess_script(SCRIPTS / "pruning_ddp.py", out, "one", "two", "lora", cwd=out)
    return out


def test_ddp_ranks_compute_identical_masks_on_a_model_built_in_configure_model(ddp_runs):
    tmp_path = ddp_runs
    r0, r1 = _ranks(tmp_path, "one-")
    assert r0["global_step"] == r1["global_step"] == 8
    assert r0["updates"] == r1["updates"] == 4  # steps 0, 2, 4, 6
    assert set(r0["masks"]) == {"net.0.weight", "net.2.weight"}
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name]), name
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    assert r0["sparsity"] == pytest.approx(0.7, abs=1e-3)
    for name, mask in r0["masks"].items():
        assert not r0["weights"][name][~mask].any()


def test_ddp_two_pruning_callbacks_reach_their_targets_and_resume_bit_exactly(ddp_runs):
    tmp_path = ddp_runs
    ckpt = tmp_path / "ckpt" / "epoch=0.ckpt"  # step 3, where the second run resumed: the MLP is halfway
    state = torch.load(ckpt, weights_only=False)["lightning_shrink"]
    assert state["pruning"]["last_update_step"] == 3 and state["pruning-2"]["last_update_step"] == 2
    full, resumed = _ranks(tmp_path, "two-"), _ranks(tmp_path, "resumed-")
    for r in (*full, *resumed):
        assert r["global_step"] == 6 and r["names"] == ["pruning", "pruning-2"]
        assert r["sparsity"][0] == pytest.approx(0.5) and r["sparsity"][1] == pytest.approx(0.8, abs=1e-3)
        assert r["metrics"]["pruning/sparsity"] == pytest.approx(0.5)
        assert r["metrics"]["pruning-2/sparsity"] == pytest.approx(0.8, abs=1e-3)
        reached = {t for t, m, v, _ in r["rows"] if m == "target reached" and v is True}
        assert reached == {"pruning", "pruning-2"}
    assert not set(full[0]["masks"][0]) & set(full[0]["masks"][1])
    for r in (full[1], *resumed):  # the same masks and weights on both ranks, resumed or not
        assert r["updates"] == full[0]["updates"]
        for mine, theirs in zip(r["masks"], full[0]["masks"], strict=True):
            assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
        for name, w in full[0]["weights"].items():
            assert torch.equal(w, r["weights"][name]), name


def test_ddp_gradient_criteria_on_lora_base_weights_equal_one_process(ddp_runs):
    """movement + taylor pruning of a LoRA Llama's frozen base weights, with merged-weight QAT and
    distillation, under DDP: the base weights' gradients are averaged over the ranks, so both ranks and
    the single-process run choose the same masks; the adapters stay dense and train alike."""
    from test_large_models import compressed_fit

    r0, r1 = _ranks(ddp_runs, "lora-")
    trainer, model, _, pruning = compressed_fit(lora=True, gradients=True)
    masks = {n: m for p in pruning for n, m in p.masks.items()}
    assert len(masks) == 6 and all(n.endswith(".base_layer.weight") for n in masks)
    for r in (r0, r1):
        assert r["sparsity"] == [pytest.approx(0.5), pytest.approx(0.5)]
        assert set(r["masks"]) == set(masks)
        for name, mask in masks.items():
            assert torch.equal(r["masks"][name], mask), name
        # the base weights are frozen again: only the adapters are trainable
        assert {n for n, trainable in r["requires_grad"].items() if trainable} == {
            n for n in r["weights"] if "lora_" in n
        }
    # each rank logs the distillation loss of its own half of the last batch
    kl = float(trainer.callback_metrics["distillation/kl"])
    assert (r0["kl"] + r1["kl"]) / 2 == pytest.approx(kl, rel=1e-4)
    for name, p in model.model.named_parameters():
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        torch.testing.assert_close(r0["weights"][name], p.detach(), atol=2e-6, rtol=1e-4)
        if "lora_" in name:
            assert bool((p != 0).all()), name  # adapters dense
    merged = model.model.merge_and_unload()
    for name, mask in masks.items():
        layer = name.removeprefix("model.base_model.model.").removesuffix(".base_layer.weight")
        assert torch.equal(merged.get_submodule(layer).weight != 0, mask), name


@pytest.mark.parametrize(
    ("pattern", "scope", "build"),
    [("unstructured", "global", "init"), ("rows", "layer", "configure_model")],
)
def test_fsdp2_sharded_thresholds_are_exact_and_a_resume_is_bit_exact(tmp_path, pattern, scope, build):
    run_multiprocess_script(SCRIPTS / "pruning_fsdp2.py", tmp_path, pattern, scope, build, cwd=tmp_path)
    r0, r1 = _ranks(tmp_path, "")
    # parameters really were sharded (36 rows split 18/18 on dim 0)
    assert r0["local_shapes"][0] == (18, 16) and r1["local_shapes"][0] == (18, 16)
    # every update: the sharded selection equals the single-process one on the gathered weights
    assert len(r0["checks"]) == 4 and all(r0["checks"]) and all(r1["checks"])
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
        assert not r0["weights"][name][~mask].any(), name
    if scope == "global":
        assert r0["layer_sparsity"]["net.0.weight"] == pytest.approx(0.5, abs=1e-3)
        assert r0["layer_sparsity"]["net.2.weight"] == pytest.approx(0.75, abs=1e-3)
    else:
        assert all((m.all(1) | ~m.any(1)).all() for m in r0["masks"].values())
        assert int((~r0["masks"]["net.2.weight"]).all(1).sum()) == 27  # 75% of 36 rows
    if build == "configure_model":
        # resumed from the sharded checkpoint after epoch 0 (step 4, mid-schedule): bit-exact
        for r in (r0, r1):
            assert r["resumed_updates"] == r["updates"] == 4
            for name, w in r0["weights"].items():
                assert torch.equal(r["resumed_weights"][name], w), name
