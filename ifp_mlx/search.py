"""``ifp-search``: per-layer keep ratios found with an accuracy predictor (arXiv 2309.09507).

Layers are not equally prunable. We sample per-layer budgets whose average is the target keep,
measure each one's calibration answer loss with the chosen selection method (the per-prompt
selection then fills each layer's budget), fit a gradient-boosted tree regressor
budget → loss, rank many random budgets with it, measure the best few, and write the winner
into the model folder's ``ifp`` config, where the runtime picks it up as its default budget.

Every measurement is appended to a JSONL cache, so an interrupted search resumes where it
stopped. A method's scores (and, for the activation predictor, its dense prompt KV cache) do not
depend on the budget, so they are computed once per calibration prompt and replayed.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from tqdm import tqdm

from .budget import check_keep
from .errors import IFPError
from .eval.methods import check_methods
from .predictors import Scores, get_predictor

MIN_FIT = 20  # evaluated budgets the regressor needs at least (plus a held-out fifth)


@dataclass
class SearchConfig:
    keep: float = 0.5  # target average keep, met exactly in units
    low: float = 0.2  # per-layer keep range
    high: float = 0.9
    method: str = "ifp-activation"  # static | ifp-<predictor>
    samples: int = 200  # random budgets measured to fit the regressor
    rank: int = 10000  # random budgets ranked by the regressor
    top: int = 5  # best-ranked budgets then measured
    n_calib: int = 16  # calibration prompts per measurement
    max_prompt: int = 192
    max_answer: int = 64
    seed: int = 0

    def settings(self) -> dict:
        """What makes two measurements comparable (a cache is only reused if these match)."""
        return {k: getattr(self, k) for k in ("keep", "method", "n_calib", "max_prompt",
                                              "max_answer")}  # fmt: skip


def check(cfg: SearchConfig, units: Sequence[int]) -> None:
    check_keep(cfg.keep)
    if not (0.0 < cfg.low <= cfg.keep <= cfg.high <= 1.0):
        raise IFPError(f"need 0 < low ≤ keep ≤ high ≤ 1, got {cfg.low}, {cfg.keep}, {cfg.high}")
    lo, hi = _bounds(units, cfg.low, cfg.high)
    if (lo < 1).any():
        raise IFPError(f"low {cfg.low} rounds to 0 units in a layer")
    if not lo.sum() <= target_units(units, cfg.keep) <= hi.sum():
        raise IFPError(f"keep {cfg.keep} cannot be met within [{cfg.low}, {cfg.high}] in units")
    if cfg.samples < MIN_FIT:
        raise IFPError(f"--samples must be ≥ {MIN_FIT} to fit the accuracy predictor")
    if cfg.rank < 1 or cfg.top < 1 or cfg.n_calib < 1:
        raise IFPError("--rank, --top and --n-calib must be positive")
    if cfg.method in ("dense", "oracle", "ifp-searched"):
        raise IFPError(f"cannot search with method {cfg.method!r} (use static or ifp-<predictor>)")
    check_methods([cfg.method])


# ---------------------------------------------------------------- budgets


def target_units(units: Sequence[int], keep: float) -> int:
    return int(round(keep * sum(units)))


def _bounds(units: Sequence[int], low: float, high: float) -> Tuple[np.ndarray, np.ndarray]:
    n = np.asarray(units, np.int64)
    return np.ceil(low * n - 1e-9).astype(np.int64), np.floor(high * n + 1e-9).astype(np.int64)


def project(raw: np.ndarray, units: Sequence[int], keep: float, low: float, high: float):
    """Per-layer unit counts closest to the fractions ``raw`` (shifted, clipped to [low, high])
    whose total is exactly ``keep`` of all units."""
    n = np.asarray(units, np.int64)
    lo, hi = _bounds(units, low, high)
    target = target_units(units, keep)

    def total(c):
        return np.clip((raw + c) * n, lo, hi).sum()

    a, b = -1.0 - raw.max(), 1.0 - raw.min() + 1.0
    for _ in range(60):  # total(c) rises with c
        mid = (a + b) / 2
        a, b = (mid, b) if total(mid) < target else (a, mid)
    real = np.clip((raw + b) * n, lo, hi)
    k = np.clip(np.floor(real).astype(np.int64), lo, hi)
    short = target - int(k.sum())
    frac = real - k
    order = np.argsort(-frac if short > 0 else frac, kind="stable")
    step = 1 if short > 0 else -1
    for i in np.concatenate([order] * max(1, abs(short))):
        if short == 0:
            break
        if lo[i] <= k[i] + step <= hi[i]:
            k[i] += step
            short -= step
    return k


def sample(rng: np.random.Generator, units: Sequence[int], cfg: SearchConfig, count: int):
    """``count`` random budgets (unit counts, one row each) meeting the target exactly."""
    raw = rng.uniform(cfg.low, cfg.high, size=(count, len(units)))
    return np.stack([project(r, units, cfg.keep, cfg.low, cfg.high) for r in raw])


def fractions(k: Sequence[int], units: Sequence[int]) -> List[float]:
    """Per-layer keep fractions that ``budget_units`` turns back into exactly ``k``."""
    return [int(a) / int(n) for a, n in zip(k, units)]


# ---------------------------------------------------------------- measuring


class _Replay:
    """A predictor that returns scores computed earlier (they do not depend on the budget)."""

    name = "replay"

    def __init__(self, scores: List[mx.array]):
        self.scores = scores

    def score(self, model, tokens, cache) -> Scores:
        return Scores(self.scores, 0)


class Objective:
    """Calibration answer loss (nats/token) of one budget under one selection method."""

    def __init__(self, model: nn.Module, method, pairs, progress: bool = True):
        self.model, self.pairs = model, pairs
        self.memo = []
        for prompt, answer in tqdm(pairs, desc="scoring calibration prompts", disable=not progress):
            model.dense()
            cache = make_prompt_cache(model)
            result = get_predictor(method.predictor(prompt, answer)).score(model, prompt, cache)
            mx.eval(result.scores)
            self.memo.append((result.scores, cache if result.prefilled else None, result.prefilled))

    def __call__(self, budget: Sequence[float]) -> float:
        from .eval.metrics import continue_logits

        total, count = 0.0, 0
        for (prompt, answer), (scores, cache, n) in zip(self.pairs, self.memo):
            self.model.select(prompt, list(budget), _Replay(scores))
            if cache is None:
                cache = make_prompt_cache(self.model)
            logits = continue_logits(self.model, cache, n, prompt, answer)
            nll = nn.losses.cross_entropy(logits, mx.array(answer), reduction="sum").item()
            if n:
                trim_prompt_cache(cache, cache[0].offset - n)  # back to the dense prompt
            total += nll
            count += len(answer)
        self.model.dense()
        return total / count


class Cache:
    """Measured budgets in a JSONL file: a settings line, then one line per measurement."""

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.rows: Dict[Tuple[int, ...], dict] = {}
        if self.path.is_file():
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            if not lines or lines[0].get("settings") != settings:
                raise IFPError(
                    f"{self.path} holds measurements made with other settings; "
                    "delete it or pass another --cache"
                )
            for row in lines[1:]:
                self.rows[tuple(row["units"])] = row
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n")

    def get(self, k) -> Optional[dict]:
        return self.rows.get(tuple(int(x) for x in k))

    def put(self, k, loss: float, seconds: float, kind: str) -> dict:
        row = {"units": [int(x) for x in k], "loss": loss, "seconds": seconds, "kind": kind}
        with open(self.path, "a") as f:  # one line per write: a kill loses at most this one
            f.write(json.dumps(row) + "\n")
        self.rows[tuple(row["units"])] = row
        return row


def measure(objective, cache: Cache, budgets, units, kind: str, progress=True) -> List[dict]:
    rows = []
    for k in tqdm(budgets, desc=f"measuring {kind} budgets", disable=not progress):
        row = cache.get(k)
        if row is None:
            tic = time.perf_counter()
            loss = objective(fractions(k, units))
            row = cache.put(k, loss, time.perf_counter() - tic, kind)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the accuracy predictor


def fit(X: np.ndarray, y: np.ndarray, seed: int = 0):
    """GBDT budget → loss; returns (regressor fit on all rows, held-out report)."""
    from scipy.stats import spearmanr  # scikit-learn's own dependency
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.metrics import r2_score

    if len(y) < MIN_FIT:
        raise IFPError(
            f"the accuracy predictor needs at least {MIN_FIT} measured budgets, got {len(y)}"
        )

    def make():
        return GradientBoostingRegressor(
            n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=seed
        )

    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(4, len(y) // 5)
    test, train = order[:n_test], order[n_test:]
    held = make().fit(X[train], y[train])
    pred = held.predict(X[test])
    report = {
        "r2": float(r2_score(y[test], pred)),
        "spearman": float(spearmanr(y[test], pred).statistic),
        "held_out": [[float(a), float(b)] for a, b in zip(y[test], pred)],  # measured, predicted
    }
    return make().fit(X, y), report


# ---------------------------------------------------------------- the search


def search(model, tokenizer, cfg: SearchConfig, cache_path: Path, progress=True) -> dict:
    """Run the whole search; returns the report (the caller writes the winner)."""
    from .eval import data
    from .eval.methods import Method

    units = model.ffn_units
    check(cfg, units)
    tic = time.perf_counter()
    pairs, ids = data.chat_pairs(tokenizer, "calib", cfg.n_calib, cfg.max_prompt, cfg.max_answer)
    if not pairs:
        raise IFPError("no usable calibration prompts in the ShareGPT 'calib' split")
    calib = lambda: [p + a for p, a in pairs]  # noqa: E731  (static pruning calibrates here)
    cache = Cache(cache_path, cfg.settings())
    objective = Objective(model, Method(cfg.method, model, calib), pairs, progress)

    rng = np.random.default_rng(cfg.seed)
    uniform = project(np.full(len(units), cfg.keep), units, cfg.keep, cfg.low, cfg.high)
    [base] = measure(objective, cache, [uniform], units, "uniform", progress)
    sampled = measure(objective, cache, sample(rng, units, cfg, cfg.samples), units, "sampled",
                      progress)  # fmt: skip
    X = np.array([r["units"] for r in sampled], np.float64) / np.asarray(units)
    y = np.array([r["loss"] for r in sampled])
    regressor, report = fit(X, y, cfg.seed)

    pool = sample(rng, units, cfg, cfg.rank)
    predicted = regressor.predict(pool / np.asarray(units))
    best, seen = [], set()
    for i in np.argsort(predicted, kind="stable"):
        key = tuple(pool[i])
        if key not in seen:
            seen.add(key)
            best.append((pool[i], float(predicted[i])))
        if len(best) == cfg.top:
            break
    top = measure(objective, cache, [k for k, _ in best], units, "top", progress)
    everything = [base] + sampled + top
    winner = min(everything, key=lambda r: r["loss"])
    return {
        "settings": asdict(cfg),
        "units": units,
        "calibration_ids": ids,
        "uniform": base,
        "winner": winner,
        "top": [dict(r, predicted=p) for r, (_, p) in zip(top, best)],
        "regressor": report,
        "evaluations": len(cache.rows),
        "seconds": time.perf_counter() - tic,
    }


def budget_entry(report: dict) -> Optional[dict]:
    """The ``ifp.budget_search`` record for a report (None when uniform won)."""
    win, base, cfg = report["winner"], report["uniform"], report["settings"]
    if win["loss"] >= base["loss"]:
        return None
    method = cfg["method"]
    return {
        "keep": cfg["keep"],
        "method": method,
        "predictor": method[4:] if method.startswith("ifp-") else "activation",
        "calibration_loss": win["loss"],
        "uniform_calibration_loss": base["loss"],
        "r2": report["regressor"]["r2"],
        "spearman": report["regressor"]["spearman"],
        "evaluations": report["evaluations"],
        "seed": cfg["seed"],
    }


def plot(report: dict, folder: Path) -> List[Path]:
    """Per-layer keep ratios (winner vs uniform) and the regressor's predicted vs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = np.asarray(report["units"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for row, label in ((report["uniform"], "uniform"), (report["winner"], "searched")):
        a.plot(np.asarray(row["units"]) / units, marker="o", ms=3, label=label)
    a.set_xlabel("layer")
    a.set_ylabel("keep ratio")
    a.set_title(f"per-layer budget (average {report['settings']['keep']})", fontsize=10)
    a.legend(fontsize=8)
    held = np.asarray(report["regressor"]["held_out"])
    b.scatter(held[:, 0], held[:, 1], s=12, label="held-out samples")
    top = report["top"]
    b.scatter([r["loss"] for r in top], [r["predicted"] for r in top], s=18, label="top ranked")
    lo, hi = float(held.min()), float(held.max())
    b.plot([lo, hi], [lo, hi], "k:", lw=1)
    r = report["regressor"]
    b.set_title(f"accuracy predictor: R² {r['r2']:.2f}, ρ {r['spearman']:.2f}", fontsize=10)
    b.set_xlabel("measured calibration loss")
    b.set_ylabel("predicted")
    b.legend(fontsize=8)
    fig.tight_layout()
    path = Path(folder) / "search.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
