"""``ifp-chat``: a streaming chat with per-prompt FFN pruning (like ``mlx_lm.chat``)."""

import argparse
import sys

from ..errors import IFPError
from .common import (
    PrefillBar,
    add_model_flags,
    check_flags,
    cli_errors,
    keep_arg,
    load_model,
    make_parser,
    printable,
    rank,
    read_text_streams,
    sampler_from,
    shard_note,
    shared_input,
)

HELP = """commands:
  /keep F     keep fraction F of FFN units (e.g. /keep 0.3, or /keep auto; from the next message)
  /max-kl T   keep as few units as the calibration allows within KL T to the dense model
  /dense      use the full model
  /stats      details of the last answer
  /reset      start a new conversation
  /help       this help
  /quit       leave (also Ctrl-D)"""


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stdout.isatty() else text


def command(conv, line: str, last) -> bool:
    """Run an in-chat command; False means quit."""
    name, _, arg = line.strip().partition(" ")
    if name == "/quit":
        return False
    if name == "/help":
        print(HELP)
    elif name == "/dense":
        conv.set_keep(1.0)
        before = conv.model.ffn_io[0]
        conv.model.dense()
        read = conv.model.ffn_io[0] - before
        print(
            _dim(
                f"[dense model: read {read / 2**20:.1f} MB of FFN units]"
                if read
                else "[dense model]"
            )
        )
    elif name == "/keep":
        try:
            conv.set_keep(keep_arg(arg.strip()))
        except argparse.ArgumentTypeError as e:
            raise IFPError(str(e))
        print(_dim(f"[{conv.describe()} from the next message]"))
    elif name == "/max-kl":
        conv.set_keep("auto", arg.strip() or None)
        print(_dim(f"[{conv.describe()} from the next message]"))
    elif name == "/reset":
        conv.reset()
        print(_dim("[new conversation]"))
    elif name == "/stats":
        if last is None:
            print(_dim("[no answer yet]"))
        else:
            for k, v in vars(last).items():
                print(_dim(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}"))
    else:
        raise IFPError(f"unknown command {name} (try /help)")
    return True


def _read_line():
    try:
        return input(">> ")
    except EOFError:
        return None


def main(argv=None) -> None:
    p = make_parser("ifp-chat", "Chat with a per-prompt pruned model.")
    add_model_flags(p)
    p.add_argument(
        "--system-prompt", "--system", dest="system", help="system message (default: none)"
    )
    args = p.parse_args(argv)
    read_text_streams()
    with cli_errors("ifp-chat"):
        check_flags(args)
        from ..chat import Conversation

        model, tokenizer = load_model(args, "ifp-chat")
        conv = Conversation(
            model,
            tokenizer,
            args.keep,
            args.predictor,
            args.policy,
            args.system,
            max_kl=args.max_kl,
            max_kv_size=args.max_kv_size,
        )
        sampler = sampler_from(args)
    print(
        _dim(
            f"ifp-chat: {conv.describe()}, predictor {conv.predictor}, policy {conv.policy}, "
            f"FFN store {conv.model.ffn_store}{shard_note(model)}. "
            "/help for commands."
        )
    )
    with cli_errors("ifp-chat"):  # e.g. a rank of a distributed chat lost: one line
        _loop(conv, args, sampler)


def _loop(conv, args, sampler) -> None:
    model, last = conv.model, None
    while True:
        try:
            line = shared_input(model, _read_line)
        except KeyboardInterrupt:
            print()
            continue
        if line is None:
            print()
            break
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not command(conv, line, last):
                    break
                continue
            resp, bar = None, PrefillBar("ifp-chat")
            try:
                for resp in conv.ask(
                    line, max_tokens=args.max_tokens, sampler=sampler, progress=bar
                ):
                    bar.close()
                    print(printable(resp.text), end="", flush=True)
                print()
            except KeyboardInterrupt:
                print(_dim(" [stopped]"))
            finally:
                bar.close()
            if resp is not None:
                last = resp.ifp
                print(_dim(last.line()))
        except IFPError as e:
            if rank(model) == 0:  # every rank meets the same error; one says it
                print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
