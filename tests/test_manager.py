"""The plugin manager: registration, ordering, blocking, autoload, tracing and errors."""

from __future__ import annotations

import re
import sys
import textwrap
from importlib.metadata import Distribution
from pathlib import Path

import pytest

from lightning_shrink import PluginError, ShrinkPluginManager, get_plugin_manager, hookimpl
from lightning_shrink.manager import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, ENV_TRACE


def make_distribution(tmp_path: Path, name: str, module_source: str, entry_name: str | None = None) -> Path:
    """Write an importable module plus a ``.dist-info`` declaring it under ``lightning_shrink``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    module = f"{name}_plugin"
    (site / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[lightning_shrink]\n{entry_name or name} = {module}\n")
    return site


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install fake distributions on sys.path for one test."""

    def install(name: str, source: str, entry_name: str | None = None) -> None:
        site = make_distribution(tmp_path, name, source, entry_name)
        monkeypatch.syspath_prepend(str(site))

    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    yield install
    for mod in [m for m in sys.modules if m.endswith("_plugin")]:
        del sys.modules[mod]


GOOD = """
from lightning_shrink import hookimpl

@hookimpl
def shrink_metrics():
    return {"good/value": 1.0}
"""


def test_builtins_registered_and_core_is_essential():
    pm = get_plugin_manager(autoload=False)
    assert pm.has_plugin("core")
    with pytest.raises(PluginError, match="'core' is essential"):
        ShrinkPluginManager(block_plugins=["core"])


def test_entry_point_plugin_is_loaded_with_its_distribution(installed):
    installed("goodplug", GOOD)
    pm = get_plugin_manager()
    assert pm.has_plugin("goodplug")
    assert pm.distribution_of("goodplug") == "goodplug 1.2.3"
    assert pm.hook.shrink_metrics(trainer=None, pl_module=None) == [{"good/value": 1.0}]


def test_autoload_off_by_environment(installed, monkeypatch):
    installed("goodplug", GOOD)
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert not get_plugin_manager().has_plugin("goodplug")
    # An explicit argument wins over the environment.
    assert get_plugin_manager(autoload=True).has_plugin("goodplug")


def test_blocking_by_name_and_by_environment(installed, monkeypatch):
    installed("goodplug", GOOD)
    pm = get_plugin_manager(block_plugins=["goodplug"])
    assert not pm.has_plugin("goodplug") and pm.is_blocked("goodplug")
    monkeypatch.setenv(ENV_BLOCK, "goodplug, other")
    pm = get_plugin_manager()
    assert not pm.has_plugin("goodplug") and pm.is_blocked("other")


def test_plugin_that_fails_to_import_names_plugin_and_distribution(installed):
    installed("brokenplug", "import does_not_exist_anywhere\n")
    with pytest.raises(PluginError) as excinfo:
        get_plugin_manager()
    message = str(excinfo.value)
    assert "'brokenplug'" in message and "brokenplug 1.2.3" in message
    assert "ModuleNotFoundError" in message
    assert excinfo.value.plugin_name == "brokenplug"
    assert excinfo.value.distribution == "brokenplug 1.2.3"


def test_plugin_with_unknown_hook_is_an_error_with_a_suggestion(installed):
    installed(
        "typoplug",
        """
        from lightning_shrink import hookimpl

        @hookimpl
        def shrink_after_optimiser_step(trainer):
            pass
        """,
    )
    with pytest.raises(
        PluginError,
        match=r"typoplug 1\.2\.3.*unknown hook 'shrink_after_optimiser_step'.*"
        r"did you mean 'shrink_after_optimizer_step'",
    ):
        get_plugin_manager()


def test_unmarked_shrink_function_is_not_silently_ignored():
    class Unmarked:
        def shrink_metrcs(self):  # misspelled and unmarked
            return {}

    with pytest.raises(PluginError, match="unknown hook 'shrink_metrcs'"):
        get_plugin_manager(plugins=[Unmarked()], autoload=False)


def test_an_unnamed_plugin_is_named_by_its_class_not_its_id():
    class Misspelled:
        @hookimpl
        def shrink_metrcs(self):
            return {}

    class BadArgument:
        @hookimpl
        def shrink_metrics(self, not_an_argument):
            return {}

    qualname = f"{__name__}.test_an_unnamed_plugin_is_named_by_its_class_not_its_id.<locals>"
    with pytest.raises(
        PluginError, match=rf"'{re.escape(qualname)}.Misspelled \(registered without a name\)'"
    ):
        get_plugin_manager(plugins=[Misspelled()], autoload=False)
    with pytest.raises(
        PluginError, match=rf"(?s)'{re.escape(qualname)}.BadArgument'.*not_an_argument"
    ) as info:
        get_plugin_manager(plugins=[BadArgument()], autoload=False)
    assert str(id(info)) not in str(info.value)
    assert not re.search(r"'\d{6,}'", str(info.value))


def test_plugin_with_unknown_argument_names_plugin_and_distribution(installed):
    installed(
        "argplug",
        """
        from lightning_shrink import hookimpl

        @hookimpl
        def shrink_setup(trainer, model):
            pass
        """,
    )
    with pytest.raises(PluginError) as excinfo:
        get_plugin_manager()
    message = str(excinfo.value)
    assert "argplug 1.2.3" in message and "shrink_setup" in message and "model" in message


def test_plugin_class_that_cannot_be_instantiated(installed):
    installed(
        "classplug",
        """
        class Plugin:
            def __init__(self, required):
                pass
        """,
    )
    # Entry point names the module here; point it at the class instead.
    dist_dir = next(p for p in sys.path if p.endswith("site"))
    ep_file = Path(dist_dir) / "classplug-1.2.3.dist-info" / "entry_points.txt"
    ep_file.write_text("[lightning_shrink]\nclassplug = classplug_plugin:Plugin\n")
    with pytest.raises(PluginError, match=r"'classplug'.*could not instantiate"):
        get_plugin_manager()


def test_tryfirst_trylast_and_wrappers_order_calls():
    order: list[str] = []

    class Plain:
        @hookimpl
        def shrink_fit_start(self):
            order.append("plain")

    class First:
        @hookimpl(tryfirst=True)
        def shrink_fit_start(self):
            order.append("first")

    class Last:
        @hookimpl(trylast=True)
        def shrink_fit_start(self):
            order.append("last")

    class Wrapper:
        @hookimpl(wrapper=True)
        def shrink_fit_start(self):
            order.append("wrapper-before")
            result = yield
            order.append("wrapper-after")
            return result

    # Registered in an order that differs from the call order.
    pm = get_plugin_manager(plugins=[Last(), Plain(), Wrapper(), First()], autoload=False)
    pm.hook.shrink_fit_start(trainer=None, pl_module=None)
    assert order == ["wrapper-before", "first", "plain", "last", "wrapper-after"]


def test_first_result_semantics_are_not_used_for_collecting_hooks():
    class A:
        @hookimpl
        def shrink_metrics(self):
            return {"a": 1.0}

    class B:
        @hookimpl
        def shrink_metrics(self):
            return None

    pm = get_plugin_manager(plugins=[A(), B()], autoload=False)
    assert pm.hook.shrink_metrics(trainer=None, pl_module=None) == [{"a": 1.0}]


def test_tracing_writes_every_hook_call(capsys, monkeypatch):
    monkeypatch.setenv(ENV_TRACE, "1")
    pm = get_plugin_manager(autoload=False)
    pm.hook.shrink_fit_start(trainer=None, pl_module=None)
    err = capsys.readouterr().err
    assert "[lightning-shrink]" in err and "shrink_fit_start" in err


def test_shrink_addhooks_lets_a_plugin_add_its_own_hooks():
    class MySpecs:
        @staticmethod
        @__import__("lightning_shrink").hookspec
        def shrink_my_event(value):
            """A team's own hook."""

    class Adds:
        @hookimpl
        def shrink_addhooks(self, pluginmanager):
            pluginmanager.add_hookspecs(MySpecs)

    class Uses:
        @hookimpl
        def shrink_my_event(self, value):
            return value * 2

    pm = get_plugin_manager(plugins=[Adds(), Uses()], autoload=False)
    assert pm.hook.shrink_my_event(value=21) == [42]


def test_real_distribution_metadata_is_used(installed):
    installed("metaplug", GOOD)
    dist = Distribution.from_name("metaplug")
    pm = get_plugin_manager()
    assert pm.distribution_of("metaplug") == f"metaplug {dist.version}"
