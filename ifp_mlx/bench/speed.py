"""Speed benchmark: dense vs pruned decode and TTFT split, measured side by side in one run."""

import time
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache

from ..generate import prompt_tokens
from ..model import find_ffns

FILLER = (
    "The history of science is the study of how people came to understand the natural world. "
    "Early astronomers watched the sky and recorded the motion of the planets, while physicians "
    "described the body and its illnesses. Over centuries these observations became theories, "
    "and theories were tested by experiments that anyone could repeat. "
)


def ffn_byte_share(model: nn.Module) -> float:
    """f: the FFNs' share of the weight bytes a decode step reads."""
    model.dense()
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ffn = sum(v.nbytes for _, m in find_ffns(model) for _, v in tree_flatten(m.parameters()))
    return ffn / total


def ideal_speedup(f: float, keep: float) -> float:
    return 1.0 / (1.0 - f * (1.0 - keep))


def long_prompt(tokenizer, n_tokens: int) -> List[int]:
    words = tokenizer.encode(FILLER * (n_tokens // 40 + 2))[: max(n_tokens - 16, 8)]
    text = tokenizer.decode(words) + "\nSummarize the text above in two sentences."
    return prompt_tokens(tokenizer, text)


def decode_tps(model, tokens: List[int], n: int) -> float:
    """Tokens/s over n decode steps after the first token, never stopping at EOS."""
    steps = generate_step(mx.array(tokens), model, max_tokens=n + 1)
    next(steps)
    tic = time.perf_counter()
    count = sum(1 for _ in steps)
    tps = count / (time.perf_counter() - tic)
    mx.synchronize(generation_stream)  # mlx-lm's look-ahead step (see generate.stream_generate)
    return tps


def _prefill_ms(model, tokens: List[int], cache) -> float:
    tic = time.perf_counter()
    for start in range(0, len(tokens), 512):
        model(mx.array(tokens[start : start + 512])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return (time.perf_counter() - tic) * 1e3


def copy_gbps(model: nn.Module, selection) -> float:
    """Bandwidth of a plain array copy of as many bytes as the materialization gathered."""
    arrays = []
    for (_, mlp), idx in zip(find_ffns(model), selection.indices):
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            arrays += [
                v[: len(idx)] for k, v in proj.items() if isinstance(v, mx.array) and v.ndim == 2
            ]
    mx.eval(arrays)
    nbytes = sum(a.nbytes for a in arrays)
    tic = time.perf_counter()
    mx.eval([a + mx.zeros((), a.dtype) for a in arrays])
    return nbytes / (time.perf_counter() - tic) / 1e9


def speed(
    model: nn.Module,
    tokenizer,
    keeps: Sequence[float] = (0.5, 0.33),
    prompt_tokens: int = 1024,
    decode_tokens: int = 64,
    predictor: Optional[str] = None,
) -> Dict:
    """Dense vs pruned in one run: decode tok/s, ideal ratio, TTFT split, materialize GB/s."""
    prompt = long_prompt(tokenizer, prompt_tokens)
    short = prompt[-64:]
    f = ffn_byte_share(model)
    model.dense()
    decode_tps(model, short, 4)  # warm-up
    cache = make_prompt_cache(model)
    dense_ttft = _prefill_ms(model, prompt, cache)
    dense_tps = decode_tps(model, short, decode_tokens)
    rows = []
    for keep in keeps:
        model.dense()
        cache = make_prompt_cache(model)
        sel = model.select(prompt, keep=keep, predictor=predictor, cache=cache)
        rest_ms = _prefill_ms(model, prompt[sel.prefilled :], cache)
        tps = decode_tps(model, short, decode_tokens)
        rows.append(
            {
                "keep": keep,
                "kept": sel.keep,
                "decode_tps": tps,
                "speedup": tps / dense_tps,
                "ideal_speedup": ideal_speedup(f, sel.keep),
                "of_ideal": (tps / dense_tps) / ideal_speedup(f, sel.keep),
                "score_prefill_ms": sel.score_ms,
                "select_ms": sel.select_ms,
                "materialize_ms": sel.materialize_ms,
                "rest_prefill_ms": rest_ms,
                "ttft_ms": sel.score_ms + sel.select_ms + sel.materialize_ms + rest_ms,
                "overhead_vs_dense_ttft": (
                    sel.score_ms + sel.select_ms + sel.materialize_ms + rest_ms - dense_ttft
                )
                / dense_ttft,
                "materialize_bytes": sel.bytes,
                "bytes_read": sel.bytes_read,  # flash store: from the unit file
                "read_calls": sel.read_calls,
                "materialize_gbps": sel.materialize_gbps,
                "copy_gbps": copy_gbps(model, sel),
            }
        )
    model.dense()
    return {
        "prompt_tokens": len(prompt),
        "decode_tokens": decode_tokens,
        "ffn_byte_share": f,
        "dense_decode_tps": dense_tps,
        "dense_ttft_ms": dense_ttft,
        "device": str(mx.default_device()),
        "ffn_store": model.ffn_store,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "rows": rows,
    }
