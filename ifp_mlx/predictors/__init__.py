"""Sparsity predictors: prompt tokens → per-layer FFN unit scores (higher = keep).

A predictor implements :class:`Predictor`. It may fill the prompt cache while scoring (the
activation predictor runs the dense prefill anyway, so decoding reuses its KV cache); it says
how many prompt tokens it left in the cache.
"""

from . import activation, learned  # noqa: F401  (register themselves)
from .base import (
    Compensation,
    Predictor,
    Scores,
    available,
    get_predictor,
    prefill_progress,
    register,
    report_prefill,
)

__all__ = ["Compensation", "Predictor", "Scores", "available", "get_predictor",
           "prefill_progress", "register", "report_prefill"]  # fmt: skip
