"""Why pruned answers don't end: P(end of turn) where the dense model ends, per keep
(README, "Answers as a user reads them"). Teacher-forced on dense's own greedy answers to the
calib half of the short-answer set, with the folder's settings (protected layers, compensation).

python experiments/end_probability.py [--model DIR] [--n 48] --out results/end-probability-X.json

Feeds docs/quality.md (P(end of turn) per keep).
"""

import argparse
import json

import mlx.core as mx

import ifp_mlx
from ifp_mlx.eval.answers import short_answers
from ifp_mlx.eval.methods import Method
from ifp_mlx.eval.metrics import answer_logits, fidelity_cases
from ifp_mlx.generate import prompt_tokens
from ifp_mlx.model import dequantize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--keeps", default="1,0.95,0.9,0.85,0.8,0.68,0.5")
    p.add_argument("--out")
    a = p.parse_args()
    model, tok = ifp_mlx.load(a.model)
    dequantize(model)  # the same values, fast on CPU
    prompts = [prompt_tokens(tok, q.q) for q in short_answers("calib")[: a.n]]
    dense = Method("dense", model, lambda: [])
    cases = [c for c in fidelity_cases(dense, prompts, 64, set(tok.eos_token_ids)) if c.ended]
    rows = {}
    for keep in [float(k) for k in a.keeps.split(",")]:
        method = Method("ifp-activation", model, lambda: [])
        probs, argmax = [], []
        for c in cases:
            logits = (
                c.dense_logits[-1]
                if keep == 1.0
                else answer_logits(method, c.prompt, c.answer, keep)[-1]
            )
            probs.append(mx.softmax(logits)[c.answer[-1]].item())
            argmax.append(int(mx.argmax(logits).item()) == c.answer[-1])
        rows[keep] = {"p_end": sum(probs) / len(probs), "end_is_top1": sum(argmax) / len(argmax)}
        print(
            f"keep {keep:4.2f}: P(end) {rows[keep]['p_end']:.3f}, end is the top token "
            f"{rows[keep]['end_is_top1']:.0%} ({len(cases)} answers dense ends)",
            flush=True,
        )
    if a.out:
        name = a.model.rstrip("/").split("/")[-1] if a.model else "SmolLM2-135M-Instruct-8bit"
        json.dump(
            {"model": name, "split": "calib", "cases": len(cases), "rows": rows},
            open(a.out, "w"),
            indent=1,
        )


if __name__ == "__main__":
    main()
