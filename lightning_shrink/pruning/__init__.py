"""Gradual magnitude pruning: schedules, mask patterns (unstructured, N:M, rows) and exact
thresholds (global, per layer, over FSDP2 shards). See ``docs/pruning.md``."""

from lightning_shrink.pruning.callback import GradualMagnitudePruning, PruningPlugin
from lightning_shrink.pruning.masks import Pattern, parse_pattern
from lightning_shrink.pruning.schedule import PruningSchedule

__all__ = ["GradualMagnitudePruning", "Pattern", "PruningPlugin", "PruningSchedule", "parse_pattern"]
