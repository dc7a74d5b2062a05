"""Models of the multi-process pruning scripts (imported by them from this directory)."""

from __future__ import annotations

from torch import nn

from lightning_shrink.testing.models import ShardedTinyClassifier, TinyClassifier


class DeferredClassifier(TinyClassifier):
    """:class:`TinyClassifier` whose layers do not exist until ``configure_model`` creates them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        del self.net, self.classifier

    def configure_model(self) -> None:
        if not hasattr(self, "classifier"):  # configure_model runs again for every stage
            h = self.hparams
            self.net = nn.Sequential(
                nn.Linear(h.in_features, h.hidden), nn.ReLU(), nn.Linear(h.hidden, h.hidden), nn.ReLU()
            )
            self.classifier = nn.Linear(h.hidden, h.num_classes)


class DeferredShardedClassifier(DeferredClassifier):
    """:class:`DeferredClassifier` then sharded in ``configure_model`` like :class:`ShardedTinyClassifier`."""

    def configure_model(self) -> None:
        super().configure_model()
        ShardedTinyClassifier.configure_model(self)
