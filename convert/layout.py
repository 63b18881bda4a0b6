"""Optional reordering of FFN units so units that fire together sit next to each other.

A permutation of units (rows of gate/up, rows of unit-major down) leaves the model's function
unchanged; it only makes block-granular selection and contiguous gathers more effective.
"""

from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model import find_ffns, tap_ffns


def calibration_activations(model: nn.Module, tokens: List[int]) -> List[np.ndarray]:
    """Per layer, the (tokens × units) activation magnitudes over the calibration text."""
    with tap_ffns(model) as records:
        mx.eval(model(mx.array(tokens)[None]))
    return [np.abs(np.array(r[0][0].astype(mx.float32))) for r in records]


def coactivation_order(acts: np.ndarray) -> np.ndarray:
    """Spectral seriation: sort units by the Fiedler vector of their co-activation graph."""
    a = acts - acts.mean(0)
    a /= np.linalg.norm(a, axis=0) + 1e-8
    affinity = np.clip(a.T @ a, 0.0, None)
    np.fill_diagonal(affinity, 0.0)
    laplacian = np.diag(affinity.sum(1)) - affinity
    _, vecs = np.linalg.eigh(laplacian.astype(np.float64))
    return np.argsort(vecs[:, 1], kind="stable")


def permute_units(model: nn.Module, orders: List[np.ndarray]) -> None:
    """Reorder the units of every FFN in place (float weights, before quantization)."""
    for (_, mlp), order in zip(find_ffns(model), orders):
        idx = mx.array(order.astype(np.int32))
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight = proj.weight[idx]
            if "bias" in proj:
                proj.bias = proj.bias[idx]
        mlp.down_proj.weight = mlp.down_proj.weight[idx]
    mx.eval(model.parameters())
