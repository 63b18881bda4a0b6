"""Answer metrics of several settings vs dense on the short-answer set (README quality table).

python experiments/answers_sweep.py --model DIR --split test --settings default,k0.8,k0.9 --out results/answers-X.json
Quality is measured on float copies of the weights (--dequantize: same values, fast on CPU);
time ratios come from ``ifp-bench answers`` on the weights as shipped.

Feeds docs/quality.md (the calib and test answer tables).
"""

import argparse
import json
import sys

import ifp_mlx
from ifp_mlx.eval.answers import compare, run_settings, short_answers, to_dict
from ifp_mlx.model import dequantize


def parse(name: str) -> dict:
    if name == "dense":
        return {"keep": 1.0}
    if name == "default":
        return {}
    kw = {}
    for part in name.split("+"):
        if part.startswith("k"):
            kw["keep"] = float(part[1:])
        elif part.startswith("kl"):
            kw["max_kl"] = float(part[2:])
        elif part in ("activation", "learned"):
            kw["predictor"] = part
        elif part.startswith("r"):
            kw["rescore"] = int(part[1:])
        elif part.startswith("h"):
            kw["dense_head"] = int(part[1:])
    return kw


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--split", default="test")
    p.add_argument("--settings", default="default")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    model, tok = ifp_mlx.load(a.model)
    if a.dequantize:
        dequantize(model)
    qs = short_answers(a.split)
    if a.limit:
        qs = qs[: a.limit]
    names = ["dense"] + [s for s in a.settings.split(",") if s != "dense"]
    settings = {n: parse(n) for n in names}
    res = run_settings(
        model,
        tok,
        [q.q for q in qs],
        settings,
        a.max_tokens,
        progress=lambda i, n: print(f"{i}/{n}", file=sys.stderr, flush=True),
    )
    out = {
        "model": a.model and a.model.rstrip("/").split("/")[-1],
        "split": a.split,
        "max_tokens": a.max_tokens,
        "rows": {},
        "answers": {},
    }
    for n in names:
        m = compare(res["dense"], res[n], [q.need for q in qs], [q.id for q in qs])
        out["rows"][n] = {k: v for k, v in to_dict(m).items() if k != "ids"}
        out["answers"][n] = [x.text for x in res[n]]
        r = out["rows"][n]
        print(
            f"{n:>16} keep {r['keep']:.2f} right {r['right']:.1%} acc {r['accuracy']:.1%} "
            f"(dense {r['dense_accuracy']:.1%}) ends {r['ends']:.1%} loops {r['loops']:.1%} "
            f"len {r['length_ratio']:.2f} time {r['time_ratio']:.2f} f1 {r['f1']:.2f}",
            flush=True,
        )
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
