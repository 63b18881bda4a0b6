"""``ifp-generate``: answer one prompt with per-prompt FFN pruning and exit."""

import argparse
import sys

from .common import (
    PrefillBar,
    add_model_flags,
    check_flags,
    cli_errors,
    load_model,
    printable,
    rank,
    read_text_streams,
    sampler_from,
    shard_note,
    shared_input,
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-generate", description="Answer one prompt, pruned.")
    p.add_argument("--prompt", required=True, help="the user message ('-' reads stdin)")
    add_model_flags(p)
    p.add_argument("--rescore", type=int, default=None, metavar="N",
                   help="reselect every N answer tokens from prompt + answer so far (activation "
                   "predictor; 0 = off; default: the folder's)")  # fmt: skip
    p.add_argument("--dense-head", type=int, default=None, metavar="H",
                   help="write the first H answer tokens dense, then select from prompt + them "
                   "(activation predictor; 0 = off; default: the folder's)")  # fmt: skip
    args = p.parse_args(argv)
    with cli_errors("ifp-generate"):
        check_flags(args)
        from ..generate import stream_generate

        read_text_streams()
        model, tokenizer = load_model(args, "ifp-generate")
        prompt = shared_input(
            model, lambda: sys.stdin.read() if args.prompt == "-" else args.prompt
        )
        last, bar = None, PrefillBar("ifp-generate")
        try:
            for resp in stream_generate(
                model,
                tokenizer,
                prompt,
                keep=args.keep,
                predictor=args.predictor,
                max_kl=args.max_kl,
                max_tokens=args.max_tokens,
                rescore=args.rescore,
                dense_head=args.dense_head,
                sampler=sampler_from(args),
                progress=bar,
            ):
                bar.close()
                print(printable(resp.text), end="", flush=True)
                last = resp
        finally:
            bar.close()
        print()
        if last is not None and rank(model) == 0:
            print(last.ifp.line() + shard_note(model), file=sys.stderr)


if __name__ == "__main__":
    main()
