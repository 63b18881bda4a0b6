"""One process of ``ifp-bench distributed``: decode speed, weight bytes per decoded token and
quality at a keep, for both shard policies, on this rank (or on an unsharded model).

Run by ``ifp-bench distributed`` once alone (1 rank) and once under ``mlx.launch`` (N ranks):
``python -m ifp_mlx.bench.distributed --model M --out OUT.json [--distributed] ...``; rank 0 writes.
"""

import argparse
import json
from typing import List

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from ..eval.metrics import continue_logits, kl_agreement
from .speed import decode_tps


def weight_bytes(model) -> int:
    """Bytes of the weights this rank's decode step reads (its current, possibly compact,
    modules; the FFN store's full layers are not part of the model)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def greedy(model, tokenizer, prompt: List[int], n: int) -> List[int]:
    """The dense model's own answer (``stream_generate`` waits for mlx-lm's look-ahead)."""
    from ..generate import stream_generate

    eos = set(tokenizer.eos_token_ids)
    steps = stream_generate(model, tokenizer, prompt, keep=1.0, max_tokens=n)
    return [r.token for r in steps if r.token not in eos]


def measure(model, tokenizer, keep: float, prompts, answer_tokens: int, decode_tokens: int):
    shard = getattr(model, "sharding", None)
    cases = []
    for p in prompts:
        model.dense()
        answer = greedy(model, tokenizer, p, answer_tokens)
        if answer:
            cases.append(
                (p, answer, continue_logits(model, make_prompt_cache(model), 0, p, answer))
            )
    mx.eval([c[2] for c in cases])
    model.dense()
    out = {"dense": {"decode_tps": decode_tps(model, prompts[0], decode_tokens),
                     "bytes_per_token": weight_bytes(model)}}  # fmt: skip
    for policy in ("global", "balanced") if shard is not None else ("global",):
        if shard is not None:
            model.shard_policy = policy
        kls, agrees = [], []
        for p, answer, dense_logits in cases:
            cache = make_prompt_cache(model)
            sel = model.select(p, keep=keep, predictor="activation", cache=cache)
            kl, agree = kl_agreement(dense_logits, continue_logits(model, cache, sel.prefilled,
                                                                   p, answer))  # fmt: skip
            kls.append(kl)
            agrees.append(agree)
        model.select(prompts[0], keep=keep, predictor="activation")
        local = model.selection.extra.get("local_kept", model.selection.kept)
        out[policy] = {
            "decode_tps": decode_tps(model, prompts[0], decode_tokens),
            "bytes_per_token": weight_bytes(model),
            "kept_units": int(sum(local)),
            "kl": float(np.mean(kls)),
            "agreement": float(np.mean(agrees)),
        }
    if shard is not None and shard.size > 1:  # every rank's bytes and units, on rank 0
        keys = [(name, field) for name in out for field in ("bytes_per_token", "kept_units")
                if field in out[name]]  # fmt: skip
        mine = mx.array([[float(out[n][f]) for n, f in keys]])
        every = np.asarray(mx.distributed.all_gather(mine, group=shard.group))
        for j, (n, f) in enumerate(keys):
            out[n][f + "_per_rank"] = [int(v) for v in every[:, j]]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ifp_mlx.bench.distributed")
    p.add_argument("--model")
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--distributed", action="store_true")
    args = p.parse_args(argv)
    from .. import load
    from ..apps.common import cli_errors
    from ..eval.data import chat_pairs

    with cli_errors("ifp-bench distributed"):
        model, tokenizer = load(args.model, distributed=args.distributed)
        pairs, ids = chat_pairs(tokenizer, "test", args.prompts, 256, 2)
        r = measure(model, tokenizer, args.keep, [p for p, _ in pairs], args.answer_tokens,
                    args.decode_tokens)  # fmt: skip
        shard = getattr(model, "sharding", None)
        r.update(ranks=shard.size if shard else 1, prompt_ids=ids,
                 attention_split=bool(shard and shard.attention))  # fmt: skip
        if shard is None or shard.rank == 0:
            with open(args.out, "w") as f:
                json.dump(r, f)


if __name__ == "__main__":
    main()
