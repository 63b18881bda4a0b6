"""Benchmarks whose numbers the ``ifp-bench`` program prints (measured side by side, one run)."""

import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from .convert import convert
from .convert.config import fix_config
from .errors import IFPError
from .loading import load
from .metrics import text_loss


def _mlx_lm_quantized(source: Path, out: Path, bits: int, group_size: int):
    """mlx-lm's own ``convert -q`` of the same HF folder (config RoPE fixed the same way)."""
    from mlx_lm import convert as mlx_convert
    from mlx_lm import load as mlx_load

    fixed = out.parent / "hf-fixed"
    fixed.mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.name != "config.json" and not (fixed / f.name).exists():
            (fixed / f.name).symlink_to(f.resolve())
    cfg = fix_config(json.loads((source / "config.json").read_text()))
    (fixed / "config.json").write_text(json.dumps(cfg))
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_convert(
            str(fixed),
            str(out),
            quantize=True,
            q_bits=bits,
            q_group_size=group_size,
            dtype="float32",
        )
    return mlx_load(str(out))


def quant_quality(
    source: Path,
    text: Path,
    bits_list=(4, 8),
    group_size: int = 64,
    max_tokens: int = 2048,
    work: Optional[Path] = None,
) -> dict:
    """Held-out text loss: fp32 vs ifp-mlx unit-major quantization vs mlx-lm's own, same bits."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise IFPError(f"{source} is not a Hugging Face folder with config.json")
    if not Path(text).is_file():
        raise IFPError(f"text file {text} does not exist")
    tmp = Path(work or tempfile.mkdtemp(prefix="ifp-bench-"))
    try:
        t = time.perf_counter()
        convert(source, tmp / "f32", progress=False)
        model, tok = load(tmp / "f32")
        tokens = tok.encode(Path(text).read_text(errors="replace"))[:max_tokens]
        out = {
            "source": source.name,  # names, never a path of this machine
            "text": Path(text).name,
            "tokens": len(tokens),
            "group_size": group_size,
            "loss_fp32": text_loss(model, tokens),
            "rows": [],
        }
        for bits in bits_list:
            q = tmp / f"ifp-q{bits}"
            convert(source, q, quantize=True, q_bits=bits, q_group_size=group_size, progress=False)
            row = {"bits": bits, "loss_ifp": text_loss(load(q)[0], tokens)}
            theirs, _ = _mlx_lm_quantized(source, tmp / f"mlx-lm-q{bits}", bits, group_size)
            row["loss_mlx_lm"] = text_loss(theirs, tokens)
            row["relative_diff"] = row["loss_ifp"] / row["loss_mlx_lm"] - 1
            out["rows"].append(row)
        out["seconds"] = time.perf_counter() - t
        return out
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)


CONVERSATIONS = [
    ("Give me a short recipe for pancakes.", "How can I make them without eggs?"),
    ("What is the capital of France? Answer in one sentence.", "What is a famous museum there?"),
    ("Write a Python function that reverses a string.", "Now make it reverse a list instead."),
    ("Name three planets of the solar system.", "Which of them is the largest?"),
    ("Explain what a computer is in simple words.", "And what is a keyboard for?"),
    ("Suggest a name for a pet cat.", "Why did you choose that name?"),
]


def policies(model, tokenizer, keep: float = 0.5, answer_tokens: int = 32) -> dict:
    """first-turn vs per-turn on two-turn conversations.

    Quality: KL(dense ‖ pruned) and top-1 agreement on the dense model's own greedy second
    answer, teacher-forced on the dense history, with the selection each policy would use for
    turn 2 (first-turn: from turn 1's prompt; per-turn: from turn 2's prompt). Latency: turn-2
    time to first token in a live conversation with a KV cache.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .chat import Conversation
    from .eval.metrics import kl_agreement
    from .generate import prompt_tokens

    out = {"keep": keep, "answer_tokens": answer_tokens, "conversations": len(CONVERSATIONS)}
    stats = {p: {"kl": [], "agree": [], "ttft2_ms": []} for p in ("first-turn", "per-turn")}
    for u1, u2 in CONVERSATIONS:
        model.dense()

        def greedy(ids):
            steps = generate_step(mx.array(ids), model, max_tokens=answer_tokens)
            toks = [int(t) for t, _ in steps]
            eos = [i for i, t in enumerate(toks) if t in tokenizer.eos_token_ids]
            return toks[: eos[0]] if eos else toks

        p1 = prompt_tokens(tokenizer, u1)
        a1 = tokenizer.decode(greedy(p1))
        msgs = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}]
        p2 = prompt_tokens(tokenizer, msgs + [{"role": "user", "content": u2}])
        a2 = greedy(p2)
        seq = mx.array(p2 + a2)[None]
        dense = model(seq)[0, len(p2) - 1 : -1]
        new_turn = p2[len(prompt_tokens(tokenizer, msgs[:1])) :]
        for policy, source in (("first-turn", p1), ("per-turn", new_turn)):
            model.select(source, keep=keep)
            pruned = model(seq)[0, len(p2) - 1 : -1]
            kl, agree = kl_agreement(dense.astype(mx.float32), pruned.astype(mx.float32))
            stats[policy]["kl"].append(kl)
            stats[policy]["agree"].append(agree)
            conv = Conversation(model, tokenizer, keep=keep, policy=policy)
            for _ in conv.ask(u1, max_tokens=answer_tokens):
                pass
            for r in conv.ask(u2, max_tokens=2):
                pass
            stats[policy]["ttft2_ms"].append(r.ifp.ttft_ms)
    model.dense()
    for policy, s in stats.items():
        out[policy] = {k: sum(v) / len(v) for k, v in s.items()}
    return out


def answers_bench(
    model,
    tokenizer,
    settings: dict,
    split: str = "test",
    n: Optional[int] = None,
    max_tokens: int = 64,
    progress=None,
) -> dict:
    """Free-running greedy answers to the short-answer set, every setting against the same
    model dense, alternating per question in one run: right / ends / loops / length and the
    time to a complete answer (``ifp_mlx.eval.answers``)."""
    from .eval.answers import compare, is_right, run_settings, short_answers, to_dict

    qs = short_answers(split)[:n] if n else short_answers(split)
    if not qs:
        raise IFPError("no questions to answer")
    runs = run_settings(
        model, tokenizer, [q.q for q in qs], {"dense": {"keep": 1.0}, **settings}, max_tokens,
        progress,
    )  # fmt: skip
    rows = {}
    for name in settings:
        m = to_dict(compare(runs["dense"], runs[name], [q.need for q in qs]))
        m.pop("ids")
        m["seconds"] = sum(a.seconds for a in runs[name])
        rows[name] = m
    dense = runs["dense"]
    return {
        "split": split,
        "questions": len(qs),
        "ids": [q.id for q in qs],
        "max_tokens": max_tokens,
        "store": model.ffn_store,
        "dense": {
            "accuracy": sum(is_right(a.text, q.need) for a, q in zip(dense, qs)) / len(qs),
            "ended": sum(a.ended for a in dense) / len(qs),
            "tokens": sum(a.tokens for a in dense),
            "seconds": sum(a.seconds for a in dense),
        },
        "rows": rows,
        "examples": {name: [a.text for a in runs[name][:3]] for name in ["dense", *settings]},
    }
