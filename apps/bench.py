"""``ifp-bench``: benchmarks that print side-by-side numbers and write JSON."""

import json
from pathlib import Path

from .common import (
    MODEL_HELP,
    add_store_flag,
    add_subcommand,
    cli_errors,
    keep_arg,
    make_parser,
    model_name,
)


def main(argv=None) -> None:
    p = make_parser("ifp-bench", "ifp-mlx benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = add_subcommand(sub, "quant", help="unit-major quantization vs mlx-lm's, held-out text loss")
    q.add_argument("--source", required=True, help="HF folder (config.json + weights)")
    q.add_argument("--text", required=True, help="held-out plain-text file")
    q.add_argument("--bits", type=int, nargs="+", default=[4, 8], help="bit widths compared")
    q.add_argument("--group-size", type=int, default=64, help="quantization group size")
    q.add_argument("--max-tokens", type=int, default=2048, help="held-out text tokens scored")
    q.add_argument("--json", default="results/bench-quant.json", help="where the results go (JSON)")
    s = add_subcommand(sub, "speed", help="dense vs pruned decode speed and TTFT split")
    s.add_argument("--model", help=MODEL_HELP)
    s.add_argument(
        "--keep", type=float, nargs="+", default=[0.5, 0.33], help="keeps measured beside dense"
    )
    s.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length for TTFT")
    s.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per measurement")
    s.add_argument(
        "--predictor",
        help="default: the folder's (ifp.default_predictor, else learned if trained, else activation)",
    )
    s.add_argument("--json", default="results/bench-speed.json", help="where the results go (JSON)")
    add_store_flag(s)
    pol = add_subcommand(sub, "policy", help="multi-turn policies: first-turn vs per-turn")
    pol.add_argument("--model", help=MODEL_HELP)
    pol.add_argument("--keep", type=float, default=0.5, help="keep fraction")
    pol.add_argument("--answer-tokens", type=int, default=32, help="tokens of each answer")
    pol.add_argument(
        "--json", default="results/bench-policy.json", help="where the results go (JSON)"
    )
    add_store_flag(pol)
    m = add_subcommand(sub, "memory", help="peak memory and reads: dense vs memory vs flash store")
    m.add_argument("--model", help=MODEL_HELP)
    m.add_argument("--keep", type=float, default=0.5, help="keep fraction")
    m.add_argument("--max-tokens", type=int, default=32, help="tokens per one-shot answer")
    m.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per measurement")
    m.add_argument(
        "--rounds", type=int, default=3, help="prompts measured (a fresh selection each)"
    )
    m.add_argument(
        "--predictor",
        help="default: the folder's (ifp.default_predictor, else learned if trained, else activation)",
    )
    m.add_argument(
        "--json", default="results/bench-memory.json", help="where the results go (JSON)"
    )
    an = add_subcommand(sub, "answers", help="free-running answers vs dense: right, ends, loops, "
                        "length and time to a complete answer, in one run")  # fmt: skip
    an.add_argument("--model", help=MODEL_HELP)
    an.add_argument("--keep", type=lambda t: t if t == "default" else keep_arg(t), nargs="+",
                    default=["default"],
                    help="settings to compare with dense: 'default' (the folder's: no flags), "
                    "'auto', a fraction or a per-layer list (default: default)")  # fmt: skip
    an.add_argument(
        "--max-kl", type=float, help="quality target for keep 'auto' (default: the folder's)"
    )
    an.add_argument("--rescore", type=int, nargs="+", default=[None],
                    help="reselect every N answer tokens (0 = off; default: the folder's)")  # fmt: skip
    an.add_argument("--dense-head", type=int, help="dense answer tokens before selecting (0 = "
                    "select from the prompt; default: the folder's)")  # fmt: skip
    an.add_argument("--predictor", help="default: the folder's")
    an.add_argument("--split", default="test", choices=("test", "calib"),
                    help="half of the short-answer set (test: reported; calib: for choosing)")  # fmt: skip
    an.add_argument("--n", type=int, help="questions (default: the whole split)")
    an.add_argument("--max-tokens", type=int, default=64, help="answer limit (default 64)")
    an.add_argument(
        "--json", default="results/bench-answers.json", help="where the results go (JSON)"
    )
    add_store_flag(an)
    sv = add_subcommand(sub, "serve", help="load test of ifp-serve: concurrent mixed requests")
    sv.add_argument("--model", help=MODEL_HELP)
    sv.add_argument("--requests", type=int, default=200, help="requests sent in all")
    sv.add_argument("--clients", type=int, nargs="+", default=None,
                    help="concurrent clients (default: 8; --throughput: 1 2 4 8)")  # fmt: skip
    sv.add_argument("--throughput", action="store_true",
                    help="instead of the load test: FIFO (--batch-size 1) vs batched answer "
                    "tokens/s, latency and TTFT at each --clients")  # fmt: skip
    sv.add_argument("--batch-size", type=int, default=8,
                    help="the server's --batch-size (--throughput: the batched one, compared "
                    "with 1; default: %(default)s)")  # fmt: skip
    sv.add_argument("--per-client", type=int, default=2,
                    help="--throughput: questions each client asks in turn (default: %(default)s)")  # fmt: skip
    sv.add_argument("--keep", type=keep_arg, default=None,
                    help="--throughput: the requests' keep (default: the folder's)")  # fmt: skip
    sv.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    sv.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    sv.add_argument(
        "--json", default="results/bench-serve.json", help="where the results go (JSON)"
    )
    d = add_subcommand(sub, "distributed", help="1 rank vs N ranks (mlx.launch, ring): tok/s, bytes "
                       "per decoded token per rank, global vs balanced KL")  # fmt: skip
    d.add_argument("--model", help=MODEL_HELP)
    d.add_argument("--keep", type=float, default=0.5, help="keep fraction")
    d.add_argument("--ranks", type=int, default=2, help="local processes under mlx.launch")
    d.add_argument("--prompts", type=int, default=8, help="held-out ShareGPT prompts for KL")
    d.add_argument("--answer-tokens", type=int, default=32, help="tokens of each answer")
    d.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per measurement")
    d.add_argument(
        "--json", default="results/bench-distributed.json", help="where the results go (JSON)"
    )
    args = p.parse_args(argv)
    with cli_errors("ifp-bench"):
        if args.cmd == "distributed":
            return run_distributed(args)
        if args.cmd == "serve":
            return run_serve(args)
        if args.cmd == "speed":
            return run_speed(args)
        if args.cmd == "policy":
            return run_policy(args)
        if args.cmd == "answers":
            return run_answers(args)
        if args.cmd == "memory":
            return run_memory(args)
        from ..bench.quant import quant_quality

        r = quant_quality(
            Path(args.source), Path(args.text), args.bits, args.group_size, args.max_tokens
        )
        print(f"held-out text loss over {r['tokens']} tokens, fp32 {r['loss_fp32']:.4f}")
        print(f"{'bits':>4} {'g':>4} {'ifp-mlx':>8} {'mlx-lm':>8} {'ifp/mlx-lm':>11}")
        for row in r["rows"]:
            print(
                f"{row['bits']:>4} {args.group_size:>4} {row['loss_ifp']:8.4f} "
                f"{row['loss_mlx_lm']:8.4f} {100 * row['relative_diff']:+10.2f}%"
            )
        write_json(args.json, r)


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def run_distributed(args) -> None:
    """The same measurement alone and as N local ranks under ``mlx.launch``, side by side."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from ..budget import check_keep
    from ..errors import IFPError

    check_keep(args.keep)
    if args.ranks < 2 or args.prompts < 1 or args.decode_tokens < 1 or args.answer_tokens < 1:
        raise IFPError("--ranks must be ≥ 2; --prompts, --decode-tokens, --answer-tokens ≥ 1")
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        raise IFPError("mlx.launch is not on PATH (it comes with mlx: pip install mlx)")
    flags = ["--keep", str(args.keep), "--prompts", str(args.prompts), "--answer-tokens",
             str(args.answer_tokens), "--decode-tokens", str(args.decode_tokens)]  # fmt: skip
    if args.model:
        from ..bundled import model_path

        flags += ["--model", str(model_path(args.model).resolve())]
    bench = [sys.executable, "-m", "ifp_mlx.bench.distributed", *flags]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, args.ranks):
            out = str(Path(tmp) / f"{ranks}.json")
            cmd = bench + ["--out", out]
            if ranks > 1:  # one BLAS thread per rank: the ranks share this machine's cores
                cmd = [launcher, "--backend", "ring", "-n", str(ranks),
                       "--env", "OPENBLAS_NUM_THREADS=1", "--", *cmd, "--distributed"]  # fmt: skip
            print(f"measuring {ranks} rank{'s' if ranks > 1 else ''}...", flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if r.returncode != 0 or not Path(out).is_file():
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise IFPError(f"the {ranks}-rank run failed: {tail}")
            runs[ranks] = json.loads(Path(out).read_text())
    result = {"model": model_name(args.model), "keep": args.keep, "ranks": args.ranks,
              "attention_split": runs[args.ranks]["attention_split"],
              "prompt_ids": runs[1]["prompt_ids"], "one_rank": runs[1],
              "n_ranks": runs[args.ranks]}  # fmt: skip
    print(f"model {result['model']} | 1 vs {args.ranks} local ranks (mlx.launch, ring) | "
          f"attention {'split' if result['attention_split'] else 'replicated'} | "
          f"{len(result['prompt_ids'])} held-out prompts")  # fmt: skip
    print(f"{'':18} {'ranks':>5} {'tok/s':>7} {'MB/token per rank':>20} {'KL':>6} {'agree':>6}")
    for ranks, r in runs.items():
        for name in ("dense", "global", "balanced"):
            if name not in r:
                continue
            row = r[name]
            label = "dense" if name == "dense" else f"keep {args.keep:g} {name}"
            mb = row.get("bytes_per_token_per_rank", [row["bytes_per_token"]])
            mb = ", ".join(f"{b / 2**20:.1f}" for b in mb)
            q = f"{row['kl']:6.3f} {100 * row['agreement']:5.0f}%" if "kl" in row else ""
            print(f"{label:18} {ranks:5d} {row['decode_tps']:7.2f} {mb:>20} {q}")
    one, n = runs[1], runs[args.ranks]
    print(f"{args.ranks} ranks / 1 rank tok/s: dense {n['dense']['decode_tps'] / one['dense']['decode_tps']:.2f}x, "
          f"keep {args.keep:g} global {n['global']['decode_tps'] / one['global']['decode_tps']:.2f}x")  # fmt: skip
    print(f"balanced vs global on {args.ranks} ranks: KL {n['balanced']['kl']:.3f} vs "
          f"{n['global']['kl']:.3f} ({n['balanced']['kl'] - n['global']['kl']:+.3f}), tok/s "
          f"{n['balanced']['decode_tps'] / n['global']['decode_tps']:.2f}x; global's largest "
          f"rank keeps {max(n['global']['kept_units_per_rank'])} units vs "
          f"{min(n['global']['kept_units_per_rank'])}")  # fmt: skip
    write_json(args.json, result)


def run_serve(args) -> None:
    from ..bench.serve import run_serve_load, run_serve_throughput
    from ..errors import IFPError

    clients = args.clients or ([1, 2, 4, 8] if args.throughput else [8])
    if args.requests < 1 or min(clients) < 1 or args.max_tokens < 1 or args.max_queue < 0:
        raise IFPError("--requests, --clients, --max-tokens must be ≥ 1, --max-queue ≥ 0")
    if args.batch_size < 1 + args.throughput or args.per_client < 1:
        raise IFPError("--batch-size must be ≥ 1 (--throughput: ≥ 2, it is compared with 1) and "
                       "--per-client ≥ 1")  # fmt: skip
    if args.throughput:
        r = run_serve_throughput(args.model, clients, args.batch_size, args.per_client,
                                 args.max_tokens, args.keep)  # fmt: skip
        print(f"{r['model']}: FIFO vs --batch-size {args.batch_size}, {args.per_client} greedy "
              f"questions per client, ≤ {args.max_tokens} tokens each")  # fmt: skip
        print(f"{'server':>8} {'clients':>7} {'tok/s':>7} {'vs FIFO':>8} {'req/s':>6} "
              f"{'p50 ms':>8} {'p95 ms':>8} {'TTFT p50':>9} {'batch':>5} {'same':>5}")  # fmt: skip
        for row in r["rows"]:
            print(f"{row['server']:>8} {row['clients']:7d} {row['tokens_per_s']:7.2f} "
                  f"{row['vs_fifo']:7.2f}x {row['requests_per_s']:6.2f} "
                  f"{row['latency_ms']['p50']:8.0f} {row['latency_ms']['p95']:8.0f} "
                  f"{row['ttft_ms']['p50']:9.0f} {row['largest_batch']:5d} "
                  f"{100 * row['same_as_fifo']:4.0f}%")  # fmt: skip
        return write_json(args.json, r)
    if len(clients) != 1:
        raise IFPError("the load test takes one --clients (several: with --throughput)")
    args.clients = clients[0]
    r = run_serve_load(args.model, args.requests, args.clients, args.max_tokens, args.max_queue,
                       batch_size=args.batch_size)  # fmt: skip
    print(f"{r['model']}: {r['requests']} requests from {r['clients']} clients in "
          f"{r['wall_s']:.1f} s ({r['throughput_rps']:.2f} answered/s)")  # fmt: skip
    print(f"answered {r['answered']}, 429 {r['busy_429']}, cancelled {r['cancelled']}, invalid "
          f"rejected {r['invalid_rejected']}/{r['invalid']}, 5xx {r['server_errors']}, hung "
          f"{r['hung']}, valid unanswered {r['valid_unanswered']}")  # fmt: skip
    lat, c = r["latency_ms"], r["conversation_ttft_ms"]
    print(f"latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms | server RSS idle "
          f"{r['rss_idle_mb']:.0f} MB, after {r['rss_after_mb']:.0f} MB")  # fmt: skip
    print("3-turn conversation TTFT, turns 2-3: reused "
          + ", ".join(f"{x:.0f}" for x in c["reused"]) + " ms vs fresh "
          + ", ".join(f"{x:.0f}" for x in c["fresh"]) + " ms")  # fmt: skip
    write_json(args.json, r)


def run_speed(args) -> None:
    from .. import load
    from ..bench.speed import speed
    from ..budget import check_keep

    for k in args.keep:
        check_keep(k)
    model, tokenizer = load(args.model, ffn_store=args.ffn_store, verify_store=args.verify_store)
    r = speed(model, tokenizer, args.keep, args.prompt_tokens, args.decode_tokens, args.predictor)
    r["model"] = model_name(args.model)
    print(
        f"model {r['model']} | {r['device']} | FFN share of weight bytes f = {r['ffn_byte_share']:.3f}"
    )
    print(
        f"dense: decode {r['dense_decode_tps']:.1f} tok/s, TTFT {r['dense_ttft_ms']:.0f} ms "
        f"({r['prompt_tokens']} prompt tokens)"
    )
    print(
        f"{'keep':>5} {'tok/s':>7} {'speedup':>8} {'ideal':>6} {'of ideal':>8} {'score+prefill':>13} "
        f"{'select':>7} {'mater.':>7} {'rest':>6} {'TTFT':>7} {'mat GB/s':>8} {'copy GB/s':>9}"
    )
    for row in r["rows"]:
        print(
            f"{row['kept']:5.2f} {row['decode_tps']:7.1f} {row['speedup']:7.2f}x {row['ideal_speedup']:5.2f}x "
            f"{100 * row['of_ideal']:7.0f}% {row['score_prefill_ms']:11.0f}ms {row['select_ms']:5.0f}ms "
            f"{row['materialize_ms']:5.0f}ms {row['rest_prefill_ms']:4.0f}ms {row['ttft_ms']:5.0f}ms "
            f"{row['materialize_gbps']:8.2f} {row['copy_gbps']:9.2f}"
        )
    write_json(args.json, r)


def run_answers(args) -> None:
    import sys

    from .. import load
    from ..bench.answers import answers_bench
    from ..budget import check_keep, check_max_kl
    from ..errors import IFPError

    if args.max_tokens < 1 or (args.n is not None and args.n < 1):
        raise IFPError("--max-tokens and --n must be ≥ 1")
    if args.max_kl is not None:
        check_max_kl(args.max_kl)
    for k in args.keep:
        if isinstance(k, float):
            check_keep(k)
    if any(r is not None and r < 0 for r in args.rescore) or (args.dense_head or 0) < 0:
        raise IFPError("--rescore and --dense-head must be ≥ 0")
    settings = {}
    for k in args.keep:
        for r in args.rescore:
            kw = {} if k == "default" else {"keep": k}
            if k == "auto" and args.max_kl is not None:
                kw["max_kl"] = args.max_kl
            if args.predictor:
                kw["predictor"] = args.predictor
            if r is not None:
                kw["rescore"] = r
            if args.dense_head is not None:
                kw["dense_head"] = args.dense_head
            name = "default" if k == "default" else f"keep {k}"
            settings[name + ("" if r is None else f", rescore {r}")] = kw
    model, tokenizer = load(args.model, ffn_store=args.ffn_store, verify_store=args.verify_store)
    r = answers_bench(model, tokenizer, settings, args.split, args.n, args.max_tokens,
                      lambda i, n: print(f"\ranswered {i}/{n}", end="", file=sys.stderr, flush=True))  # fmt: skip
    print(file=sys.stderr)
    r["model"] = model_name(args.model)
    d = r["dense"]
    print(f"{r['model']} | {r['questions']} short questions ({r['split']} split), greedy, limit "
          f"{r['max_tokens']} tokens, store {r['store']} | dense: {d['accuracy']:.0%} right, "
          f"{d['ended']:.0%} ended, {d['seconds']:.1f} s")  # fmt: skip
    print(f"{'setting':>24} {'keep':>5} {'right':>6} {'ends':>6} {'loops':>6} {'length':>7} "
          f"{'time':>6}")  # fmt: skip
    for name, m in r["rows"].items():
        print(f"{name:>24} {m['keep']:5.2f} {m['right']:6.1%} {m['ends']:6.1%} {m['loops']:6.1%} "
              f"{m['length_ratio']:6.2f}x {m['time_ratio']:5.2f}x")  # fmt: skip
    print(
        "right: of the questions dense answers right; ends: of the answers dense ends; "
        "length, time: vs dense (time = to a complete answer, selection and prefill included)"
    )
    write_json(args.json, r)


def run_policy(args) -> None:
    from .. import load
    from ..bench.policy import policies
    from ..budget import check_keep

    check_keep(args.keep)
    model, tokenizer = load(args.model, ffn_store=args.ffn_store, verify_store=args.verify_store)
    r = policies(model, tokenizer, args.keep, args.answer_tokens)
    r["model"] = model_name(args.model)
    print(f"{r['model']}: keep {args.keep}, {r['conversations']} two-turn conversations")
    print(f"{'policy':>10} {'KL turn 2':>10} {'top-1 agree':>12} {'TTFT turn 2':>12}")
    for policy in ("first-turn", "per-turn"):
        s = r[policy]
        print(f"{policy:>10} {s['kl']:10.3f} {100 * s['agree']:11.1f}% {s['ttft2_ms']:10.0f}ms")
    write_json(args.json, r)


def run_memory(args) -> None:
    from ..bench.memory import memory_bench, plot
    from ..budget import check_keep

    check_keep(args.keep)
    if args.keep == 1.0:
        from ..errors import IFPError

        raise IFPError("--keep must be below 1 (keep 1 is the dense case, always measured)")
    r = memory_bench(
        args.model, args.keep, args.max_tokens, args.decode_tokens, args.rounds, args.predictor
    )
    c, io = r["cases"], r["io"]
    print(f"model {r['model']} | FFN {r['ffn_mb']:.1f} MB | keep {args.keep} | one-shot answer")
    print(f"{'case':>12} {'peak RSS':>9} {'MLX peak':>9} {'read':>9} {'reads':>6} {'decode':>9}")
    for name, x in c.items():
        print(
            f"{name:>12} {x['peak_rss_mb']:7.0f}MB {x['mlx_peak_mb']:7.0f}MB "
            f"{x['read_mb']:7.1f}MB {x['read_calls']:6d} {x['decode_tps']:5.1f}t/s"
        )
    ok = "ok" if r["flash_saving_mb"] >= r["target_saving_mb"] else "BELOW TARGET"
    print(
        f"flash saves {r['flash_saving_mb']:.1f} MB of peak vs dense "
        f"(target 0.8 x (1 - keep) x FFN = {r['target_saving_mb']:.1f} MB: {ok}); "
        f"same tokens memory/flash: {r['same_tokens_memory_flash']}"
    )
    d = c["default"]
    print(f"the default (no flags: store {d['store']}, keep {d['keep']:.2f}) peaks at "
          f"{100 * r['default_vs_dense_peak']:.0f}% of dense")  # fmt: skip
    print(f"materialize (sequential read of the unit file: {io['sequential_read_gbps']:.2f} GB/s)")
    for mode in ("exact", "merged"):
        x = io[mode]
        print(
            f"{mode:>8}: {x['read_calls']:6d} reads, kept {x['kept_mb']:.1f} MB + gaps "
            f"{x['gap_mb']:.1f} MB | cold {x['cold_ms']:.1f} ms = {x['cold_gbps']:.2f} GB/s of "
            f"kept units ({100 * x['cold_of_sequential']:.0f}% of sequential; with gaps "
            f"{100 * x['cold_transfer_of_sequential']:.0f}%) | warm {x['warm_ms']:.1f} ms"
        )
    print(
        f"runs of kept units: {io['runs_file_order']} in file order, "
        f"{io['runs_coactivation_order']} in co-activation order (--permute-units); "
        f"merged reads {io['reads_file_order']} vs {io['reads_coactivation_order']}"
    )
    print(
        f"decode, same compact model: memory {io['decode_tps_memory']:.1f} tok/s, flash "
        f"{io['decode_tps_flash']:.1f} tok/s ({100 * io['decode_flash_vs_memory']:.1f}%)"
    )
    write_json(args.json, r)
    plot(r, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
