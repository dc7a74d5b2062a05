"""The opt-in pytest plugin, exercised the way a team uses it: in an inner pytest run."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_fixtures_work_in_a_team_test_suite(pytester: pytest.Pytester):
    pytester.makeconftest('pytest_plugins = ["lightning_shrink.testing.plugin"]')
    pytester.makepyfile(
        """
        import torch
        from lightning_shrink import hookimpl

        class FreezeHead:
            @hookimpl
            def shrink_before_optimizer_step(self, pl_module):
                pl_module.classifier.weight.grad.zero_()

        def test_head_stays_frozen(shrink_pluginmanager, shrink_recorder, cpu_trainer, tiny_module,
                                   tiny_dataloader):
            shrink_pluginmanager.register(FreezeHead())
            before = tiny_module.classifier.weight.detach().clone()
            cpu_trainer(max_steps=3).fit(tiny_module, tiny_dataloader)
            assert shrink_recorder.count("shrink_before_optimizer_step") == 3
            assert torch.equal(tiny_module.classifier.weight, before)

        def test_recorder_sees_a_plugin_that_is_not_called(shrink_pluginmanager, shrink_recorder, cpu_trainer,
                                                           tiny_module, tiny_dataloader):
            cpu_trainer(max_steps=1).fit(tiny_module, tiny_dataloader)
            shrink_recorder.assert_called("shrink_fit_start", times=2)  # called once: this must fail
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*hook 'shrink_fit_start' called 1 time(s), expected 2 time(s)*"])
