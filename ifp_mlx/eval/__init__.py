"""Evaluation: data packages with fixed splits, methods, metrics and the ``ifp-eval`` sweep."""

from .runner import METRICS, EvalConfig, evaluate

__all__ = ["EvalConfig", "METRICS", "evaluate"]
