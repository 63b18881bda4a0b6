"""``ifp-bench answers``: free-running answers of settings vs dense (right, ends, loops,
length, time to a complete answer), alternating per question in one run."""

from typing import Optional

from ..errors import IFPError


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
    from ..eval.answers import compare, is_right, run_settings, short_answers, to_dict

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
