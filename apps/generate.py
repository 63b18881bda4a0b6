"""``ifp-generate``: answer one prompt with per-prompt FFN pruning and exit."""

import sys

from .common import (
    PrefillBar,
    add_model_flags,
    as_prompt,
    check_flags,
    cli_errors,
    load_model,
    make_parser,
    printable,
    rank,
    read_text_streams,
    sampler_from,
    shard_note,
    shared_input,
)


def main(argv=None) -> None:
    p = make_parser("ifp-generate", "Answer one prompt, pruned.")
    p.add_argument("-p", "--prompt", required=True, help="the user message ('-' reads stdin)")
    p.add_argument("--system-prompt", help="system message before the prompt (default: none)")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt's text as it is, without the chat template")  # fmt: skip
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
        text = shared_input(model, lambda: sys.stdin.read() if args.prompt == "-" else args.prompt)
        prompt = as_prompt(tokenizer, text, args.system_prompt, args.ignore_chat_template)
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
                max_kv_size=args.max_kv_size,
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
