"""Import a sparsity predictor trained in torch, so torch-trained predictors can ship.

The torch side is a state dict (``.pt``/``.bin``, read with ``weights_only=True``, or
``.safetensors``) holding ``fc1.weight/bias`` (hidden × 2d) and ``fc2.weight/bias`` (Σ units ×
hidden) — an ``nn.Sequential(Linear, GELU, Linear)`` saved as ``0.*``/``2.*`` works too — plus a
small JSON config ``{"encoder_layers": k, "hidden": 128}``; optional ``feature_mean`` and
``feature_std`` (2d) standardize the normalized features before fc1. Its forward must be the one of
:class:`ifp_mlx.predictors.learned.PredictorHead`: features = [mean, last] hidden state after
k layers, each half RMS-normalized, standardized, fc1 → exact GELU → fc2, then z-scored per layer.
"""

from pathlib import Path
from typing import List

from ..errors import IFPError, read_json
from ..predictors.learned import PredictorConfig, PredictorHead
from .readers import load_weight_file

ALIASES = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "2.weight": "fc2.weight",
           "2.bias": "fc2.bias"}  # fmt: skip


def import_predictor(
    state_path: Path, config_path: Path, units: List[int], hidden_size: int
) -> PredictorHead:
    state_path, config_path = Path(state_path), Path(config_path)
    if not state_path.is_file():
        raise IFPError(f"predictor weights {state_path} do not exist")
    raw = read_json(config_path, "predictor config")
    weights = {ALIASES.get(k, k): v for k, v in load_weight_file(state_path).items()}
    weights = {k.removeprefix("head."): v for k, v in weights.items()}
    need = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    if not need <= set(weights) <= need | set(PredictorHead.STATS):
        raise IFPError(f"{state_path}: expected tensors {sorted(need)}, found {sorted(weights)}")
    hidden = int(raw.get("hidden", weights["fc1.weight"].shape[0]))
    cfg = PredictorConfig(units, hidden_size, int(raw.get("encoder_layers", 2)), hidden)
    cfg.recipe = {"imported_from": state_path.name, **raw.get("recipe", {})}
    head = PredictorHead(cfg)
    expect = {k: v.shape for k, v in _shapes(head).items()}
    for k in PredictorHead.STATS:
        weights.setdefault(k, getattr(head, k))
    for k, shape in expect.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise IFPError(
                f"{state_path}: {k} has shape {tuple(weights[k].shape)}, this model needs "
                f"{tuple(shape)} (units {sum(units)}, hidden size {hidden_size})"
            )
    head.load_weights([(k, v.astype(head.fc1.weight.dtype)) for k, v in weights.items()])
    return head


def _shapes(head: PredictorHead) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(head.parameters()))
