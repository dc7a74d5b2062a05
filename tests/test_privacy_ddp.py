"""DifferentialPrivacy under real DDP (``devices=2`` on CPU, one subprocess run of four fits): a model
built in ``configure_model`` clipped by the ghost engine, Opacus' hooks with noise, and the refusals of
a strategy's own DDP communication hook and of FSDP2 (``ModelParallelStrategy``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant
from privacy_reference import per_example_reference

from lightning_shrink.testing.distributed import run_multiprocess_script
from lightning_shrink.testing.models import TinyClassifier

N, BATCH, WORLD = 128, 8, 2  # sample rate 8 * 2 / 128 = 1/8

SCRIPT = textwrap.dedent(
    """
    import copy, sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.utils.data import DataLoader
    from lightning_shrink import DifferentialPrivacy, ShrinkCallback, hookimpl
    from lightning_shrink.privacy import PrivacyError
    from lightning_shrink.testing.models import (
        ShardedTinyClassifier, TinyClassifier, random_classification_data,
    )

    out, N, BATCH = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class BuiltInConfigureModel(TinyClassifier):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.net = None

        def configure_model(self):
            if self.net is None:
                self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
                self.classifier = nn.Linear(32, 2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder:
        def __init__(self):
            self.batches, self.grads, self.optimizer, self.initial = [], [], [], None

        @hookimpl
        def shrink_fit_start(self, pl_module):
            self.initial = copy.deepcopy(pl_module.state_dict())

        @hookimpl
        def shrink_train_batch_start(self, batch):
            self.batches.append([t.clone() for t in batch])

        @hookimpl(trylast=True)
        def shrink_before_optimizer_step(self, pl_module, optimizer):
            self.optimizer = [c.__name__ for c in type(optimizer).__mro__]
            self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

    def run(noise, steps, mode, model, strategy="ddp"):
        pl.seed_everything(0)
        recorder = Recorder()
        dp = DifferentialPrivacy(noise_multiplier=noise, max_grad_norm=0.1, delta=1e-3,
                                 accountant="rdp", grad_sample_mode=mode)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[dp, ShrinkCallback(plugins=[recorder])])
        data = DataLoader(random_classification_data(N), batch_size=BATCH, shuffle=True)
        try:
            trainer.fit(model, data)
        except PrivacyError as exc:
            return dict(rank=trainer.global_rank, refused=str(exc))
        return dict(
            rank=trainer.global_rank, initial=recorder.initial, final=model.state_dict(),
            batches=recorder.batches, grads=recorder.grads, epsilon=dp.epsilon, steps=dp.plugin.steps,
            global_step=trainer.global_step, sample_rate=dp.plugin.sample_rate,
            sampler=type(trainer.train_dataloader.batch_sampler.batch_sampler).__name__,
            optimizer=recorder.optimizer,
        )

    results = [
        run(0.0, 1, "ghost", BuiltInConfigureModel()),
        run(1.0, 3, "hooks", TinyClassifier()),
        run(1.0, 1, "auto", TinyClassifier(), DDPStrategy(ddp_comm_hook=default_hooks.allreduce_hook)),
        run(1.0, 1, "auto", ShardedTinyClassifier(),
            ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)),
    ]
    torch.save(results, f"{out}/rank{results[0]['rank']}.pt")
    """
)


def _clipped_sum(state: dict, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    model = TinyClassifier()
    model.load_state_dict(state)
    return per_example_reference(model, x, y, clip)[1]


@pytest.mark.slow
def test_ddp_two_ranks_poisson_sampling_clipping_noise_and_accounting(tmp_path: Path) -> None:
    script = tmp_path / "privacy_ddp.py"
    script.write_text(SCRIPT)
    run_multiprocess_script(script, tmp_path, N, BATCH)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # --- fit 1: a model built in configure_model, noise 0, one step, ghost engine: the all-reduced
    # gradient is the clipped sum over both ranks' Poisson batches divided by the expected global batch size.
    first = [r[0] for r in ranks]
    assert all("DistributedDPOptimizer" in r["optimizer"] for r in first)
    assert all(r["sampler"] == "DistributedPoissonSampler" for r in first)
    assert all(r["sample_rate"] == BATCH * WORLD / N for r in first)
    x = torch.cat([r["batches"][0][0] for r in first])
    y = torch.cat([r["batches"][0][1] for r in first])
    assert len(x) > 0
    reference = _clipped_sum(first[0]["initial"], x, y, clip=0.1)
    for r in first:
        for name, value in reference.items():
            torch.testing.assert_close(r["grads"][0][name], value / (BATCH * WORLD), rtol=1e-4, atol=1e-7)

    # --- fit 2: noise 1, three steps, Opacus hooks: ranks draw different batches, end with identical
    # weights (noise drawn on rank 0, then all-reduced), and spend what Opacus' accountant says.
    second = [r[1] for r in ranks]
    sizes = [[len(b[1]) for b in r["batches"]] for r in second]
    assert sizes[0] != sizes[1] or not torch.equal(second[0]["batches"][0][0], second[1]["batches"][0][0])
    for name, value in second[0]["final"].items():
        assert torch.equal(value, second[1]["final"][name]), name
        assert not torch.equal(value, second[0]["initial"][name]), name
    accountant = create_accountant("rdp")
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=BATCH * WORLD / N)
    for r in second:
        assert r["steps"] == r["global_step"] == 3
        assert r["epsilon"] == accountant.get_epsilon(delta=1e-3)

    # --- fits 3 and 4: refused on every rank before the first step, saying why.
    for r in ranks:
        assert "registers its own DDP communication hook ('allreduce_hook'" in r[2]["refused"]
        assert "DP-SGD replaces DDP's all-reduce" in r[2]["refused"]
        assert (
            "ModelParallelStrategy (FSDP2) is not supported: Opacus 1.6 supports FSDP2 only through"
            in (r[3]["refused"])
        )
