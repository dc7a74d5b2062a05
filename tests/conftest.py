import os
import re

import pytest

# The project dogfoods its own pytest plugin.
pytest_plugins = ["lightning_shrink.testing.plugin"]

# Entry-point plugins installed in the environment must not leak into the tests; tests that
# exercise autoload turn it on explicitly.
os.environ.setdefault("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", "1")

#: The hooks called during each test function of this process, by the test function's name: every
#: plugin manager created while a test runs records its hook calls here. The meta-test
#: ``test_every_hook_has_a_test`` checks that a test named after each hook really called it.
HOOK_CALLS: dict[str, set[str]] = {}


@pytest.fixture(autouse=True)
def _quiet_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _record_hook_calls(request, monkeypatch):
    from lightning_shrink.manager import ShrinkPluginManager

    called = HOOK_CALLS.setdefault(request.function.__name__, set())
    original = ShrinkPluginManager.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_hookcall_monitoring(lambda name, impls, kwargs: called.add(name), lambda *a: None)

    monkeypatch.setattr(ShrinkPluginManager, "__init__", __init__)
    yield


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items):
    # The meta-tests read what the other tests recorded: run them last.
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)
    # Under pytest-xdist (``--dist loadgroup``), the tests named after a hook and the meta-test that
    # reads the hooks they called (HOOK_CALLS, per process) run in one worker, in this order.
    from lightning_shrink import get_plugin_manager

    hooks = [
        re.compile(rf"(?<![a-z]){name}(?![a-z])") for name in get_plugin_manager(autoload=False).hook_names()
    ]
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.get_closest_marker("after_all") is not None or any(h.search(name) for h in hooks):
            item.add_marker(pytest.mark.xdist_group("hooks"))
