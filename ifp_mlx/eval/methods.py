"""The pruning methods an evaluation compares, all at the same per-layer FFN budget.

A method turns (prompt, reference answer, keep) into a model state ready to continue from:
it applies its selection and returns the KV cache plus how many prompt tokens are already in
it. Methods whose scoring runs the dense prompt (activation, oracle) hand over that dense KV
cache, exactly as the runtime does; the others prefill with the pruned model.

``ifp-<name>`` works for every registered predictor, so a new predictor (the learned one) is
evaluated without changes here.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from ..budget import Budget, check_keep, is_dense
from ..errors import IFPError
from ..model import find_ffns, tap_ffns
from ..predictors import Scores, available
from ..predictors.activation import ActivationPredictor

Prepared = Tuple[list, int]  # (KV cache, prompt tokens already in it)
COMP = "ifp-activation-comp"  # with the dropped units' compensation bias (ablation)


@dataclass
class FixedPredictor:
    """Scores decided in advance (static pruning): the same units for every prompt."""

    scores: List[mx.array]
    name: str = "static"

    def score(self, model, tokens, cache) -> Scores:
        return Scores(self.scores, 0)


@dataclass
class OraclePredictor:
    """Activation scores over prompt *and* reference answer: an upper bound for any predictor
    that sees the prompt only. The dense pass fills the cache, which is then trimmed back to
    the prompt, so the answer is still scored by the pruned model."""

    answer: List[int]
    name: str = "oracle"

    def score(self, model, tokens, cache) -> Scores:
        full = list(tokens) + list(self.answer)
        result = ActivationPredictor().score(model, full + [0], cache)
        if cache is not None:
            trim_prompt_cache(cache, len(full) - (len(tokens) - 1))
        return Scores(result.scores, len(tokens) - 1 if cache is not None else 0)


def static_scores(model: nn.Module, examples: Sequence[List[int]]) -> List[mx.array]:
    """Calibration importance per unit (Wanda-sp / FLAP style): mean |activation| over the
    calibration tokens times the norm of the unit's down-projection row."""
    model.dense()
    sums, count = None, 0
    with tap_ffns(model) as records:
        for tokens in examples:
            model(mx.array(tokens)[None])
            part = [mx.abs(r.pop().astype(mx.float32)).sum(axis=(0, 1)) for r in records]
            sums = part if sums is None else [a + b for a, b in zip(sums, part)]
            count += len(tokens)
            mx.eval(sums)
    if not count:
        raise IFPError("static pruning needs calibration examples")
    out = []
    for s, (_, mlp) in zip(sums, find_ffns(model)):
        down = mlp.down_proj
        w = down.dequantized().weight if hasattr(down, "dequantized") else down.weight
        out.append(s / count * mx.sqrt((w.astype(mx.float32) ** 2).sum(-1)))
    mx.eval(out)
    return out


def scaled_budget(budget: Sequence[float], keep: float) -> List[float]:
    """A per-layer budget rescaled to average ``keep`` (clipped to (0, 1])."""
    mean = sum(budget) / len(budget)
    if abs(mean - keep) < 1e-3:  # the budget's own average: use it as searched, unit for unit
        return list(budget)
    return [min(1.0, max(1e-3, b * keep / mean)) for b in budget]


class Method:
    """One evaluated method: ``prepare`` applies its selection for one prompt."""

    def __init__(self, name: str, model: nn.Module, calibration: Callable[[], List[List[int]]]):
        self.name = name
        self.model = model
        self._calibration = calibration
        self._static: Optional[List[mx.array]] = None
        self.timings: List[Tuple[float, float]] = []  # (select ms, materialize ms) per prompt
        self.masks: list = []  # each prompt's selection as a 0/1 unit mask
        if name == COMP:
            self.predictor_name = "activation"
        elif name.startswith("ifp-") and name not in ("ifp-searched",):
            self.predictor_name = name[4:]
            if self.predictor_name not in available():
                raise IFPError(f"unknown method {name!r}: no predictor {self.predictor_name!r}")
        if name == "ifp-searched" and not model.__dict__.get("_ifp_config", {}).get("budget"):
            raise IFPError("method 'ifp-searched' needs a model folder with a searched budget")

    @property
    def prefill(self) -> str:
        return "dense" if self.name in ("dense", "oracle", "ifp-activation", COMP) else "pruned"

    def predictor(self, prompt: List[int], answer: List[int]):
        """The predictor this method selects with for one (prompt, reference answer)."""
        if self.name == "static":
            if self._static is None:
                self._static = static_scores(self.model, self._calibration())
            return FixedPredictor(self._static)
        if self.name == "oracle":
            return OraclePredictor(answer)
        if self.name == COMP:
            return ActivationPredictor(compensate=True)
        if self.name == "ifp-searched":
            return (
                self.model.__dict__["_ifp_config"]
                .get("budget_search", {})
                .get("predictor", "activation")
            )
        return self.predictor_name

    def budget(self, keep: float) -> Budget:
        if self.name == "ifp-searched":
            return scaled_budget(self.model.__dict__["_ifp_config"]["budget"], keep)
        return keep

    def prepare(self, prompt: List[int], answer: List[int], keep: float) -> Prepared:
        model = self.model
        cache = make_prompt_cache(model)
        if self.name == "dense" or is_dense(keep):
            model.dense()
            return cache, 0
        pred = self.predictor(prompt, answer)
        sel = model.select(prompt, self.budget(keep), pred, cache=cache)
        self.timings.append((sel.score_ms + sel.select_ms, sel.materialize_ms))
        self.masks.append(sel.mask())
        return cache, sel.prefilled


def method_names(model: Optional[nn.Module] = None) -> List[str]:
    """Every method (for a given model, only those it can run: ``ifp-learned`` needs a trained
    predictor in the folder, ``ifp-searched`` a searched budget)."""
    preds = [p for p in available() if p != "learned"]
    if model is None or model.__dict__.get("_ifp_predictor") is not None:
        preds.append("learned")
    names = ["dense", "static"] + [f"ifp-{p}" for p in preds]
    if model is None or model.__dict__.get("_ifp_config", {}).get("budget"):
        names.append("ifp-searched")
    return names + ["oracle"]


def check_methods(names: Sequence[str]) -> None:
    known = set(method_names()) | {COMP}
    for n in names:
        if n not in known:
            raise IFPError(f"unknown method {n!r} (have: {', '.join(method_names())})")


def check_keeps(keeps: Sequence[float]) -> List[float]:
    return [check_keep(k) for k in keeps]
