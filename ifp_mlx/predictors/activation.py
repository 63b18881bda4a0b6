"""Training-free activation predictor (GRIFFIN, arXiv 2404.01365).

Runs the dense prefill over the prompt (all but its last token, which the pruned model then
feeds to start decoding) and scores unit j of each layer by the ℓ2 norm over prompt tokens of
its activation ``act(gate)·up``, after normalizing each token's activation vector. The dense
prefill fills the KV cache, so nothing is prefilled twice.

Because that prefill ran the dense FFNs, it also knows the dropped units' mean contribution over
the prompt: with ``compensate=True`` the selection folds it into a per-prompt bias after
``down_proj``. Off by default: on held-out prompts it did not win (README, quality table).
"""

from functools import partial
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from ..model import tap_ffns
from .base import Compensation, Scores, register, report_prefill

PREFILL_STEP = 512


def _sq_normalized(x: mx.array, unit_sum=None) -> mx.array:
    """Σ over tokens of (z_t / ||z_t||)², per unit; x is (1, T, units). ``unit_sum`` sums over
    the layer's units (``model.unit_sum``: on a sharded model, over every rank's units)."""
    x = x.astype(mx.float32)
    sq = x * x
    norms = mx.sqrt(sq.sum(-1, keepdims=True) if unit_sum is None else unit_sum(sq)) + 1e-6
    return ((x / norms) ** 2).sum(axis=(0, 1))


def _summaries(x: mx.array, unit_sum=None) -> mx.array:
    """(2, units): the score sums and the plain activation sums over tokens."""
    return mx.stack([_sq_normalized(x, unit_sum), x.astype(mx.float32).sum(axis=(0, 1))])


def _add(total, part):
    return part if total is None else [a + b for a, b in zip(total, part)]


@register
class ActivationPredictor:
    name = "activation"

    def __init__(self, compensate: bool = False, accumulate: bool = False):
        self.compensate = compensate
        # accumulate: every call adds to the sums of the calls before it, so scoring the answer
        # as it grows ranks units over prompt + answer so far (``stream_generate(rescore=N)``).
        self.accumulate = accumulate
        self._sums = self._outs = None
        self._count = 0

    def score(self, model: nn.Module, tokens: List[int], cache: Optional[list]) -> Scores:
        # The last token is left for the pruned model to feed when decoding starts; a lone
        # token is scored without touching the caller's cache (nothing to prefill).
        body = tokens if len(tokens) == 1 else tokens[:-1]
        own = cache is None or len(tokens) == 1
        run = make_prompt_cache(model) if own else cache  # chunks attend to earlier chunks
        comp = self.compensate
        sums = outs = None  # per layer: score (+ activation) sums; dense output sums
        unit_sum = getattr(model, "unit_sum", None)
        reduce = partial(_summaries if comp else _sq_normalized, unit_sum=unit_sum)
        tap = tap_ffns(model, reduce=reduce, outputs=comp)
        with tap as records:
            for start in range(0, len(body), PREFILL_STEP):
                chunk = mx.array(body[start : start + PREFILL_STEP])[None]
                model(chunk, cache=run)
                sums = _add(sums, [r.pop() for r in records])
                if comp:
                    outs = _add(outs, [o.pop() for o in tap.outputs])
                mx.eval(sums, outs or [], [c.state for c in run])
                report_prefill(start + chunk.shape[1], len(body))
        prefilled = 0 if own else len(body)
        n = len(body)
        if self.accumulate:
            self._sums, self._outs = _add(self._sums, sums), (
                _add(self._outs, outs) if comp else None
            )
            self._count += n
            sums, outs, n = self._sums, self._outs, self._count
        if not comp:
            return Scores([mx.sqrt(s) for s in sums], prefilled)
        means = Compensation([s[1] / n for s in sums], [o / n for o in outs])
        return Scores([mx.sqrt(s[0]) for s in sums], prefilled, means)
