"""``ifp-eval``: dense vs static vs per-prompt pruning on real data, one run → JSON + plots."""

import argparse
from pathlib import Path

from ..errors import IFPError, write_json
from .common import MODEL_HELP, cli_errors, make_parser, model_name

LABELS = [  # (result key, header, format)
    ("chat_loss", "chat loss", "{:9.3f}"),
    ("fidelity_kl", "KL", "{:6.3f}"),
    ("fidelity_agree", "agree", "{:6.1%}"),
    ("end_prob", "P(end)", "{:6.3f}"),
    ("answers_right", "right", "{:6.1%}"),
    ("answers_ends", "ends", "{:6.1%}"),
    ("answers_loops", "loops", "{:6.1%}"),
    ("answers_length", "length", "{:6.2f}"),
    ("answers_time", "time", "{:5.2f}"),
    ("answers_f1", "F1", "{:5.2f}"),
    ("mmlu_acc", "MMLU", "{:6.1%}"),
    ("humaneval_pass1", "HumanEval", "{:9.1%}"),
    ("text_ppl", "text ppl", "{:8.2f}"),
    ("select_ms", "select ms", "{:9.1f}"),
    ("mask_diversity", "diversity", "{:9.3f}"),
]


def _floats(text: str):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}")


def _names(text: str):
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    from ..eval.runner import METRICS

    p = make_parser("ifp-eval", __doc__)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--methods", type=_names, help="comma list (default: all available)")
    p.add_argument("--metrics", type=_names,
                   help=f"comma list of {', '.join(METRICS)} (default: all)")  # fmt: skip
    p.add_argument("--keeps", type=_floats, help="comma list (default 1,0.75,0.5,0.33,0.25)")
    p.add_argument("--max-kls", type=_floats,
                   help="also rows at keep auto for these KL targets (needs ifp-calibrate; default: none)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    p.add_argument("--dequantize", action="store_true",
                   help="quality metrics on float copies of quantized weights (same values; "
                   "much faster on CPU); speed is always measured on the model as loaded")  # fmt: skip
    p.add_argument("--n-chat", type=int, help="chat-loss: ShareGPT test prompts (default 24)")
    p.add_argument("--n-fidelity", type=int,
                   help="fidelity: prompts whose dense answers are compared (default 12)")  # fmt: skip
    p.add_argument("--n-humaneval", type=int, help="humaneval: problems run (default 8)")
    p.add_argument("--mmlu-limit", type=int, help="mmlu: questions at most (default 57)")
    p.add_argument("--n-text", type=int, help="text: held-out passages (default 8)")
    p.add_argument("--n-answers", type=int,
                   help="answers: short questions with gold answers (default 48)")  # fmt: skip
    p.add_argument("--n-open", type=int, help="answers: open ShareGPT prompts (default 8)")
    p.add_argument("--answer-tokens", type=int, help="answers: token limit (default 64)")
    p.add_argument("--rescore", type=int,
                   help="answers: reselect every N answer tokens (activation methods; default 0: off)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and data order")
    p.add_argument("--out", default="results/eval", help="results folder (JSON + PNG)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    with cli_errors("ifp-eval"):
        run(args)


def run(args) -> None:
    from .. import load
    from ..eval.plots import plot
    from ..eval.runner import EvalConfig, check_config, evaluate

    kw = {"seed": args.seed, "dequantize": args.dequantize}
    for flag in ("methods", "metrics", "keeps", "max_kls", "n_chat", "n_fidelity", "n_humaneval",
                 "mmlu_limit", "n_text", "n_answers", "n_open", "answer_tokens", "rescore"):  # fmt: skip
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    for flag in ("n_chat", "n_fidelity", "n_humaneval", "mmlu_limit", "n_text", "answer_tokens"):
        if kw.get(flag, 1) <= 0:
            raise IFPError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("n_answers", "n_open", "rescore"):
        if kw.get(flag, 0) < 0:
            raise IFPError(f"--{flag.replace('_', '-')} must be ≥ 0")
    cfg = EvalConfig.quick(**kw) if args.quick else EvalConfig(**kw)
    check_config(cfg)  # before the slow model load
    model, tokenizer = load(args.model)
    name = model_name(args.model)
    result = evaluate(model, tokenizer, cfg, name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    print_table(result)
    print(f"wrote {out / 'eval.json'}")
    if not args.no_plots:
        for path in plot(result, out):
            print(f"wrote {path}")


def print_table(result: dict) -> None:
    rows = result["results"]
    cols = [c for c in LABELS if any(c[0] in r for r in rows)]
    print(f"{result['model']} ({result['seconds']:.0f} s)")
    head = f"{'method':>15} {'keep':>5} " + " ".join(
        f"{h:>{len(f.format(0.0))}}" for _, h, f in cols
    )
    print(head)
    for r in rows:
        if r.get("same_as"):
            continue
        cells = " ".join(f.format(r[k]) if k in r else " " * len(f.format(0.0)) for k, _, f in cols)
        auto = f"  auto, target KL {r['max_kl']:g}" if "max_kl" in r else ""
        print(f"{r['method']:>15} {r['keep']:5.2f} {cells}{auto}")
    if "dense_prefill_ms" in result:
        print(f"dense prefill of the chat prompts: {result['dense_prefill_ms']:.1f} ms (mean)")
    s = result.get("speed")
    if s:
        print(f"speed (as loaded, {s['device']}): dense decode {s['dense_decode_tps']:.1f} tok/s, "
              f"TTFT {s['dense_ttft_ms']:.0f} ms on {s['prompt_tokens']} tokens, f = {s['ffn_byte_share']:.3f}")  # fmt: skip
        for r in s["rows"]:
            print(
                f"  keep {r['kept']:.2f}: {r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x), "
                f"select {r['select_ms']:.0f} ms, materialize {r['materialize_ms']:.0f} ms "
                f"({r['materialize_gbps']:.2f} GB/s vs copy {r['copy_gbps']:.2f}), "
                f"prefill {r['score_prefill_ms'] + r['rest_prefill_ms']:.0f} ms"
            )


if __name__ == "__main__":
    main()
