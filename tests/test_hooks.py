"""One test per hook that the bridge tests do not already cover, plus the meta-tests: every hook
is documented in docs/hooks.md and has a test of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_shrink import ReportRow, ShrinkCallback, export, get_plugin_manager, hookimpl, load, report
from lightning_shrink.testing.models import (
    TinyTransformerClassifier,
    cpu_trainer,
    random_classification_data,
    tiny_gpt2,
    token_dataloader,
)

ROOT = Path(__file__).resolve().parent.parent


def hook_names() -> list[str]:
    return get_plugin_manager(autoload=False).hook_names()


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented(name):
    text = (ROOT / "docs" / "hooks.md").read_text()
    section = re.search(rf"^### `?{name}`?\s*$(.*?)(?=^### |\Z)", text, re.M | re.S)
    assert section, f"docs/hooks.md has no '### {name}' section"
    assert len(section.group(1).split()) >= 15, f"the section for {name} in docs/hooks.md is too thin"


def hooks_named_by(test_name: str, hooks: list[str]) -> set[str]:
    """The hooks a test's name names, longest names first (``test_shrink_load_state_x`` names
    ``shrink_load_state``, not ``shrink_load``)."""
    taken: list[tuple[int, int]] = []
    named = set()
    for hook in sorted(hooks, key=len, reverse=True):
        for match in re.finditer(rf"(?<![a-z]){hook}(?![a-z])", test_name):
            span = match.span()
            if not any(a <= span[0] < b or a < span[1] <= b for a, b in taken):
                taken.append(span)
                named.add(hook)
    return named


@pytest.mark.after_all
@pytest.mark.parametrize("name", hook_names())
def test_every_hook_has_a_test(name):
    """A test is named after every hook, and (when it ran in this session) really called it."""
    from conftest import HOOK_CALLS

    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    tests = re.findall(r"^\s*def (test_\w+)\(", sources, re.M)
    named = [t for t in tests if name in hooks_named_by(t, hook_names())]
    assert named, f"no test function named after {name}"
    ran = [t for t in named if t in HOOK_CALLS]
    if not ran:
        pytest.skip(f"the tests named after {name} did not run in this session: {named}")
    assert any(name in HOOK_CALLS[t] for t in ran), f"none of {ran} called {name}"


def test_hook_reference_is_generated_from_the_hookspecs():
    from lightning_shrink._hookdocs import render

    assert (ROOT / "docs" / "hooks.md").read_text() == render(), (
        "docs/hooks.md is out of date: python -m lightning_shrink._hookdocs > docs/hooks.md"
    )


def test_shrink_fit_start_sees_optimizers_and_can_refuse_the_run(
    cpu_trainer, tiny_module, tiny_dataloader, shrink_pluginmanager
):
    steps = []

    class Refuse:
        @hookimpl
        def shrink_fit_start(self, trainer):
            assert len(trainer.optimizers) == 1
            raise RuntimeError("refused: this plugin cannot work with SGD")

    shrink_pluginmanager.register(Refuse())
    original = tiny_module.training_step
    tiny_module.training_step = lambda *a: steps.append(1) or original(*a)
    with pytest.raises(RuntimeError, match="refused"):
        cpu_trainer(max_steps=2).fit(tiny_module, tiny_dataloader)
    assert steps == []  # failed before the first step


def test_shrink_train_batch_start_can_redact_a_batch_in_place(shrink_pluginmanager):
    seen = []

    class Redact:
        @hookimpl
        def shrink_train_batch_start(self, batch):
            batch["input_ids"][:, 0] = 1

    class Spy(TinyTransformerClassifier):
        def training_step(self, batch, batch_idx):
            seen.append(batch["input_ids"][:, 0].clone())
            return super().training_step(batch, batch_idx)

    shrink_pluginmanager.register(Redact())
    trainer = cpu_trainer(callbacks=[ShrinkCallback(pluginmanager=shrink_pluginmanager)], max_steps=3)
    trainer.fit(Spy(tiny_gpt2), token_dataloader())
    assert len(seen) == 3 and all(bool((s == 1).all()) for s in seen)


def test_shrink_before_optimizer_step_sees_and_can_change_gradients(
    cpu_trainer, tiny_module, tiny_dataloader, shrink_pluginmanager
):
    norms = []

    class FreezeClassifier:
        @hookimpl
        def shrink_before_optimizer_step(self, pl_module, optimizer):
            grad = pl_module.classifier.weight.grad
            norms.append(float(grad.norm()))
            for p in pl_module.classifier.parameters():
                p.grad.zero_()
            # The optimizer given is the one about to step.
            assert any(p is pl_module.classifier.weight for g in optimizer.param_groups for p in g["params"])

    shrink_pluginmanager.register(FreezeClassifier())
    tiny_module.configure_optimizers = lambda: torch.optim.SGD(tiny_module.parameters(), lr=0.1)
    before = tiny_module.classifier.weight.detach().clone()
    first = tiny_module.net[0].weight.detach().clone()
    cpu_trainer(max_steps=3).fit(tiny_module, tiny_dataloader)
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert torch.equal(tiny_module.classifier.weight, before)
    assert not torch.equal(tiny_module.net[0].weight, first)


def test_shrink_fit_end_and_shrink_teardown(cpu_trainer, tiny_module, tiny_dataloader, shrink_recorder):
    cpu_trainer(max_steps=1).fit(tiny_module, tiny_dataloader)
    (end,) = shrink_recorder.assert_called("shrink_fit_end", times=1)
    assert end.pl_module is tiny_module
    (teardown,) = shrink_recorder.assert_called("shrink_teardown", times=1)
    assert teardown.stage == "fit"
    assert shrink_recorder.names().index("shrink_fit_end") < shrink_recorder.names().index("shrink_teardown")


def test_shrink_teardown_runs_after_an_exception(
    cpu_trainer, tiny_module, tiny_dataloader, shrink_recorder, shrink_pluginmanager
):
    class Boom:
        @hookimpl
        def shrink_after_optimizer_step(self):
            raise RuntimeError("boom")

    shrink_pluginmanager.register(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        cpu_trainer(max_steps=3).fit(tiny_module, tiny_dataloader)
    shrink_recorder.assert_called("shrink_teardown", times=1)
    shrink_recorder.assert_called("shrink_fit_end", times=0)
    assert "training_step" not in tiny_module.__dict__


def test_shrink_report_rows_counts_tied_weights_once(cpu_trainer, shrink_pluginmanager):
    class Rows:
        @hookimpl
        def shrink_report_rows(self, trainer, model):
            return [ReportRow("mine", "steps", trainer.global_step if trainer else None)]

    shrink_pluginmanager.register(Rows(), "mine")
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as transformers ties embeddings and LM heads
    with torch.no_grad():
        model[0].weight[:5] = 0
    bare = report(model=model, pluginmanager=shrink_pluginmanager)
    assert bare.select("model", "parameters")[0].value == 40
    assert bare.select("model", "nonzero parameters")[0].value == 20
    assert bare.select("model", "density")[0].value == 0.5

    trainer = cpu_trainer(max_steps=2)
    module = TinyTransformerClassifier(tiny_gpt2)
    trainer.fit(module, token_dataloader())
    rows = report(trainer)
    assert rows.rows[0].technique == "model"  # the essential plugin's rows come first
    assert rows.select("mine", "steps")[0].value == 2
    assert "mine" in rows.to_table() and "density" in str(rows)


def test_duplicate_metric_names_from_two_plugins_are_an_error(cpu_trainer, tiny_module, shrink_pluginmanager):
    class A:
        @hookimpl
        def shrink_metrics(self):
            return {"x": 1.0}

    class B:
        @hookimpl
        def shrink_metrics(self):
            return {"x": 2.0}

    shrink_pluginmanager.register(A())
    shrink_pluginmanager.register(B())
    with pytest.raises(ValueError, match="two plugins returned 'x' from shrink_metrics"):
        cpu_trainer(max_steps=1).fit(tiny_module, DataLoader(random_classification_data(8), batch_size=8))


def test_shrink_export_and_shrink_load_let_a_plugin_encode_and_decode_tensors(tmp_path, shrink_pluginmanager):
    class Negate:
        """Stores every float tensor negated; decodes it back on load."""

        @hookimpl
        def shrink_export(self, tensors, metadata):
            metadata["negate"] = sorted(k for k, v in tensors.items() if v.is_floating_point())
            for key in metadata["negate"]:
                tensors[key] = -tensors[key]

        @hookimpl
        def shrink_load(self, tensors, metadata):
            for key in metadata.get("negate", []):
                tensors[key] = -tensors[key]

    shrink_pluginmanager.register(Negate(), "negate")
    model = nn.Linear(3, 2)
    out = export(model, tmp_path / "m", pluginmanager=shrink_pluginmanager)
    from safetensors.torch import load_file

    raw = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(raw["weight"], -model.weight.detach())
    loaded = load(out, model=nn.Linear(3, 2), pluginmanager=shrink_pluginmanager)
    torch.testing.assert_close(loaded.weight, model.weight)
