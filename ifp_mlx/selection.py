"""Budgets → k per layer, top-k selection, and one-time materialization of the kept units.

Materialization takes the kept rows of gate/up/down (weights, quantization scales and biases)
from the model's FFN store — gathered from resident units (memory store) or read from the unit
file (flash store) — into new compact arrays with a single ``mx.eval`` and swaps them into the
MLPs by attribute assignment, so the next prompt can select again and ``dense()`` restores the
original model exactly.
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .budget import Budget, budget_units
from .errors import IFPError
from .model import find_ffns
from .store import MemoryStore, install, layer_modules


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
    store: str = "memory"  # where the units came from (ifp_mlx.store)
    bytes_read: int = 0  # flash: bytes read from the unit file to materialize
    read_calls: int = 0  # flash: positional reads issued (runs of adjacent units coalesce)
    score_bytes_read: int = 0  # flash: bytes streamed by the predictor's dense pass
    prefilled: int = 0  # prompt tokens the predictor already put in the cache
    compensation: Optional[object] = None  # predictors.Compensation: folded into a bias
    expected_kl: Optional[float] = None  # calibrated KL to the dense model at this keep
    max_kl: Optional[float] = None  # the quality target the keep was chosen for (keep="auto")
    extra: dict = field(default_factory=dict)

    @property
    def compensated(self) -> bool:
        """Whether the dropped units' mean output is folded into a per-prompt bias."""
        return self.compensation is not None

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


def _dropped_mean(comp, layer: int, down, kept: mx.array) -> mx.array:
    """The dropped units' mean output over the prompt: the dense FFN's mean output minus what
    ``down`` makes of the kept units' mean activations ``kept`` (the compact units, or all
    units with the dropped ones zeroed: the same sum), in ``down``'s dtype."""
    dtype = down["scales"].dtype if "scales" in down else down["weight"].dtype
    delta = comp.output_means[layer] - down(kept[None].astype(dtype))[0].astype(mx.float32)
    return delta.astype(dtype)


def _arrays(module) -> List[mx.array]:
    return [v for v in module.values() if isinstance(v, mx.array)]


class IFPMixin:
    """Methods added to every loaded ifp-mlx model: ``select``, ``apply_selection``, ``dense``,
    ``release``. Where the units come from is the FFN store's business (``ifp_mlx.store``)."""

    def _ifp_store(self):
        store = self.__dict__.get("_ifp_ffn_store")
        if store is None:  # the model's own modules (also after training swapped them)
            mlps = [m for _, m in find_ffns(self)]
            self._ifp_attach(MemoryStore([layer_modules(m) for m in mlps]), mlps, "dense")
            store = self.__dict__["_ifp_ffn_store"]
        return store

    def _ifp_attach(self, store, mlps: list, state: str) -> None:
        object.__setattr__(self, "_ifp_ffn_store", store)
        object.__setattr__(self, "_ifp_mlps", mlps)
        object.__setattr__(self, "_ifp_state", state)  # dense | selected | streamed
        object.__setattr__(self, "_ifp_selection", None)

    def _install(self, layers, state: str, selection: Optional[Selection] = None) -> None:
        for mlp, mods in zip(self.__dict__["_ifp_mlps"], layers):
            install(mlp, mods)
        object.__setattr__(self, "_ifp_state", state)
        object.__setattr__(self, "_ifp_selection", selection)

    @property
    def ffn_store(self) -> str:
        """``"memory"`` (every unit resident) or ``"flash"`` (units read from the file)."""
        return self._ifp_store().name

    @property
    def ffn_io(self) -> Tuple[int, int]:
        """(bytes read, read calls) from the unit file since load (0, 0 with the memory store)."""
        store = self._ifp_store()
        return store.bytes_read, store.read_calls

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: the valid token ids are 0 .. vocab_size - 1."""
        import mlx.nn as nn

        size = getattr(getattr(self, "args", None), "vocab_size", None)
        if isinstance(size, int):
            return size
        emb = next(m for _, m in self.named_modules() if isinstance(m, nn.Embedding))
        return emb.weight.shape[0]

    def check_tokens(self, tokens: Sequence[int]) -> List[int]:
        """Token ids as ints, or an IFPError: an id outside the embedding table would read out
        of bounds (garbage, or a crash of the whole process)."""
        out, n = [], self.vocab_size
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n:
                raise IFPError(f"token id {t!r} is not in this model's vocabulary (0..{n - 1})")
            out.append(int(t))
        return out

    @property
    def ffn_units(self) -> List[int]:
        return list(self._ifp_store().units)

    @property
    def selection(self) -> Optional[Selection]:
        self._ifp_store()
        return self.__dict__["_ifp_selection"]

    def dense(self) -> None:
        """Restore the full FFNs (the original model, bit for bit). With the flash store this
        reads every unit (it is the dense model); a model already dense reads nothing."""
        store = self._ifp_store()
        if store.name != "memory" and self.__dict__["_ifp_state"] == "dense":
            return
        self.release()  # flash: drop the compact units before reading the full ones
        layers = []
        for i in range(len(store.units)):
            layers.append(store.full(i))
            mx.eval([a for m in layers[-1] for a in _arrays(m)])
        self._install(layers, "dense")

    def release(self) -> None:
        """Drop the current selection. Memory store: the dense model. Flash store: no unit
        stays in memory (a forward pass then streams each layer's units from the file)."""
        store = self._ifp_store()
        if store.name == "memory":
            self._install([store.full(i) for i in range(len(store.units))], "dense")
        elif self.__dict__["_ifp_state"] != "streamed":
            self._install([store.scoring(i) for i in range(len(store.units))], "streamed")

    def apply_selection(self, selection: Selection) -> Selection:
        """Materialize ``selection``: gather (memory) or read (flash) the kept units once,
        evaluate them in one ``mx.eval``, swap them in."""
        store = self._ifp_store()
        if len(selection.indices) != len(store.units):
            raise IFPError(
                f"selection has {len(selection.indices)} layers, model has {len(store.units)}"
            )
        store.check()
        if store.name != "memory":
            self.release()  # peak: one compact model, never compact + old compact
        read0, calls0 = store.bytes_read, store.read_calls
        tic = time.perf_counter()
        compact = [store.gather(i, idx) for i, idx in enumerate(selection.indices)]
        fresh = [  # the new arrays (a layer kept whole from resident units is not copied)
            a
            for i, mods in enumerate(compact)
            if mods is not store.resident_layer(i)
            for m in mods
            for a in _arrays(m)
        ]
        if selection.compensation is not None:
            fresh += self._compensate(compact, selection)
        mx.eval(fresh)
        selection.materialize_ms = (time.perf_counter() - tic) * 1e3
        selection.bytes = sum(a.nbytes for a in fresh)
        selection.store = store.name
        selection.bytes_read = store.bytes_read - read0
        selection.read_calls = store.read_calls - calls0
        self._install(compact, "selected", selection)
        return selection

    def select(
        self,
        prompt_tokens: Sequence[int],
        keep: Budget = None,
        predictor=None,
        cache: Optional[list] = None,
        block: int = 1,
        max_kl: Optional[float] = None,
        materialize: bool = True,
    ) -> Selection:
        """Score the prompt, keep the top units per layer, materialize them; returns the Selection.

        ``keep`` is a fraction in (0, 1], a per-layer list, ``"auto"`` (the smallest calibrated
        keep whose expected KL to the dense model is within ``max_kl``), or None for the
        folder's default (``ifp_mlx.calibrate.resolve``). With a ``cache`` the predictor may
        prefill it (see ``Selection.prefilled``).
        """
        from .budget import resolve
        from .predictors import get_predictor

        tokens = self.check_tokens(prompt_tokens)
        if not tokens:
            raise IFPError("empty prompt")
        choice = resolve(self, keep, predictor, max_kl)
        units = self.ffn_units
        ks = budget_units(choice.keep, units, block)
        pred = get_predictor(choice.predictor)
        store = self._ifp_store()
        store.check()
        if store.name == "memory":
            self.dense()
        elif self.__dict__["_ifp_state"] != "dense":
            self.release()  # the predictor's dense pass streams units layer by layer
        read0 = store.bytes_read
        tic = time.perf_counter()
        result = pred.score(self, tokens, cache)
        mx.eval(result.scores)
        score_ms = (time.perf_counter() - tic) * 1e3
        tic = time.perf_counter()
        indices = self._top_units(result.scores, ks, block)
        select_ms = (time.perf_counter() - tic) * 1e3
        sel = Selection(indices, units, pred.name, score_ms, select_ms, prefilled=result.prefilled)
        sel.expected_kl, sel.max_kl = choice.expected_kl, choice.max_kl
        sel.score_bytes_read = store.bytes_read - read0
        sel.compensation = result.compensation
        return self.apply_selection(sel) if materialize else sel

    def _top_units(self, scores: List[mx.array], ks: List[int], block: int) -> List[np.ndarray]:
        """Each layer's kept units from its scores (a sharded model agrees on them across
        ranks first: ``ifp_mlx.distributed``)."""
        return [top_units(s, k, block) for s, k in zip(scores, ks)]

    def unit_sum(self, x: mx.array) -> mx.array:
        """Σ over a layer's FFN units (last axis) of a per-unit quantity, e.g. a token's
        squared activation norm (a sharded model adds the other ranks' units)."""
        return x.sum(-1, keepdims=True)

    def row_terms(self, selection: Optional[Selection]) -> Tuple[list, list]:
        """Per layer, the 0/1 mask over all of its units and the compensation bias that make
        the full FFN compute exactly ``selection``'s compact one (None where the layer is kept
        whole, or nothing is added); None: the dense model. Needs the full layers in memory
        (``dense()``), as answers decoding together do (``ifp_mlx.batch``)."""
        n = len(self.ffn_units)
        if self.__dict__["_ifp_state"] != "dense":
            raise IFPError("row_terms needs the full FFNs installed: call dense() first")
        if selection is None:
            return [None] * n, [None] * n
        masks, deltas, comp = [], [], selection.compensation
        for i, (idx, units) in enumerate(zip(selection.indices, selection.units)):
            if len(idx) == units:
                masks.append(None), deltas.append(None)
                continue
            mask = mx.zeros((units,), mx.float32)
            mask[mx.array(idx)] = 1.0
            masks.append(mask)
            if comp is None:
                deltas.append(None)
                continue
            down = self.__dict__["_ifp_mlps"][i].down_proj
            deltas.append(_dropped_mean(comp, i, down, comp.unit_means[i] * mask))
        return masks, deltas

    @staticmethod
    def _compensate(compact: list, selection: Selection) -> List[mx.array]:
        """Fold each layer's dropped units' mean output over the prompt into its compact
        ``down_proj``'s bias: bias += mean dense output − compact(mean kept activations).
        A layer kept whole (possibly the resident module itself) is never touched."""
        comp, biases = selection.compensation, []
        for i, (mods, idx) in enumerate(zip(compact, selection.indices)):
            if len(idx) == selection.units[i]:
                continue
            down = mods[2]
            delta = _dropped_mean(comp, i, down, comp.unit_means[i][mx.array(idx)])
            down.bias = down["bias"] + delta if "bias" in down else delta
            biases.append(down.bias)
        return biases

    @property
    def default_predictor(self) -> str:
        """The folder's chosen ``ifp.default_predictor`` (set where it was measured best), else
        its learned predictor when it has one (the paper's method), else the training-free
        activation predictor."""
        ifp = self.__dict__.get("_ifp_config", {})
        if ifp.get("default_predictor"):
            return ifp["default_predictor"]
        return "learned" if self.__dict__.get("_ifp_predictor") is not None else "activation"

    @property
    def default_keep(self) -> Budget:
        """What ``keep=None`` means for the default predictor: the folder's searched per-layer
        budget, else the calibrated keep for its default quality target, else 0.5."""
        from .budget import resolve

        return resolve(self).keep
