"""Combining adapters into one (issue 6): exact stacking, truncated SVD, TIES and DARE, and the stacking report.

    report = deltaw.compose.compose(model, {"tech": 1.0, "sport": -0.5}, method="svd", rank=16, name="combo")
    report = deltaw.compose.compose_dirs({"runs/tech": 1.0, "runs/sport": -0.5}, "runs/combo", method="linear")

    report = deltaw.compose.run_stack_report(model, ["tech", "sport"], {"tech": blocks, "sport": blocks2})

See ``methods`` for the arithmetic and the papers, ``overlap`` for subspace overlap, ``stack_report`` for the
measurement of what stacking does to quality, ``topics`` for its default BBC-topic adapters.
"""

from .core import DEFAULT_DENSITY, DEFAULT_DROP_RATE, ComposeReport, ModuleReport, compose, compose_dirs
from .methods import METHODS
from .overlap import OverlapReport, adapter_overlap, overlap_from_factors
from .stack_report import StackReport, StackSettings, perplexity, run_stack_report, token_blocks, write_report

__all__ = ["METHODS", "ComposeReport", "ModuleReport", "compose", "compose_dirs", "DEFAULT_DENSITY",
           "DEFAULT_DROP_RATE", "OverlapReport", "adapter_overlap", "overlap_from_factors", "StackReport",
           "StackSettings", "perplexity", "run_stack_report", "token_blocks", "write_report"]
