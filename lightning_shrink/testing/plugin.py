"""pytest plugin with fixtures for teams that test their own lightning-shrink plugins.

Opt in from a ``conftest.py``::

    pytest_plugins = ["lightning_shrink.testing.plugin"]

or on the command line with ``-p lightning_shrink.testing.plugin``. It is not registered under the
``pytest11`` entry point on purpose: importing it imports torch and Lightning (several seconds), a
cost that every pytest run in an environment with lightning-shrink installed would otherwise pay.

Fixtures
--------
``shrink_pluginmanager``
    A fresh :class:`~lightning_shrink.ShrinkPluginManager` with the built-in plugins and no
    entry-point plugins (autoload off), so tests are isolated from what is installed. Register
    your plugin on it, then pass it to the Trainer with :func:`shrink_callback`.
``shrink_recorder``
    A :class:`HookRecorder` attached to ``shrink_pluginmanager``: every hook call, in order, with
    its keyword arguments.
``shrink_callback``
    A :class:`~lightning_shrink.ShrinkCallback` driving ``shrink_pluginmanager``; list it in the
    Trainer's callbacks.
``tiny_module``
    A fresh :class:`~lightning_shrink.testing.models.TinyClassifier` (an MLP LightningModule).
``tiny_dataloader``
    A small classification ``DataLoader`` matching ``tiny_module`` (64 samples, batch 8).
``cpu_trainer``
    A factory: ``cpu_trainer(**trainer_kwargs)`` returns a fast, quiet CPU ``Trainer`` whose
    callbacks include ``shrink_callback``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_shrink.lightning.bridge import ShrinkCallback
    from lightning_shrink.manager import ShrinkPluginManager
    from lightning_shrink.testing.models import TinyClassifier

__all__ = ["HookCall", "HookRecorder"]


@dataclass
class HookCall:
    """One recorded hook call: its name, keyword arguments and the plugins that implement it."""

    name: str
    kwargs: dict[str, Any]
    plugins: list[str] = field(default_factory=list)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.kwargs[key]
        except KeyError:
            raise AttributeError(key) from None


class HookRecorder:
    """Records every hook call made through a plugin manager, like pytest's ``HookRecorder``.

    Every hook is recorded from the moment the recorder is attached: the Trainer-time hooks, the
    historic ones (``shrink_plugin_registered`` for each plugin registered afterwards, replayed to
    a plugin that implements it), the export and report hooks, and hooks that plugins add with
    ``shrink_addhooks``. Querying a name that is not a hook of the manager (a typo such as
    ``"shrink_configure_modle"``) raises ``ValueError`` rather than counting zero calls.

    Args:
        pluginmanager: The manager to monitor. Call :meth:`finish_recording` to detach.
    """

    def __init__(self, pluginmanager: ShrinkPluginManager) -> None:
        self.calls: list[HookCall] = []
        self._pluginmanager = pluginmanager

        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            self.calls.append(HookCall(hook_name, dict(kwargs), [impl.plugin_name for impl in hook_impls]))

        def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            pass

        self._undo = pluginmanager.add_hookcall_monitoring(before, after)

    def finish_recording(self) -> None:
        """Stop recording."""
        self._undo()

    def names(self) -> list[str]:
        """The names of the recorded calls, in order."""
        return [call.name for call in self.calls]

    def _hook_names(self, names: str | Sequence[str]) -> set[str]:
        wanted = set(names.split()) if isinstance(names, str) else set(names)
        known = {
            name
            for name, caller in vars(self._pluginmanager.hook).items()
            if getattr(caller, "spec", None) is not None
        }
        unknown = sorted(wanted - known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"HookRecorder: not a hook of the plugin manager: {', '.join(hints)}")
        return wanted

    def getcalls(self, names: str | Sequence[str]) -> list[HookCall]:
        """The calls of the hooks ``names`` (a name, a space-separated string or a sequence), in order.

        Raises:
            ValueError: a name is not a hook of the plugin manager.
        """
        wanted = self._hook_names(names)
        return [call for call in self.calls if call.name in wanted]

    def count(self, name: str) -> int:
        """How many times hook ``name`` was called.

        Raises:
            ValueError: ``name`` is not a hook of the plugin manager.
        """
        return len(self.getcalls([name]))

    def assert_called(self, name: str, times: int | None = None) -> list[HookCall]:
        """Assert that hook ``name`` was called (exactly ``times`` times if given) and return its calls.

        Raises:
            AssertionError: it was called another number of times.
            ValueError: ``name`` is not a hook of the plugin manager.
        """
        calls = self.getcalls([name])
        if (times is None and not calls) or (times is not None and len(calls) != times):
            expected = "at least once" if times is None else f"{times} time(s)"
            raise AssertionError(f"hook {name!r} called {len(calls)} time(s), expected {expected}")
        return calls

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        self.calls.clear()


@pytest.fixture
def shrink_pluginmanager() -> ShrinkPluginManager:
    """A fresh plugin manager: built-in plugins only (no entry-point plugins)."""
    from lightning_shrink.manager import ShrinkPluginManager

    pm = ShrinkPluginManager(autoload=False)
    pm.register_builtins()
    return pm


@pytest.fixture
def shrink_recorder(shrink_pluginmanager: ShrinkPluginManager) -> Iterator[HookRecorder]:
    """Records the hook calls made through ``shrink_pluginmanager``."""
    recorder = HookRecorder(shrink_pluginmanager)
    yield recorder
    recorder.finish_recording()


@pytest.fixture
def shrink_callback(shrink_pluginmanager: ShrinkPluginManager) -> ShrinkCallback:
    """A bridge callback that drives ``shrink_pluginmanager``."""
    from lightning_shrink.lightning.bridge import ShrinkCallback

    return ShrinkCallback(pluginmanager=shrink_pluginmanager)


@pytest.fixture
def tiny_module() -> TinyClassifier:
    """A tiny MLP LightningModule (16 features, 2 classes), seeded."""
    import torch

    from lightning_shrink.testing.models import TinyClassifier

    torch.manual_seed(0)
    return TinyClassifier()


@pytest.fixture
def tiny_dataloader() -> DataLoader:
    """64 samples of 16 features, batch size 8, not shuffled."""
    from torch.utils.data import DataLoader

    from lightning_shrink.testing.models import random_classification_data

    return DataLoader(random_classification_data(), batch_size=8)


@pytest.fixture
def cpu_trainer(shrink_callback: ShrinkCallback, tmp_path: Any) -> Callable[..., pl.Trainer]:
    """Factory for a fast CPU Trainer whose callbacks include ``shrink_callback``.

    ``callbacks=`` passed to the factory are added after the bridge; other keyword arguments
    override the defaults of :func:`lightning_shrink.testing.models.cpu_trainer`.
    """
    from lightning_shrink.testing.models import cpu_trainer as make

    def factory(**kwargs: Any) -> pl.Trainer:
        callbacks = [shrink_callback, *kwargs.pop("callbacks", [])]
        kwargs.setdefault("default_root_dir", tmp_path)
        return make(callbacks=callbacks, **kwargs)

    return factory
