"""One rank of a distributed test: run under ``mlx.launch`` (or alone, for the single-process
reference). ``python -m tests.dist_worker MODEL OUT.json [--keep K] [--policy P] [--store S]``,
or ``python -m tests.dist_worker --runs RUNS.json [--single]``: each entry of RUNS.json is one such
argument list, run in turn in the same processes (one launch of ~20 s pays for them all).

Each rank writes ``OUT.json`` with a ``.rank{r}`` suffix: the last-token logits of a dense
forward pass, then the selection at ``--keep`` and the tokens decoded from it
(greedy, or sampled with ``--temp``).
"""

import argparse
import json

import mlx.core as mx
import numpy as np

PROMPT = [5, 17, 40, 9, 33, 70, 12, 88, 41, 6, 23, 54, 7, 19]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--policy", default="global")
    p.add_argument("--store", default="memory")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--predictor", default="activation")
    p.add_argument("--temp", type=float, default=0.0, help="> 0: sample (no seed given)")
    p.add_argument("--single", action="store_true", help="one process, not sharded")
    args = p.parse_args(argv)

    import ifp_mlx
    from ifp_mlx.model import tap_ffns

    model, tok = ifp_mlx.load(
        args.model, ffn_store=args.store, distributed=not args.single, shard_policy=args.policy
    )
    rank = 0 if args.single else model.sharding.rank
    model.dense()
    dense = model(mx.array(PROMPT)[None])[0, -1].astype(mx.float32)

    sel = model.select(PROMPT, keep=args.keep, predictor=args.predictor)
    pruned = model(mx.array(PROMPT)[None])[0, -1].astype(mx.float32)
    # masked dense reference over the whole model, from the same selection
    model.dense()
    masks = []
    for idx, n, local in zip(sel.indices, sel.units, _local_ranges(model)):
        m = np.zeros(n, np.float32)
        m[idx] = 1
        masks.append(mx.array(m[local[0] : local[1]]))
    with tap_ffns(model, record=False, masks=masks):
        masked = model(mx.array(PROMPT)[None])[0, -1].astype(mx.float32)
    greedy = _greedy(model, tok, args.keep, args.tokens, args.predictor, args.temp)
    out = {
        "rank": rank,
        "dense": np.asarray(dense).tolist(),
        "pruned": np.asarray(pruned).tolist(),
        "masked": np.asarray(masked).tolist(),
        "indices": [i.tolist() for i in sel.indices],
        "local_kept": sel.extra.get("local_kept", sel.kept),
        "bytes_read": sel.bytes_read,
        "greedy": greedy,
        "attention_sharded": getattr(getattr(model, "sharding", None), "attention", False),
    }
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(out, f)


def _local_ranges(model):
    shard = getattr(model, "sharding", None)
    if shard is None:
        return [(0, n) for n in model.ffn_units]
    return [shard.local(i) for i in range(len(shard.units))]


def _greedy(model, tok, keep, n, predictor, temp):
    """The decoded tokens: greedy, or sampled at ``temp`` from the generator's state as loaded
    (every rank must draw the same tokens without being given a seed)."""
    from ifp_mlx.generate import make_sampler, stream_generate

    sampler = make_sampler(temp)
    return [r.token for r in stream_generate(model, tok, PROMPT, keep=keep, sampler=sampler,
                                             predictor=predictor, max_tokens=n)]  # fmt: skip


def runs(argv) -> None:
    """Several runs in one launch: ``--runs FILE`` (a JSON list of argument lists)."""
    single = ["--single"] if "--single" in argv else []
    for run in json.loads(open(argv[argv.index("--runs") + 1]).read()):
        main(run + single)


if __name__ == "__main__":
    import sys

    runs(sys.argv[1:]) if "--runs" in sys.argv else main()
