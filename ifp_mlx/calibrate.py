"""Calibration: the measured curve keep → quality, so a user can ask for quality, not a fraction.

A keep fraction means nothing to a user; "how far from the dense model" does. ``calibrate``
measures, on the ``calib`` split (never the ``test`` split quality is reported on), the mean
KL(dense ‖ pruned) per token and the top-1 agreement over the dense model's own greedy answers,
at a grid of keeps, for one predictor. The curve is stored in the folder's ``ifp.calibration``
block; ``keep="auto"`` with ``max_kl=T`` then picks the smallest keep whose calibrated KL is
within T (linear between measured keeps), and the stats line reports the expected KL.
"""

from dataclasses import dataclass, field
from typing import List

from .budget import SPLIT, Curve, check_keep
from .errors import IFPError


def _grid() -> List[float]:
    return [round(0.2 + 0.05 * i, 2) for i in range(17)]  # 0.2, 0.25, ..., 1.0


@dataclass
class CalibrationConfig:
    keeps: List[float] = field(default_factory=_grid)
    n_prompts: int = 32
    tokens: int = 48  # dense greedy answer tokens per prompt
    max_prompt: int = 192
    dequantize: bool = True  # float copies of quantized weights: same values, fast on CPU

    def check(self) -> None:
        if len(self.keeps) < 2:
            raise IFPError("calibration needs at least two keeps")
        for k in self.keeps:
            check_keep(k)
        if self.n_prompts <= 0 or self.tokens <= 0:
            raise IFPError("--n-prompts and --tokens must be positive")


def calibrate(model, tokenizer, predictor: str, cfg: CalibrationConfig, progress=True) -> Curve:
    """Measure the curve of ``predictor`` on the calibration split (see module docstring)."""
    from tqdm import tqdm

    from .eval import data
    from .eval.methods import Method
    from .eval.metrics import fidelity, fidelity_cases
    from .model import dequantize

    cfg.check()
    if cfg.dequantize:
        dequantize(model)
    pairs, ids = data.chat_pairs(tokenizer, SPLIT, cfg.n_prompts, cfg.max_prompt, cfg.tokens)
    if not pairs:
        raise IFPError("no calibration prompts found in the calib split")
    dense = Method("dense", model, lambda: [])
    eos = set(tokenizer.eos_token_ids)
    cases = fidelity_cases(dense, [p for p, _ in pairs], cfg.tokens, eos)
    method = Method(f"ifp-{predictor}", model, lambda: [])
    keeps = sorted(set(float(k) for k in cfg.keeps) | {1.0})
    kl, agree = [], []
    for keep in tqdm(keeps, desc=f"ifp-calibrate {predictor}", disable=not progress):
        if keep == 1.0:
            a, b = 0.0, 1.0  # keep 1 is the dense model, bit for bit (tested)
        else:
            a, b = fidelity(method, cases, keep)
        kl.append(a)
        agree.append(b)
    model.dense()
    return Curve(keeps, kl, agree, len(cases), cfg.tokens, SPLIT, ids)


def calib_answers(model, tokenizer, predictor: str, keeps: List[float], n: int,
                  max_tokens: int = 64, progress=None) -> dict:  # fmt: skip
    """What a user reads at some keeps, on the ``calib`` half of the short-answer set: of the
    questions dense answers right, the share still right; of the answers dense ends, the share
    that end; the share that loop; answer length vs dense (``ifp_mlx.eval.answers``)."""
    from .eval.answers import compare, run_settings, short_answers

    qs = short_answers(SPLIT)[:n]
    settings = {k: {"keep": k, "predictor": predictor} for k in keeps if k < 1.0}
    runs = run_settings(model, tokenizer, [q.q for q in qs], {"dense": {"keep": 1.0}, **settings},
                        max_tokens, progress)  # fmt: skip
    rows = {k: compare(runs["dense"], runs[k], [q.need for q in qs]) for k in settings}
    return {
        "keeps": list(rows),
        "right": [m.right for m in rows.values()],
        "ends": [m.ends for m in rows.values()],
        "loops": [m.loops for m in rows.values()],
        "length": [m.length_ratio for m in rows.values()],
        "questions": len(qs),
        "max_tokens": max_tokens,
    }
