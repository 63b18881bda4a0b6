"""The learned sparsity predictor (IFPruning, arXiv 2501.02086).

An encoder reads the prompt — by default the target model's own embeddings and first
``encoder_layers`` layers, so there are no extra encoder weights and the tokenizer is shared —
and its mean-pooled and last-token hidden states go through an MLP head (2d → hidden → Σ units)
that scores every FFN unit of every layer. Scores are standardized per layer, so one SoftTopK
temperature fits all layers. The features are standardized too, per dimension, with the
training prompts' statistics: a hidden state is dominated by a few large dimensions that are
the same for every prompt (≈ 99 % of the energy of SmolLM2's layer-2 state), and a head fed
raw states sees nearly one input and learns one static mask for all prompts. Selection costs
``encoder_layers`` of the model's layers instead of a dense prefill; the pruned model then
prefills the prompt itself.
"""

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import IFPError
from ..paths import inside
from .base import Scores, register

WEIGHTS = "predictor.safetensors"


@dataclass
class PredictorConfig:
    units: List[int]  # FFN units per layer of the target model
    hidden_size: int  # the encoder's hidden size
    encoder_layers: int = 2
    hidden: int = 128
    recipe: dict = field(default_factory=dict)  # how it was trained (informational)

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class PredictorHead(nn.Module):
    """Pooled prompt features → per-layer standardized unit scores."""

    STATS = ("feature_mean", "feature_std")  # fixed, not trained (identity unless fitted)

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_mean = mx.zeros((2 * cfg.hidden_size,))
        self.feature_std = mx.ones((2 * cfg.hidden_size,))
        self.fc1 = nn.Linear(2 * cfg.hidden_size, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, sum(cfg.units))
        self.freeze(keys=list(self.STATS), recurse=False)

    def normalize(self, features: mx.array) -> mx.array:
        d = self.cfg.hidden_size
        return mx.concatenate([_rms(features[..., :d]), _rms(features[..., d:])], axis=-1)

    def fit_features(self, features: mx.array) -> None:
        """Standardize with these (training) prompts' per-dimension mean and std."""
        x = self.normalize(features.astype(mx.float32))
        self.feature_mean = x.mean(0)
        self.feature_std = mx.maximum(x.std(0), 1e-3)
        mx.eval(self.feature_mean, self.feature_std)

    def __call__(self, features: mx.array) -> List[mx.array]:
        """features (..., 2d) → list over layers of (..., units_l) z-scored scores."""
        x = (self.normalize(features) - self.feature_mean) / self.feature_std
        flat = self.fc2(nn.gelu(self.fc1(x)))
        out, start = [], 0
        for n in self.cfg.units:
            s = flat[..., start : start + n]
            start += n
            mu = s.mean(-1, keepdims=True)
            out.append((s - mu) / (mx.sqrt(((s - mu) ** 2).mean(-1, keepdims=True)) + 1e-5))
        return out


def _rms(x: mx.array) -> mx.array:
    return x * mx.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)


class _Stop(Exception):
    def __init__(self, h):
        self.h = h


def _catcher(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` whose call raises :class:`_Stop` with its input (the family's
    model loop may read attributes of the layer, e.g. ``use_sliding``: they stay intact)."""

    def stop(self, h, *args, **kwargs):
        raise _Stop(h)

    catcher = copy.copy(layer)
    catcher.__class__ = type(f"Stop{type(layer).__name__}", (type(layer),), {"__call__": stop})
    return catcher


def encode(model: nn.Module, tokens, layers: int) -> mx.array:
    """Mean-pooled and last-token hidden states after the first ``layers`` layers, (B, 2d).

    Runs the model's own forward pass and stops it at layer ``layers`` (family-agnostic: any
    mlx-lm model that loops over ``model.model.layers``); ``tokens`` is a list or a (B, T) array
    of equal-length prompts.
    """
    inner = model.model
    full = inner.layers
    x = mx.array(tokens)
    if x.ndim == 1:
        x = x[None]
    if not 0 <= layers < len(full):
        raise IFPError(f"encoder_layers must be in [0, {len(full) - 1}], not {layers}")
    inner.layers = full[:layers] + [_catcher(full[layers])]
    try:
        model(x)
        raise AssertionError("the encoder did not reach its stop layer")
    except _Stop as stop:
        h = stop.h.astype(mx.float32)
    finally:
        inner.layers = full
    return mx.concatenate([h.mean(1), h[:, -1]], axis=-1)


WEIGHT_KEYS = ("source", "dtype", "quantization", "permuted_units")


def weights_of(ifp: dict) -> dict:
    """The weights a head is trained on, as a folder's ``ifp`` block names them: source
    checkpoint, dtype, quantization (bits, group size, down_proj's bits) and unit order. A head
    learns what *these* weights need: on other ones it selects worse (measured: the head trained
    on the 4-bit SmolLM2 loses to the activation predictor on the 8-bit weights)."""
    return {k: ifp.get(k) for k in WEIGHT_KEYS}


def describe_weights(w: dict) -> str:
    q = w.get("quantization") or {}
    kind = f"{q.get('bits')}-bit g{q.get('group_size')}" if q.get("bits") else str(w.get("dtype"))
    if q.get("down_proj_bits"):
        kind += f" (down_proj {q['down_proj_bits']}-bit)"
    return f"{kind} {w.get('source')}" + (" with permuted units" if w.get("permuted_units") else "")


def foreign(entry: dict, ifp: dict) -> Optional[str]:
    """Why the head of ``entry`` does not belong to the folder's weights (None: it does, or it
    predates ``trained_on`` and only its shape can be checked)."""
    trained = entry.get("trained_on")
    if trained is None:
        return None
    if not isinstance(trained, dict):
        raise IFPError("the ifp.predictor entry is damaged (trained_on is not an object)")
    mine = weights_of(ifp)
    if {k: trained.get(k) for k in WEIGHT_KEYS} == mine:
        return None
    return (f"its learned predictor was trained on {describe_weights(trained)} weights, this "
            f"folder holds {describe_weights(mine)} weights")  # fmt: skip


def save(head: PredictorHead, folder: Path) -> dict:
    """Write the head beside the model; returns the ``ifp.predictor`` config entry."""
    mx.save_safetensors(str(Path(folder) / WEIGHTS), dict(_flat(head)))
    return {"type": "learned", "file": WEIGHTS, **asdict(head.cfg)}


def _flat(module: nn.Module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def load_head(folder: Path, entry: dict) -> PredictorHead:
    try:
        cfg = PredictorConfig.from_dict(entry)
        head = PredictorHead(cfg)
    except (TypeError, ValueError, AttributeError) as e:
        raise IFPError(f"{folder}: the ifp.predictor entry is damaged ({str(e)[:120]})")
    path = inside(Path(folder), entry.get("file", WEIGHTS), "predictor file")
    if not path.is_file():
        raise IFPError(f"{folder}: the learned predictor's weights {path.name} are missing")
    try:
        weights = mx.load(str(path))
        for k in PredictorHead.STATS:  # heads saved before feature standardization
            weights.setdefault(k, getattr(head, k))
        head.load_weights(list(weights.items()), strict=True)
    except (ValueError, RuntimeError) as e:
        raise IFPError(f"{path}: does not match its config ({str(e).splitlines()[0][:160]})")
    head.set_dtype(mx.float32)  # shipped heads may be stored in float16
    mx.eval(head.parameters())
    return head


@register
class LearnedPredictor:
    """Scores from the head that ``ifp_mlx.load`` found in the model folder."""

    name = "learned"

    def __init__(self, head: Optional[PredictorHead] = None):
        self.head = head

    def score(self, model: nn.Module, tokens: List[int], cache) -> Scores:
        head = self.head or model.__dict__.get("_ifp_predictor")
        if head is None:
            refused = model.__dict__.get("_ifp_foreign_predictor")
            raise IFPError(refused or "this model folder has no learned predictor (train one: ifp-train)")  # fmt: skip
        if head.cfg.units != model.ffn_units:
            raise IFPError("the learned predictor was trained for a different model")
        feats = encode(model, tokens, head.cfg.encoder_layers)
        return Scores([s[0] for s in head(feats)], 0)
