"""Gradual magnitude pruning: schedules, mask patterns (unstructured, N:M, rows) and exact
thresholds (global, per layer, over FSDP2 shards). See ``docs/pruning.md``."""

from lightning_shrink.pruning.callback import GradualMagnitudePruning
from lightning_shrink.pruning.config import PruningConfig
from lightning_shrink.pruning.masks import Pattern, parse_pattern
from lightning_shrink.pruning.plugin import PruningPlugin
from lightning_shrink.pruning.schedule import PruningSchedule

__all__ = [
    "GradualMagnitudePruning",
    "Pattern",
    "PruningConfig",
    "PruningPlugin",
    "PruningSchedule",
    "parse_pattern",
]
