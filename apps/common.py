"""What the CLIs share: flags, turning them into library objects, and the error handler that
makes every user mistake one line."""

import argparse
import contextlib
import sys


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turn IFPError / Ctrl-C / a lost distributed rank into one stderr line and a non-zero
    exit."""
    from ..errors import IFPError

    try:
        yield
    except IFPError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except RuntimeError as e:  # a distributed rank that went away: not a bug of ours
        from ..distributed import lost_peer

        lost = lost_peer(e)
        if lost is None:
            raise
        print(f"{prog}: error: {lost}", file=sys.stderr)
        raise SystemExit(1)


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default shown after its meaning (unless the help says it already, or the
    flag has none); descriptions in plain text (docstrings' RST markup removed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings:
            return text
        if (
            action.default is None
            or action.default is False
            or action.default in ([], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def plain(text: str) -> str:
    """Docstring text as a terminal shows it: ``x``, `x` and :role:`x` become x."""
    import re

    return re.sub(r"(?::\w+:)?`{1,2}([^`]+)`{1,2}", r"\1", text or "")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=plain(description),
                                   formatter_class=HelpFormatter)  # fmt: skip


def add_subcommand(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


MODEL_HELP = (
    "ifp-mlx model folder, or a bundled model fetched and converted on first use: "
    "smollm2-135m (the default, 8-bit), qwen2.5-coder-0.5b, gemma3-270m"
)


def keep_arg(text: str):
    """``0.5``, ``auto`` or a comma-separated per-layer list ``0.4,0.6,...``."""
    if text.strip() == "auto":
        return "auto"
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"keep must be a number, a list of numbers or 'auto', not {text!r}"
        )
    if not values:
        raise argparse.ArgumentTypeError("keep is empty")
    return values[0] if len(values) == 1 else values


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--keep",
        type=keep_arg,
        default=None,
        help="fraction of FFN units kept per layer, a per-layer list, or 'auto' (the smallest "
        "calibrated keep within --max-kl); default: the folder's budget, else auto when it is "
        "calibrated, else 0.5; 1 = dense",
    )
    p.add_argument(
        "--max-kl",
        type=float,
        default=None,
        help="quality target for --keep auto: the expected KL (nats per token) to the dense "
        "model's answers, from the folder's calibration (ifp-calibrate); implies --keep auto "
        "(default: none, or the folder's target under --keep auto)",
    )
    p.add_argument("--predictor", help="activation | learned (default: the folder's chosen one, "
                   "else learned when it has a trained predictor, else activation)")  # fmt: skip
    add_predictor_any(p)
    p.add_argument("--policy", default="first-turn",
                   help="first-turn: select once per conversation; per-turn: every message")  # fmt: skip
    add_store_flag(p)
    add_distributed_flags(p)
    add_sampling_flags(p)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """mlx_lm.generate's names and meanings."""
    p.add_argument("-m", "--max-tokens", type=int, default=512,
                   help="most tokens of an answer")  # fmt: skip
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probabilities add up to "
                   "this; 1 = off")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens; 0 = off")  # fmt: skip
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the top one; 0 = off")  # fmt: skip
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler (default: a fresh one)")  # fmt: skip
    p.add_argument("--max-kv-size", type=int, default=None, metavar="N",
                   help="keep the last N tokens in the KV cache (rotating; default: all)")  # fmt: skip


def add_predictor_any(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor-any", action="store_true",
                   help="use the folder's learned predictor even if it was trained on other "
                   "weights (another bit width or source); default: refuse it")  # fmt: skip


def add_store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ffn-store",
        default="auto",
        choices=("auto", "memory", "flash"),
        help="flash: only the kept units are read from the model folder, per prompt (the "
        "pruned model peaks below the dense one); memory: every FFN unit resident; auto "
        "(default): flash where the folder has a unit file (ifp-mlx format >= 2), else memory",
    )
    p.add_argument("--verify-store", action="store_true",
                   help="check every layer of the unit file against its checksum at load "
                   "(reads the whole file once)")  # fmt: skip


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run as one rank of an mlx.launch job: attention heads and FFN units split over "
        "the ranks (e.g. mlx.launch --backend ring -n 2 -- PROGRAM --distributed ...)",
    )
    p.add_argument(
        "--shard-policy",
        default="global",
        choices=("global", "balanced"),
        help="with --distributed: global = the single-machine selection (ranks may keep "
        "unequal counts); balanced = the top units within each rank's share (equal work)",
    )


def load_model(args, prog: str):
    """``ifp_mlx.load`` as the flags ask. Under ``--distributed`` only rank 0 prints: the
    other ranks compute the same tokens in lockstep and stay quiet."""
    import os
    import sys

    from .. import load

    model, tokenizer = load(args.model, ffn_store=args.ffn_store, verify_store=args.verify_store,
                            distributed=args.distributed, shard_policy=args.shard_policy,
                            predictor_any=getattr(args, "predictor_any", False))  # fmt: skip
    if args.distributed:
        shard = model.sharding
        if shard.size == 1:
            print(f"{prog}: --distributed outside mlx.launch: running as a single rank",
                  file=sys.stderr)  # fmt: skip
        elif shard.rank != 0:
            sys.stdout = open(os.devnull, "w")
    return model, tokenizer


def rank(model) -> int:
    shard = getattr(model, "sharding", None)
    return shard.rank if shard is not None else 0


def shard_note(model) -> str:
    """``, 2 ranks (global selection, attention split)`` for a sharded model, else ''."""
    shard = getattr(model, "sharding", None)
    if shard is None or shard.size == 1:
        return ""
    attention = "attention split" if shard.attention else "attention replicated"
    return f", {shard.size} ranks ({shard.policy} selection, {attention})"


def shared_input(model, read):
    """``read()`` on rank 0, its text on every rank (None for end of input): only rank 0
    reads the terminal or stdin, and every rank must run the same prompt."""
    shard = getattr(model, "sharding", None)
    if shard is None or shard.size == 1:
        return read()
    from ..distributed import broadcast_text

    text = None
    if shard.rank == 0:
        text = read()
    got = broadcast_text(shard.group, "\x00" if text is None else "\x01" + text)
    return None if got == "\x00" else got[1:]


def model_name(folder) -> str:
    """The model as outputs name it: its folder's name, never a path of this machine."""
    from pathlib import Path

    return Path(folder).resolve().name if folder else "bundled SmolLM2-135M-Instruct 8-bit"


def as_prompt(tokenizer, text: str, system=None, raw: bool = False):
    """What the CLIs feed: the user's text as a chat (with a system message), or as it is
    (``--ignore-chat-template``: its tokens, no template)."""
    from ..errors import IFPError
    from ..generate import clean_text

    if not text.strip():
        raise IFPError("empty prompt")
    if raw:
        return tokenizer.encode(clean_text((system + "\n" if system else "") + text))
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]


def sampler_from(args):
    from ..generate import make_sampler

    return make_sampler(args.temp, args.top_p, args.seed, args.top_k, args.min_p)


# A terminal obeys escape sequences in what it prints: a model (or a hostile tokenizer) could
# retitle the window, clear the screen or, on some terminals, write to the clipboard. The CLIs
# print model text through ``printable``; the API and server return text unchanged.
_ESCAPES = None


def printable(text: str) -> str:
    """``text`` without terminal control: ESC/CSI/OSC sequences and C0/C1 control characters
    (tabs and newlines stay). Works on streamed pieces too: a sequence split between pieces
    loses its control characters, and what remains is plain text."""
    import re

    global _ESCAPES
    if _ESCAPES is None:
        _ESCAPES = re.compile(
            r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL / ST
            r"|\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI
            r"|\x1b[@-_]?"  # other ESC sequences
            r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # the other controls (keeps \t and \n)
        )
    return _ESCAPES.sub("", text)


def read_text_streams() -> None:
    """Read standard input as terminals show text: invalid UTF-8 becomes U+FFFD instead of an
    exception that ends the program (a chat session goes on)."""
    import sys

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")


def check_flags(args) -> None:
    """Validate flags before the (slow) model load, so mistakes fail fast."""
    from ..budget import check_keep
    from ..chat import check_policy
    from ..errors import IFPError
    from ..predictors import get_predictor

    if args.keep is not None and args.keep != "auto":
        for k in args.keep if isinstance(args.keep, list) else [args.keep]:
            check_keep(k)
    if args.max_kl is not None:
        from ..budget import check_max_kl

        check_max_kl(args.max_kl)
        if args.keep not in (None, "auto"):
            raise IFPError("--max-kl chooses the keep itself: drop --keep (or pass --keep auto)")
    if args.predictor is not None:
        get_predictor(args.predictor)
    check_policy(args.policy)
    if args.max_tokens < 1:
        raise IFPError(f"--max-tokens must be at least 1, not {args.max_tokens}")
    if not args.temp >= 0 or args.temp == float("inf"):  # also NaN
        raise IFPError(f"--temp must be a number ≥ 0 (0 = greedy), not {args.temp}")
    if not 0 < args.top_p <= 1:
        raise IFPError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise IFPError(f"--seed must be in 0 .. 2**64 - 1, not {args.seed}")
    if args.top_k < 0:
        raise IFPError(f"--top-k must be ≥ 0 (0 = off), not {args.top_k}")
    if not 0 <= args.min_p <= 1:
        raise IFPError(f"--min-p must be in [0, 1] (0 = off), not {args.min_p}")
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise IFPError(f"--max-kv-size must be at least 1, not {args.max_kv_size}")


LONG_PROMPT = 2048  # tokens: past this, say up front that the prefill takes a while


class PrefillBar:
    """``progress=`` for stream_generate in the CLIs: a note up front for a long prompt, and a
    bar on stderr once the prefill has run for a few seconds (none for a quick one)."""

    def __init__(self, prog: str, delay: float = 2.0):
        self.prog, self.delay, self.bar = prog, delay, None

    def __call__(self, done: int, total: int) -> None:
        import sys

        from tqdm import tqdm

        if self.bar is None:
            if total >= LONG_PROMPT:
                print(f"{self.prog}: a {total}-token prompt: its prefill takes a while "
                      "(Ctrl-C stops it)", file=sys.stderr)  # fmt: skip
            self.bar = tqdm(total=total, desc="prefill", unit="tok", delay=self.delay,
                            leave=False, file=sys.stderr)  # fmt: skip
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
