"""Static compensation for the learned predictor (no dense prefill, so no prompt means):
fold each dropped unit's *calibration* mean activation into a bias after down_proj.

    python experiments/compensation_static.py [MODEL_DIR] [PREDICTOR]

Measured on the bundled 4-bit model (default here), learned predictor, 12 held-out prompts,
KL to dense / agreement: keep 0.5 1.170 / 58.9 % plain vs 1.268 / 58.5 % compensated; 0.6
0.780 vs 0.786; 0.7 0.581 vs 0.551; 0.8 0.402 vs 0.380. It loses at the keeps that matter, so it
is not in the runtime.

Feeds docs/quality.md ("Every free gain, measured": static compensation).
"""

import sys
import time

import mlx.core as mx
import numpy as np

from ifp_mlx import load
from ifp_mlx.bundled import default_model
from ifp_mlx.eval import data
from ifp_mlx.eval.methods import Method
from ifp_mlx.eval.metrics import answer_logits, fidelity, fidelity_cases, kl_agreement
from ifp_mlx.model import dequantize, find_ffns, tap_ffns

folder = sys.argv[1] if len(sys.argv) > 1 else str(default_model(4))
model, tok = load(folder)
dequantize(model)
calib = lambda: [p + a for p, a in data.chat_pairs(tok, "calib", 32, 192, 96)[0]]
# static mean activation per unit over calibration tokens
model.dense()
sums, n = None, 0
with tap_ffns(model, reduce=lambda x: x.astype(mx.float32).sum(axis=(0, 1))) as rec:
    for t in calib():
        model(mx.array(t)[None])
        part = [r.pop() for r in rec]
        sums = part if sums is None else [a + b for a, b in zip(sums, part)]
        n += len(t)
        mx.eval(sums)
means = [s / n for s in sums]
downs = [m.down_proj.weight for _, m in find_ffns(model)]
full_c = [m @ d for m, d in zip(means, downs)]
mx.eval(full_c)
eos = set(tok.eos_token_ids)
dense = Method("dense", model, calib)
prompts = [p for p, _ in data.chat_pairs(tok, "test", 12, 192, 96)[0]]
cases = fidelity_cases(dense, prompts, 48, eos)
pred = sys.argv[2] if len(sys.argv) > 2 else None
m = Method("ifp-" + (pred or model.default_predictor), model, calib)
orig_prepare = m.prepare


def comp_prepare(prompt, answer, keep):
    cache, k = orig_prepare(prompt, answer, keep)
    sel = model.selection
    for i, mlp in enumerate(model.__dict__["_ifp_mlps"]):
        idx = mx.array(sel.indices[i])
        b = full_c[i] - means[i][idx] @ downs[i][idx]
        mlp.down_proj.bias = b
    return cache, k


for keep in [0.5, 0.6, 0.7, 0.8]:
    m.prepare = orig_prepare
    kl, ag = fidelity(m, cases, keep)
    m.prepare = comp_prepare
    kl2, ag2 = fidelity(m, cases, keep)
    print(
        f"keep {keep}: plain KL {kl:.3f} agree {ag:.3f} | static-comp KL {kl2:.3f} agree {ag2:.3f}",
        flush=True,
    )
