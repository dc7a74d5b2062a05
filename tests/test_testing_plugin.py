"""The opt-in pytest plugin, exercised the way a team uses it: in an inner pytest run, with the example
of docs/testing.md as written, and its recorder on the hooks of a real fit."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from lightning_shrink import hookimpl

pytest_plugins = ["pytester"]

TESTING_MD = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def _documented_example() -> str:
    """The ```python block of docs/testing.md that defines a test."""
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", TESTING_MD.read_text(), re.S | re.M)
    (example,) = [b for b in blocks if "def test_" in b]
    return example


def test_fixtures_work_in_a_team_test_suite(pytester: pytest.Pytester):
    pytester.makeconftest('pytest_plugins = ["lightning_shrink.testing.plugin"]')
    pytester.makepyfile(test_documented=_documented_example())
    pytester.makepyfile(
        test_failing=textwrap.dedent(
            """
            def test_recorder_sees_a_plugin_that_is_not_called(shrink_recorder, cpu_trainer, tiny_module,
                                                               tiny_dataloader):
                cpu_trainer(max_steps=1).fit(tiny_module, tiny_dataloader)
                shrink_recorder.assert_called("shrink_fit_start", times=2)  # called once: this must fail
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*hook 'shrink_fit_start' called 1 time(s), expected 2 time(s)*"])


class EveryNewHook:
    """Implements the hooks of the foundation's second version, recording nothing itself."""

    @hookimpl
    def shrink_plugin_registered(self, plugin_name):
        pass

    @hookimpl
    def shrink_configure_model(self, pl_module, stage):
        pass

    @hookimpl
    def shrink_optimizer_param_groups(self):
        return None

    @hookimpl
    def shrink_train_epoch_start(self):
        pass

    @hookimpl
    def shrink_after_backward(self):
        pass

    @hookimpl
    def shrink_train_epoch_end(self):
        pass

    @hookimpl
    def shrink_save_checkpoint(self, checkpoint):
        checkpoint["every_new_hook"] = True

    @hookimpl
    def shrink_load_checkpoint(self, checkpoint):
        assert checkpoint["every_new_hook"]


def test_recorder_sees_every_hook_of_a_fit_and_a_resume(
    shrink_pluginmanager, shrink_recorder, cpu_trainer, tiny_module, tiny_dataloader, tmp_path
):
    shrink_pluginmanager.register(EveryNewHook(), name="every-new-hook")
    registered = shrink_recorder.assert_called("shrink_plugin_registered")
    assert "every-new-hook" in [call.plugin_name for call in registered]

    # 8 batches an epoch, 2 per optimizer step: 4 steps an epoch; the 5th step is in a second epoch,
    # which max_steps ends early (its end hook still runs).
    trainer = cpu_trainer(max_steps=5, max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(tiny_module, tiny_dataloader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert shrink_recorder.count("shrink_configure_model") == 1
    assert shrink_recorder.count("shrink_optimizer_param_groups") == 1
    assert shrink_recorder.count("shrink_train_epoch_start") == 2
    assert shrink_recorder.count("shrink_train_epoch_end") == 2
    assert shrink_recorder.count("shrink_after_backward") == 10  # every micro-batch
    assert shrink_recorder.count("shrink_before_optimizer_step") == 5
    shrink_recorder.assert_called("shrink_save_checkpoint", times=1)

    shrink_recorder.clear()
    cpu_trainer(max_steps=6, max_epochs=3, accumulate_grad_batches=2).fit(
        tiny_module, tiny_dataloader, ckpt_path=tmp_path / "run.ckpt"
    )
    order = [n for n in shrink_recorder.names() if n in ("shrink_load_checkpoint", "shrink_load_state")]
    assert order == ["shrink_load_checkpoint", "shrink_load_state"]
    assert shrink_recorder.count("shrink_before_optimizer_step") == 1  # step 6 only


def test_recorder_refuses_names_that_are_not_hooks(shrink_recorder):
    with pytest.raises(
        ValueError, match="'shrink_configure_modle' \\(did you mean 'shrink_configure_model'\\?\\)"
    ):
        shrink_recorder.count("shrink_configure_modle")
    with pytest.raises(ValueError, match="not a hook"):
        shrink_recorder.getcalls("shrink_setup on_fit_start")
    assert shrink_recorder.getcalls("shrink_setup shrink_fit_start") == []
