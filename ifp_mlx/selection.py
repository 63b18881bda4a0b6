"""Budgets → k per layer, top-k selection, and one-time materialization of the kept units.

Materialization gathers the kept rows of gate/up/down (weights, quantization scales and
biases) into new compact arrays with a single ``mx.eval`` and swaps them into the MLPs by
attribute assignment. The full FFN modules are kept aside, so the next prompt can select again
and ``dense()`` restores the original model exactly.
"""

import copy
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import IFPError
from .model import find_ffns

Budget = Union[float, Sequence[float], None]


def check_keep(keep: float) -> float:
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise IFPError(f"keep must be a number in (0, 1], not {keep!r}")
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise IFPError(f"keep must be in (0, 1], not {keep}")
    return keep


def is_dense(keep: Budget) -> bool:
    """An explicit uniform keep of 1.0 (None means the folder's default budget, not dense)."""
    return isinstance(keep, (int, float)) and float(keep) == 1.0


def budget_units(keep: Budget, units: Sequence[int], block: int = 1) -> List[int]:
    """Units to keep per layer: a uniform fraction, or an explicit per-layer list of fractions.

    k is rounded to whole blocks of ``block`` units and is at least one block.
    """
    if keep is None:
        keep = 1.0
    if isinstance(keep, (int, float)):
        fractions = [check_keep(keep)] * len(units)
    else:
        fractions = [check_keep(k) for k in keep]
        if len(fractions) != len(units):
            raise IFPError(
                f"per-layer budget has {len(fractions)} entries, the model has {len(units)} FFN layers"
            )
    out = []
    for f, n in zip(fractions, units):
        blocks = max(1, round(f * n / block))
        out.append(min(n, blocks * block))
    return out


def top_units(scores: mx.array, k: int, block: int = 1) -> np.ndarray:
    """Sorted indices of the k best units (ties broken by index, so deterministic)."""
    s = np.asarray(scores.astype(mx.float32))
    if block > 1:
        n_blocks = len(s) // block
        blk = s[: n_blocks * block].reshape(n_blocks, block).sum(1)
        best = np.sort(np.argsort(-blk, kind="stable")[: k // block])
        idx = (best[:, None] * block + np.arange(block)).reshape(-1)
        return idx.astype(np.int32)
    return np.sort(np.argsort(-s, kind="stable")[:k]).astype(np.int32)


def mask_diversity(masks: np.ndarray) -> float:
    """Mean fraction of kept units that differ between two prompts' selections; ``masks`` is
    (prompts, Σ units) of 0/1. 0 means one subset for every prompt (static, or a predictor
    that ignores the prompt — the collapse IFPruning training must avoid)."""
    m = np.asarray(masks, np.float64)
    n = len(m)
    if n < 2:
        return 0.0
    overlap = (m @ m.T) / m.sum(-1)[:, None]
    return float(1.0 - (overlap.sum() - np.trace(overlap)) / (n * (n - 1)))


@dataclass
class Selection:
    """Which FFN units each layer keeps for one prompt, with what it cost."""

    indices: List[np.ndarray]
    units: List[int]
    predictor: str = ""
    score_ms: float = 0.0  # predictor time (for "activation": the dense prefill with taps)
    select_ms: float = 0.0  # top-k
    materialize_ms: float = 0.0
    bytes: int = 0  # bytes gathered into the compact FFN
    prefilled: int = 0  # prompt tokens the predictor already put in the cache
    extra: dict = field(default_factory=dict)

    @property
    def kept(self) -> List[int]:
        return [len(i) for i in self.indices]

    @property
    def keep(self) -> float:
        return sum(self.kept) / sum(self.units)

    def mask(self) -> np.ndarray:
        """0/1 over every FFN unit of every layer (layers concatenated)."""
        out = np.zeros(sum(self.units), np.float32)
        start = 0
        for idx, n in zip(self.indices, self.units):
            out[start + idx] = 1.0
            start += n
        return out

    @property
    def materialize_gbps(self) -> float:
        return self.bytes / (self.materialize_ms * 1e6) if self.materialize_ms else 0.0


def _gather(module: nn.Module, idx: mx.array, row_bias: bool) -> nn.Module:
    """A shallow copy of a (quantized) linear layer whose unit rows are ``idx``."""
    new = copy.copy(module)
    for name in ("weight", "scales", "biases"):
        if module.get(name) is not None:
            new[name] = mx.take(module[name], idx, axis=0)
    if row_bias and "bias" in module:
        new["bias"] = mx.take(module["bias"], idx, axis=0)
    return new


def _arrays(module: nn.Module) -> List[mx.array]:
    return [v for k, v in module.items() if isinstance(v, mx.array)]


class IFPMixin:
    """Methods added to every loaded ifp-mlx model: ``select``, ``apply_selection``, ``dense``."""

    def _ifp_store(self):
        store = self.__dict__.get("_ifp_full")
        if store is None:
            ffns = [m for _, m in find_ffns(self)]
            store = [(m.gate_proj, m.up_proj, m.down_proj) for m in ffns]
            object.__setattr__(self, "_ifp_full", store)
            object.__setattr__(self, "_ifp_mlps", ffns)
            object.__setattr__(self, "_ifp_selection", None)
        return store

    @property
    def ffn_units(self) -> List[int]:
        return [d.weight.shape[0] for _, _, d in self._ifp_store()]  # unit-major down_proj

    @property
    def selection(self) -> Optional[Selection]:
        self._ifp_store()
        return self.__dict__["_ifp_selection"]

    def dense(self) -> None:
        """Restore the full FFNs (the original model, bit for bit)."""
        store = self._ifp_store()
        for mlp, (g, u, d) in zip(self.__dict__["_ifp_mlps"], store):
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = g, u, d
        object.__setattr__(self, "_ifp_selection", None)

    def apply_selection(self, selection: Selection) -> Selection:
        """Materialize ``selection``: gather kept rows once, swap them in."""
        store = self._ifp_store()
        if len(selection.indices) != len(store):
            raise IFPError(f"selection has {len(selection.indices)} layers, model has {len(store)}")
        tic = time.perf_counter()
        compact, arrays = [], []
        for (g, u, d), idx in zip(store, selection.indices):
            if len(idx) == g.weight.shape[0]:
                compact.append((g, u, d))
                continue
            ids = mx.array(idx)
            parts = (_gather(g, ids, True), _gather(u, ids, True), _gather(d, ids, False))
            compact.append(parts)
            for p in parts:
                arrays.extend(_arrays(p))
        mx.eval(arrays)
        for mlp, (g, u, d) in zip(self.__dict__["_ifp_mlps"], compact):
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = g, u, d
        selection.materialize_ms = (time.perf_counter() - tic) * 1e3
        selection.bytes = sum(a.nbytes for a in arrays)
        object.__setattr__(self, "_ifp_selection", selection)
        return selection

    def select(
        self,
        prompt_tokens: Sequence[int],
        keep: Budget = None,
        predictor=None,
        cache: Optional[list] = None,
        block: int = 1,
    ) -> Selection:
        """Score the prompt, keep the top units per layer, materialize them; returns the Selection.

        ``keep`` is a fraction in (0, 1], a per-layer list, or None for the folder's default
        budget. With a ``cache`` the predictor may prefill it (see ``Selection.prefilled``).
        """
        from .predictors import get_predictor

        tokens = list(prompt_tokens)
        if not tokens:
            raise IFPError("empty prompt")
        keep = self.default_keep if keep is None else keep
        predictor = self.default_predictor if predictor is None else predictor
        units = self.ffn_units
        ks = budget_units(keep, units, block)
        pred = get_predictor(predictor)
        self.dense()
        tic = time.perf_counter()
        result = pred.score(self, tokens, cache)
        mx.eval(result.scores)
        score_ms = (time.perf_counter() - tic) * 1e3
        tic = time.perf_counter()
        indices = [top_units(s, k, block) for s, k in zip(result.scores, ks)]
        select_ms = (time.perf_counter() - tic) * 1e3
        sel = Selection(indices, units, pred.name, score_ms, select_ms, prefilled=result.prefilled)
        return self.apply_selection(sel)

    @property
    def default_predictor(self) -> str:
        """The folder's learned predictor when it has one (the paper's method), else the
        training-free activation predictor."""
        return "learned" if self.__dict__.get("_ifp_predictor") is not None else "activation"

    @property
    def default_keep(self) -> Budget:
        """The folder's searched per-layer budget when it has one, else 0.5."""
        budget = self.__dict__.get("_ifp_config", {}).get("budget")
        return budget if budget else 0.5
