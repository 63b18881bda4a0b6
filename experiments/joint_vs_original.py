"""A jointly trained folder (``ifp-train --stage 2``) against the model it was trained from, per
token: KL to the *original* dense model on the original's own greedy answers (``ifp-eval``'s
fidelity cases, held-out ShareGPT prompts), for the joint model dense and pruned by its head,
beside the original's own head and its default activation predictor at the same keep.
(``ifp-eval --model JOINT`` gives the KL to the joint model's own dense.)

    python experiments/joint_vs_original.py --original DIR --joint DIR-joint --keep 0.5 \\
        --out results/joint-vs-original-smollm2-8bit.json
"""

import argparse
import json
import time
from pathlib import Path

from ifp_mlx import load
from ifp_mlx.eval.methods import COMP, Method
from ifp_mlx.eval.metrics import fidelity, fidelity_cases
from ifp_mlx.eval.runner import EvalConfig, Suite
from ifp_mlx.model import dequantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", required=True, help="the folder the joint model came from")
    p.add_argument("--joint", required=True, help="the jointly trained folder")
    p.add_argument("--keep", type=float, default=0.5, help="keep of the pruned rows")
    p.add_argument("--n", type=int, default=12, help="held-out prompts (ifp-eval's fidelity)")
    p.add_argument("--out", required=True, help="JSON written here")
    args = p.parse_args()
    tic = time.perf_counter()
    cfg = EvalConfig(n_fidelity=args.n)
    original, tok = load(args.original, ffn_store="memory")
    dequantize(original)  # float copies, as ifp-eval --dequantize (the joint folder is float)
    suite = Suite(tok, cfg)
    dense = Method("dense", original, suite.calibration)
    eos = set(tok.eos_token_ids)
    cases = fidelity_cases(dense, suite.fidelity_prompts(), cfg.fidelity_tokens, eos)
    rows = {}
    for name, label in ((COMP, "original, activation + compensation"),
                        ("ifp-learned", "original, its own learned head")):  # fmt: skip
        kl, agree = fidelity(Method(name, original, suite.calibration), cases, args.keep)
        rows[label] = {"keep": args.keep, "kl_to_original": kl, "top1_agree": agree}
    joint, _ = load(args.joint, ffn_store="memory")
    for name, keep, label in (("dense", 1.0, "joint, dense"),
                              ("ifp-learned", args.keep, "joint, its learned head")):  # fmt: skip
        kl, agree = fidelity(Method(name, joint, suite.calibration), cases, keep)
        rows[label] = {"keep": keep, "kl_to_original": kl, "top1_agree": agree}
    out = {"original": Path(args.original).name, "joint": Path(args.joint).name,
           "cases": len(cases), "answer_tokens": cfg.fidelity_tokens, "rows": rows,
           "seconds": time.perf_counter() - tic}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for label, r in rows.items():
        print(f"{label:40s} keep {r['keep']:.2f}  KL to the original dense {r['kl_to_original']:.3f}"
              f"  top-1 agree {100 * r['top1_agree']:.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
