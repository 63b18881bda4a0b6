"""``ifp-serve``: an OpenAI-compatible local server with per-request pruning."""

import sys

from ..errors import IFPError
from .common import (
    MODEL_HELP,
    add_distributed_flags,
    add_predictor_any,
    add_store_flag,
    cli_errors,
    keep_arg,
    make_parser,
)


def main(argv=None) -> None:
    p = make_parser("ifp-serve", "Serve a pruned model over the OpenAI API (chat and text "
                    "completions).")  # fmt: skip
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                   "%(default)s, this machine only; 0.0.0.0 is every interface)")  # fmt: skip
    p.add_argument("--port", type=int, default=8080, help="default: %(default)s")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (all but /health; default: no key)"
    )
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name requests may use besides loopback's and --host "
                   "(repeatable; '*' turns the check off; default: none)")  # fmt: skip
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (https://app.example) allowed to call the server, "
                   "with CORS (repeatable; default: none, browsers are refused)")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections; more are closed at once (default: %(default)s)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers (and 3x "
                   "that for its body) before it is closed (default: %(default)s)")  # fmt: skip
    p.add_argument("--keep", type=keep_arg, default=None,
                   help="default budget of requests that give none (default: the folder's)")  # fmt: skip
    p.add_argument("--predictor", help="default predictor (activation | learned)")
    add_predictor_any(p)
    p.add_argument("--policy", default="first-turn", help="default policy: first-turn | per-turn")
    add_store_flag(p)
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting; more get 429")
    p.add_argument("--batch-size", type=int, default=8,
                   help="requests that decode together, each on its own units (1: one at a "
                   "time, in arrival order; default: %(default)s)")  # fmt: skip
    p.add_argument("--prompt-cache-size", type=int, default=8,
                   help="conversations whose KV cache and selected units are kept")  # fmt: skip
    p.add_argument("--prompt-cache-bytes", type=int, default=1 << 30,
                   help="most bytes their KV caches hold together")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=1.0, help="larger bodies get 413")
    p.add_argument("--max-tokens", type=int, default=512, help="when a request sets none")
    add_distributed_flags(p)
    args = p.parse_args(argv)
    with cli_errors("ifp-serve"):
        from ..chat import check_policy
        from ..predictors import get_predictor
        from ..serve import Engine, ServeConfig, create_app, run
        from ..serve.guard import check_exposure

        if not 0 < args.port < 65536:
            raise IFPError(f"--port must be in 1..65535, not {args.port}")
        if args.max_queue < 0 or args.max_body_mb <= 0 or args.max_tokens < 1:
            raise IFPError("--max-queue must be ≥ 0, --max-body-mb > 0, --max-tokens ≥ 1")
        if args.batch_size < 1:
            raise IFPError(f"--batch-size must be ≥ 1, not {args.batch_size}")
        if args.prompt_cache_size < 1 or args.prompt_cache_bytes < 0:
            raise IFPError("--prompt-cache-size must be ≥ 1 and --prompt-cache-bytes ≥ 0")
        if args.max_connections < 1 or not 0 < args.timeout < 1e6:
            raise IFPError("--max-connections must be ≥ 1 and --timeout in (0, 1e6) seconds")
        if args.api_key is not None and not args.api_key.strip():
            raise IFPError("--api-key is empty: give a key, or leave the flag out for none")
        check_policy(args.policy)
        if args.predictor:
            get_predictor(args.predictor)
        cfg = ServeConfig(args.model, args.keep, args.predictor, args.policy, args.ffn_store,
                          args.api_key, args.max_queue, args.max_body_mb, args.max_tokens,
                          args.distributed, args.shard_policy, args.host, args.allowed_host,
                          args.allowed_origin, args.max_connections, args.timeout,
                          3 * args.timeout)  # fmt: skip
        cfg.verify_store, cfg.predictor_any = args.verify_store, args.predictor_any
        cfg.batch_size = args.batch_size
        cfg.prompt_cache_size, cfg.prompt_cache_bytes = (
            args.prompt_cache_size,
            args.prompt_cache_bytes,
        )
        engine = Engine(cfg)  # the model loads before the port opens
        if engine.rank != 0:  # rank 0 serves; this rank runs what it is told
            engine.thread.join()
            return
        app = create_app(cfg, engine)
    for warning in check_exposure(args.host, args.api_key):
        print(f"ifp-serve: warning: {warning}", file=sys.stderr, flush=True)
    print(f"ifp-serve: {app.state.model_id} on http://{args.host}:{args.port}/v1", flush=True)
    run(app, cfg, args.port)


if __name__ == "__main__":
    main()
