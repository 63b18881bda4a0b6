"""``ifp-generate``: answer one prompt with per-prompt FFN pruning and exit."""

import argparse
import sys

from ..errors import cli_errors
from .common import PrefillBar, add_model_flags, check_flags, read_text_streams, sampler_from


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ifp-generate", description="Answer one prompt, pruned.")
    p.add_argument("--prompt", required=True, help="the user message ('-' reads stdin)")
    add_model_flags(p)
    args = p.parse_args(argv)
    with cli_errors("ifp-generate"):
        check_flags(args)
        from .. import load
        from ..generate import stream_generate

        read_text_streams()
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        model, tokenizer = load(args.model, ffn_store=args.ffn_store)
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
                sampler=sampler_from(args),
                progress=bar,
            ):
                bar.close()
                print(resp.text, end="", flush=True)
                last = resp
        finally:
            bar.close()
        print()
        if last is not None:
            print(last.ifp.line(), file=sys.stderr)


if __name__ == "__main__":
    main()
