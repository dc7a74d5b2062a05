"""QuantizationAwareTraining in two processes on CPU: DDP with static observers synchronized
across ranks, and FSDP2 on a model built and sharded in ``configure_model``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_shrink.testing.distributed import run_multiprocess_script

SCRIPTS = Path(__file__).parent / "scripts"

# The converted model against the fake-quantized one: equal up to float rounding.
CONVERSION_TOLERANCE = 1e-5


@pytest.mark.slow
def test_static_observers_are_synchronized_across_ddp_ranks(tmp_path):
    run_multiprocess_script(SCRIPTS / "quantization_ddp.py", tmp_path, cwd=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["global_step"] == 4 and r["prepared"] == 17 and r["synchronized"] == [True] * 4
        assert all(torch.isfinite(v) for v in r["ranges"].values())
    # Observers never frozen, each rank on other batches: the ranges are identical anyway (one
    # all-reduce of min/max per batch), and so are the weights and both models' outputs.
    assert len(r0["ranges"]) == 2 * 14  # every Linear of the tiny BERT
    for key, value in r0["ranges"].items():
        assert torch.equal(value, r1["ranges"][key]), key
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    assert torch.equal(r0["fake"], r1["fake"]) and torch.equal(r0["converted"], r1["converted"])
    assert float((r0["converted"] - r0["fake"]).abs().max()) <= CONVERSION_TOLERANCE


@pytest.mark.slow
def test_qat_on_a_model_built_and_sharded_in_configure_model_under_fsdp2(tmp_path):
    run_multiprocess_script(SCRIPTS / "quantization_fsdp2.py", tmp_path, cwd=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    # Built and sharded in configure_model, then prepared: 36 output rows split 18/18, all 3 Linear
    # layers fake-quantized.
    assert r0["sharded"] and r0["local_rows"] == r1["local_rows"] == 18
    assert r0["prepared"] == r1["prepared"] == 3
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    for r in (r0, r1):
        # The sharded model computes exactly what an unsharded copy with the same settings computes,
        # and that is fake-quantized (not the float output).
        torch.testing.assert_close(r["sharded_out"], r["reference_out"], atol=1e-6, rtol=0)
        assert not torch.allclose(r["sharded_out"], r["float_out"], atol=1e-6)
        torch.testing.assert_close(r["converted_out"], r["reference_out"], atol=CONVERSION_TOLERANCE, rtol=0)
