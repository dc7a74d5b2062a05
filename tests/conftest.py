import os

import pytest

# The project dogfoods its own pytest plugin.
pytest_plugins = ["lightning_shrink.testing.plugin"]

# Entry-point plugins installed in the environment must not leak into the tests; tests that
# exercise autoload turn it on explicitly.
os.environ.setdefault("LIGHTNING_SHRINK_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(autouse=True)
def _quiet_threads():
    import torch

    torch.set_num_threads(1)
    yield
