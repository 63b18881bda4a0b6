"""What a keep means: budgets per layer, the calibrated curve keep → KL, and resolving a
request (a fraction, a per-layer list, ``"auto"`` or a quality target) into a budget.

Measuring the curve is ``calibrate``'s (it runs the evaluation); reading it is here, beneath
selection and generation, so the runtime never imports the evaluation code.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import IFPError

DEFAULT_MAX_KL = 0.5  # keep="auto" without a target (and the default of calibrated folders)
SPLIT = "calib"  # the prompts calibration measures on (quality is reported on "test")

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


@dataclass
class Curve:
    """KL(dense ‖ pruned) and top-1 agreement at measured keeps (ascending, 1.0 included)."""

    keeps: List[float]
    kl: List[float]
    agree: List[float]
    prompts: int = 0
    tokens: int = 0
    split: str = SPLIT
    ids: List[str] = field(default_factory=list)  # which calibration prompts were used
    answers: Optional[dict] = None  # free-running answer metrics at some keeps (calib_answers)

    @classmethod
    def from_dict(cls, d: dict) -> "Curve":
        try:
            curve = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
            keeps = [float(k) for k in curve.keeps]
            kl = [float(v) for v in curve.kl]
        except (KeyError, TypeError, ValueError):
            raise IFPError("the folder's ifp.calibration entry is damaged: rerun ifp-calibrate")
        if len(keeps) < 2 or len(kl) != len(keeps) or keeps != sorted(keeps) or keeps[-1] != 1.0:
            raise IFPError("the folder's ifp.calibration entry is damaged: rerun ifp-calibrate")
        return curve

    def to_dict(self) -> dict:
        return asdict(self)

    def envelope(self) -> np.ndarray:
        """KL made non-increasing in keep, conservatively: each keep counts the worst KL measured
        at it or any larger keep, so a lucky dip never makes a too-small keep look good enough
        and "the smallest keep within T" is well defined."""
        kl = np.asarray(self.kl, np.float64)
        return np.maximum.accumulate(kl[::-1])[::-1]

    def expected_kl(self, keep: float) -> float:
        """Calibrated KL at ``keep`` (linear between measured keeps; below the grid: its end)."""
        return float(np.interp(keep, self.keeps, self.envelope()))

    def keep_for(self, max_kl: float) -> float:
        """The smallest keep whose calibrated KL is ≤ ``max_kl``."""
        keeps, kl = np.asarray(self.keeps, np.float64), self.envelope()
        if kl[0] <= max_kl:
            return float(keeps[0])  # never extrapolate below what was measured
        i = int(np.nonzero(kl <= max_kl)[0][0])  # kl[-1] (keep 1.0) is 0: always found
        k0, k1, v0, v1 = keeps[i - 1], keeps[i], kl[i - 1], kl[i]
        t = (v0 - max_kl) / (v0 - v1) if v0 > v1 else 1.0
        return float(min(1.0, k0 + t * (k1 - k0)))


def check_protect(protect, layers: int) -> Tuple[int, int]:
    """``(first, last)``: FFN layers always kept whole (``ifp.protect``)."""
    try:
        first, last = (int(v) for v in protect)
    except (TypeError, ValueError):
        raise IFPError(f"protect must be two layer counts (first, last), not {protect!r}")
    if first < 0 or last < 0 or first + last >= layers:
        raise IFPError(
            f"protect {first},{last} must leave some of the {layers} FFN layers to prune"
        )
    return first, last


def protected_budget(keep: float, protect, layers: int) -> Union[float, List[float]]:
    """A mean keep as a per-layer budget whose first/last layers are kept whole.

    The first and last FFN layers of a small model matter most to what it answers (measured on
    SmolLM2 with the activation predictor: first 2 + last 2 whole at a mean keep of 0.6 gave a
    held-out KL of 0.89 instead of 1.43), so a folder may protect them; the rest share what is
    left of the mean (at least 1 %).
    """
    if protect is None or keep >= 1.0:
        return keep
    first, last = check_protect(protect, layers)
    rest = layers - first - last
    inner = min(1.0, max(0.01, (keep * layers - first - last) / rest))
    return [1.0] * first + [inner] * rest + [1.0] * last


def check_max_kl(max_kl) -> float:
    try:
        value = float(max_kl)
    except (TypeError, ValueError):
        raise IFPError(f"max_kl must be a positive number of nats, not {max_kl!r}")
    if not value > 0 or value == float("inf"):
        raise IFPError(f"max_kl must be a positive number of nats, not {max_kl}")
    return value


def curves(ifp_config: dict) -> Dict[str, dict]:
    entry = ifp_config.get("calibration")
    return entry if isinstance(entry, dict) else {}


def curve_of(model, predictor: str) -> Optional[Curve]:
    """The folder's calibrated curve for ``predictor`` (a registered name), or None."""
    d = curves(model.__dict__.get("_ifp_config", {})).get(predictor)
    return Curve.from_dict(d) if d is not None else None


@dataclass
class Choice:
    """What a request's keep / predictor / max_kl resolve to for one model."""

    keep: object  # Budget: a fraction or a per-layer list
    predictor: object  # a registered name or a predictor object
    expected_kl: Optional[float] = None  # calibrated KL at this keep (None: not calibrated)
    max_kl: Optional[float] = None  # the quality target it was chosen for (keep="auto")
    mean: Optional[float] = None  # the mean keep a protected per-layer budget stands for


def resolve(model, keep=None, predictor=None, max_kl=None) -> Choice:
    """Turn a request into a concrete budget.

    ``keep``: a fraction, a per-layer list, ``"auto"`` (smallest calibrated keep within
    ``max_kl``), or None: the folder's searched budget, else ``"auto"`` when the folder is
    calibrated for this predictor (at its ``ifp.default_max_kl``, else ``DEFAULT_MAX_KL``), else
    0.5. ``max_kl`` alone means ``keep="auto"``. A fraction is the *mean* keep: a folder with
    ``ifp.protect`` keeps its first/last FFN layers whole (``protected_budget``); with
    ``ifp.compensate`` the activation predictor folds the dropped units' mean output into a bias.
    """
    predictor = model.default_predictor if predictor is None else predictor
    name = predictor if isinstance(predictor, str) else None
    curve = curve_of(model, name) if name else None
    ifp = model.__dict__.get("_ifp_config", {})
    if name == "activation" and ifp.get("compensate"):  # the folder measured it a win
        from .predictors.activation import ActivationPredictor

        predictor = ActivationPredictor(compensate=True)
    if max_kl is not None:
        max_kl = check_max_kl(max_kl)
        if keep not in (None, "auto"):
            raise IFPError("max_kl chooses the keep itself: pass keep='auto' (or no keep)")
        keep = "auto"
    layers, protect = len(model.ffn_units), ifp.get("protect")
    if keep is None:
        if ifp.get("budget"):
            return Choice(ifp["budget"], predictor)
        if curve is None:
            return Choice(protected_budget(0.5, protect, layers), predictor, mean=0.5)
        keep = "auto"
    if isinstance(keep, str):
        if keep != "auto":
            raise IFPError(
                f"keep must be a number in (0, 1], a per-layer list or 'auto', not {keep!r}"
            )
        if curve is None:
            raise IFPError(
                f"keep 'auto' needs a calibrated model: this folder has no calibration for the "
                f"{name or 'given'} predictor (run: ifp-calibrate --model FOLDER"
                + (f" --predictor {name})" if name else ")")
            )
        target = (
            max_kl
            if max_kl is not None
            else check_max_kl(ifp.get("default_max_kl", DEFAULT_MAX_KL))
        )
        chosen = curve.keep_for(target)
        budget = protected_budget(chosen, protect, layers)
        return Choice(budget, predictor, curve.expected_kl(chosen), target, chosen)
    if not isinstance(keep, (int, float)):
        return Choice(keep, predictor)  # an explicit per-layer list is used as given
    keep = check_keep(keep)
    expected = curve.expected_kl(keep) if curve is not None else None
    return Choice(protected_budget(keep, protect, layers), predictor, expected, None, keep)
