"""lightning-shrink: compress models while they are fine-tuned, with Lightning callbacks on a
pluggy hook system."""

from lightning_shrink.distillation import KnowledgeDistillation
from lightning_shrink.export import convert, export, load
from lightning_shrink.hookspecs import hookimpl, hookspec
from lightning_shrink.lightning import ShrinkCallback, ShrinkLossMixin, TechniqueCallback, TechniquePlugin
from lightning_shrink.manager import PluginError, ShrinkPluginManager, get_plugin_manager
from lightning_shrink.privacy import DifferentialPrivacy
from lightning_shrink.pruning import GradualMagnitudePruning
from lightning_shrink.quantization import QuantizationAwareTraining
from lightning_shrink.report import CompressionReport, report, save_report
from lightning_shrink.types import ReportRow

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DifferentialPrivacy",
    "GradualMagnitudePruning",
    "KnowledgeDistillation",
    "PluginError",
    "QuantizationAwareTraining",
    "ReportRow",
    "ShrinkCallback",
    "ShrinkLossMixin",
    "ShrinkPluginManager",
    "TechniqueCallback",
    "TechniquePlugin",
    "__version__",
    "convert",
    "export",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load",
    "report",
    "save_report",
]
