"""lightning-shrink: compress models while they are fine-tuned, with Lightning callbacks on a
pluggy hook system."""

from lightning_shrink.callback import ShrinkCallback, TechniqueCallback
from lightning_shrink.distillation import KnowledgeDistillation
from lightning_shrink.export import convert, export, load
from lightning_shrink.hookspecs import hookimpl, hookspec
from lightning_shrink.manager import PluginError, ShrinkPluginManager, get_plugin_manager
from lightning_shrink.privacy import DifferentialPrivacy
from lightning_shrink.pruning import GradualMagnitudePruning
from lightning_shrink.quantization import QuantizationAwareTraining
from lightning_shrink.report import CompressionReport, ReportRow, report, save_report

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
    "ShrinkPluginManager",
    "TechniqueCallback",
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
