"""The bridge under real multi-process strategies on CPU (gloo): DDP and FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_shrink.testing.distributed import run_multiprocess_script

SCRIPT = Path(__file__).parent / "scripts" / "bridge_distributed.py"


def run_two_ranks(strategy: str, tmp_path: Path) -> list[dict]:
    run_multiprocess_script(SCRIPT, strategy, tmp_path, cwd=tmp_path)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def expected_weights() -> dict[str, torch.Tensor]:
    """One SGD step on the rank-averaged term ``C * mean(rank+1) * sum(head(layer(1)) ** 2)``."""
    layer = torch.nn.Linear(4, 3, bias=False)
    head = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10)
        head.weight.copy_(torch.eye(3))
    c, lr = 0.05 * (1 + 2) / 2, 0.1
    term = c * (head(layer(torch.ones(1, 4))) ** 2).sum()
    g_layer, g_head = torch.autograd.grad(term, [layer.weight, head.weight])
    return {"layer.weight": layer.weight - lr * g_layer, "head.weight": head.weight - lr * g_head}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_shrink_training_loss_under_two_processes(strategy, tmp_path):
    ranks = run_two_ranks(strategy, tmp_path)
    expected = expected_weights()
    for result in ranks:
        assert result["global_step"] == 1
        assert result["before_steps"] == result["after_steps"] == 1
        assert result["calls"] == ["setup:fit", "fit_start", "fit_end"]
        assert "rank/term" in result["logged"] and "shrink/task_loss" in result["logged"]
        for name, value in expected.items():
            torch.testing.assert_close(torch.tensor(result["weights"][name]), value.detach())
