"""Heterogeneous batches: one adapter (or none, or a weighted stack) per row, in one forward or ``generate``.

    with deltaw.batching.per_row(model, ["tech", "sport", None, {"tech": 0.5, "sport": 0.5}]):
        out = model.generate(**inputs)

See ``plan`` for the contract and ``kernels`` for the strategies and when each is chosen.
"""

from .generate import generate
from .kernels import STRATEGIES, cache_nbytes, clear_cache
from .plan import MixedHeadsError, RowPlan, per_row

__all__ = ["per_row", "generate", "RowPlan", "MixedHeadsError", "STRATEGIES", "clear_cache", "cache_nbytes"]
