"""``ifp-bench policy``: multi-turn policies (first-turn vs per-turn), quality on the dense
model's own second answer and turn-2 TTFT."""

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

    from ..chat import Conversation
    from ..eval.metrics import kl_agreement
    from ..generate import prompt_tokens

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
