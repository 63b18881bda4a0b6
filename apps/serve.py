"""``ifp-serve``: an OpenAI-compatible local server with per-request pruning."""

import argparse

from ..errors import IFPError, cli_errors
from .common import MODEL_HELP, add_distributed_flags, add_store_flag, keep_arg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-serve", description="Serve a pruned model over the "
                                "OpenAI API (chat and text completions).")  # fmt: skip
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--keep", type=keep_arg, default=None,
                   help="default budget of requests that give none (default: the folder's)")  # fmt: skip
    p.add_argument("--predictor", help="default predictor (activation | learned)")
    p.add_argument("--policy", default="first-turn", help="default policy: first-turn | per-turn")
    add_store_flag(p)
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting; more get 429")
    p.add_argument("--max-body-mb", type=float, default=1.0, help="larger bodies get 413")
    p.add_argument("--max-tokens", type=int, default=512, help="when a request sets none")
    add_distributed_flags(p)
    args = p.parse_args(argv)
    with cli_errors("ifp-serve"):
        from ..chat import check_policy
        from ..predictors import get_predictor
        from ..serve import Engine, ServeConfig, create_app

        if not 0 < args.port < 65536:
            raise IFPError(f"--port must be in 1..65535, not {args.port}")
        if args.max_queue < 0 or args.max_body_mb <= 0 or args.max_tokens < 1:
            raise IFPError("--max-queue must be ≥ 0, --max-body-mb > 0, --max-tokens ≥ 1")
        check_policy(args.policy)
        if args.predictor:
            get_predictor(args.predictor)
        cfg = ServeConfig(args.model, args.keep, args.predictor, args.policy, args.ffn_store,
                          args.api_key, args.max_queue, args.max_body_mb, args.max_tokens,
                          args.distributed, args.shard_policy)  # fmt: skip
        engine = Engine(cfg)  # the model loads before the port opens
        if engine.rank != 0:  # rank 0 serves; this rank runs what it is told
            engine.thread.join()
            return
        app = create_app(cfg, engine)
    import uvicorn

    print(f"ifp-serve: {app.state.model_id} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
