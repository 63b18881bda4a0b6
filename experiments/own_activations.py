"""Scoring on the quantized model's own activations vs on the float model's.

    python experiments/own_activations.py QUANTIZED_DIR FLOAT_DIR [OUT_JSON]

The activation predictor scores units on the model as loaded, so a 4-bit model is pruned by
its own (quantized) activations. The alternative: score on the float model of the same source
(same unit order) and apply those units to the quantized one. Both are measured here on the
same held-out prompts (fidelity: KL / agreement to the quantized model's own dense answers).

Feeds docs/quality.md ("Every free gain, measured": scoring on own activations).
"""

import json
import sys
from pathlib import Path

from mlx_lm.models.cache import make_prompt_cache

import ifp_mlx
from ifp_mlx.eval import data
from ifp_mlx.eval.methods import Method
from ifp_mlx.eval.metrics import continue_logits, fidelity_cases, kl_agreement
from ifp_mlx.model import dequantize
from ifp_mlx.selection import Selection

KEEPS = (0.7, 0.5)


def main(quantized: str, float_dir: str, out: str = "") -> dict:
    qm, tok = ifp_mlx.load(quantized)
    fm, _ = ifp_mlx.load(float_dir)
    dequantize(qm)  # same values, fast float kernels on CPU
    prompts = [p for p, _ in data.chat_pairs(tok, "test", 12, 192, 96)[0]]
    cases = fidelity_cases(Method("dense", qm, list), prompts, 48, set(tok.eos_token_ids))
    rows = []
    for keep in KEEPS:
        for source, scorer in (("own (quantized)", qm), ("float model", fm)):
            kls, agrees = [], []
            for c in cases:
                sel = scorer.select(c.prompt, keep=keep, predictor="activation")
                qm.apply_selection(Selection(sel.indices, sel.units, "activation"))
                logits = continue_logits(qm, make_prompt_cache(qm), 0, c.prompt, c.answer)
                kl, agree = kl_agreement(c.dense_logits, logits)
                kls.append(kl)
                agrees.append(agree)
            row = {"keep": keep, "scored_on": source, "fidelity_kl": sum(kls) / len(kls),
                   "fidelity_agree": sum(agrees) / len(agrees)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    result = {"model": Path(quantized).name, "float": Path(float_dir).name, "rows": rows}
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
