"""Memory benchmark: the dense model vs the memory and flash FFN stores, on one model.

Peak RSS is per process, so every generation case runs in a fresh interpreter
(``python -m ifp_mlx.bench.memory CASE``) and reports its own ``ru_maxrss``; read bandwidth
(cold: the unit file evicted from the page cache first, warm: cached), read calls and
decode speed with both stores over the same compact model are measured side by side in
the calling process.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from ..store import MAX_GAP_BYTES, read_spans, runs

PROMPT = "What is the capital of France? Answer in one sentence."
CALIBRATION = (  # orders units by co-activation for the read-call comparison; not a bench prompt
    "A recipe is a set of steps. Mix the flour with water, add salt, and knead the dough for ten "
    "minutes. Meanwhile, in a small program, a loop adds the numbers from one to ten and prints "
    "the total. The museum opened in 1890 and holds paintings from three centuries."
)


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10


def run_case(folder: str, store: str, keep, max_tokens: int, predictor=None) -> dict:
    """One-shot generation in this process; what a user's process would peak at. ``keep``
    None with store ``auto`` is the default a user gets with no flags (the folder's settings)."""
    from ..generate import stream_generate
    from ..loading import load

    tic = time.perf_counter()
    model, tokenizer = load(folder or None, ffn_store=store)
    load_s = time.perf_counter() - tic
    tokens, last = [], None
    for r in stream_generate(model, tokenizer, PROMPT, keep, predictor, max_tokens):
        tokens.append(int(r.token))
        last = r
    return {
        "store": model.ffn_store,
        "keep": last.ifp.keep,
        "peak_rss_mb": _peak_rss_mb(),
        "mlx_peak_mb": mx.get_peak_memory() / 2**20,
        "load_s": load_s,
        "read_mb": last.ifp.read_bytes / 2**20,
        "read_calls": last.ifp.read_calls,
        "materialize_ms": last.ifp.materialize_ms,
        "decode_tps": last.ifp.generation_tps,
        "tokens": tokens,
    }


def _subprocess_case(folder, store, keep, max_tokens, predictor) -> dict:
    cmd = [sys.executable, "-m", "ifp_mlx.bench.memory", folder or "", store, str(keep),
           str(max_tokens), predictor or ""]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise IFPError(f"memory case {store} keep {keep} failed: {tail[:200]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cold_read_gbps(path: Path, chunk: int = 8 << 20) -> float:
    """A plain sequential read of the whole file after evicting it: the machine's baseline."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk)
        done, tic = 0, time.perf_counter()
        while n := os.readv(fd, [buf]):
            done += n
        return done / (time.perf_counter() - tic) / 1e9
    finally:
        os.close(fd)


def flash_io(folder: str, keep: float, decode_tokens: int, rounds: int, predictor=None) -> dict:
    """Cold/warm materialization, read calls (file order vs co-activation order) and decode
    tok/s of the memory and flash stores on the same selection, in this process."""
    from ..convert.layout import calibration_activations, coactivation_order
    from ..generate import prompt_tokens
    from ..loading import load
    from .speed import decode_tps

    flash, tokenizer = load(folder or None, ffn_store="flash")
    memory, _ = load(folder or None, ffn_store="memory")
    store = flash._ifp_store()
    tokens = prompt_tokens(tokenizer, PROMPT)
    sel = memory.select(tokens, keep=keep, predictor=predictor)
    out = {"cold_is_cold": hasattr(os, "posix_fadvise"), "keep": sel.keep}  # else cached
    # "exact": one read per run of kept units, no byte of a dropped unit read; "merged" (the
    # default): runs closer than MAX_GAP_BYTES share a read. Each round measures a plain
    # sequential read and both modes back to back (this machine's disk speed drifts).
    modes = {"exact": 0, "merged": MAX_GAP_BYTES}
    seq, cold, warm = [], {m: [] for m in modes}, {m: [] for m in modes}
    for _ in range(rounds):
        seq.append(_cold_read_gbps(store.file.path))
        for mode, gap in modes.items():
            store.file.max_gap_bytes = gap
            store.file.drop_cache()
            cold[mode].append(flash.apply_selection(_copy(sel)))
            warm[mode].append(flash.apply_selection(_copy(sel)))
    out["sequential_read_gbps"] = float(np.median(seq))
    for mode, gap in modes.items():
        store.file.max_gap_bytes = gap
        gap_before = store.file.gap_bytes
        first = flash.apply_selection(_copy(sel))
        kept = first.bytes_read
        gap_mb = (store.file.gap_bytes - gap_before) / 2**20
        rates = [kept / x.materialize_ms / 1e6 for x in cold[mode]]
        ratios = [r / q for r, q in zip(rates, seq)]
        out[mode] = {
            "kept_mb": kept / 2**20,
            "gap_mb": gap_mb,
            "read_calls": first.read_calls,
            "cold_ms": float(np.median([x.materialize_ms for x in cold[mode]])),
            "warm_ms": float(np.median([x.materialize_ms for x in warm[mode]])),
            "cold_gbps": float(np.median(rates)),  # kept bytes per second
            "cold_of_sequential": float(np.median(ratios)),  # per round, then the median
            "cold_transfer_of_sequential": float(np.median(ratios)) * (1 + gap_mb * 2**20 / kept),
        }
        out[mode]["warm_gbps"] = kept / out[mode]["warm_ms"] / 1e6
    store.file.max_gap_bytes = MAX_GAP_BYTES
    # The same kept units under a co-activation order of the file (what --permute-units
    # writes): how many reads that order would need.
    memory.dense()
    acts = calibration_activations(memory, tokenizer.encode(CALIBRATION))
    orders = [np.argsort(coactivation_order(a)) for a in acts]  # unit -> its new position
    records = [layer.record for layer in store.file.spec.layers]
    for name, order in (("file", None), ("coactivation", orders)):
        ids = [i if order is None else np.sort(order[l][i]) for l, i in enumerate(sel.indices)]
        out[f"runs_{name}_order"] = sum(len(runs(i)) for i in ids)
        out[f"reads_{name}_order"] = sum(
            len(read_spans(i, MAX_GAP_BYTES // r)) for i, r in zip(ids, records)
        )
    # Decode speed, same compact model in both stores, interleaved rounds.
    memory.apply_selection(_copy(sel))
    tps = {"memory": [], "flash": []}
    pair = [("memory", memory), ("flash", flash)]
    for r in range(2 * rounds):  # alternating which goes first: this CPU's speed drifts
        for name, model in pair if r % 2 == 0 else pair[::-1]:
            tps[name].append(decode_tps(model, tokens, decode_tokens))
    out["decode_tps_memory"] = float(np.median(tps["memory"]))
    out["decode_tps_flash"] = float(np.median(tps["flash"]))
    out["decode_flash_vs_memory"] = out["decode_tps_flash"] / out["decode_tps_memory"]
    return out


def _copy(sel):
    from ..selection import Selection

    return Selection(sel.indices, sel.units, sel.predictor)


def memory_bench(
    folder: Optional[str],
    keep: float = 0.5,
    max_tokens: int = 32,
    decode_tokens: int = 32,
    rounds: int = 3,
    predictor: Optional[str] = None,
) -> dict:
    from ..bundled import model_path
    from ..loading import _resolve, read_ifp_config
    from ..store import FileSpec

    path = _resolve(model_path(folder or None))
    ifp = read_ifp_config(path)["ifp"]
    if not ifp.get("ffn_store"):
        raise IFPError(f"{path} has no unit file (converted before format 2): reconvert it")
    spec = FileSpec.from_dict(ifp["ffn_store"], path)
    ffn_bytes = sum(layer.units * layer.record for layer in spec.layers)
    f = str(path)
    cases = [
        ("dense", _subprocess_case(f, "memory", 1.0, max_tokens, predictor)),
        ("memory", _subprocess_case(f, "memory", keep, max_tokens, predictor)),
        ("flash", _subprocess_case(f, "flash", keep, max_tokens, predictor)),
        ("flash-dense", _subprocess_case(f, "flash", 1.0, max_tokens, predictor)),
        ("default", _subprocess_case(f, "auto", None, max_tokens, predictor)),  # no flags
    ]
    out = {
        "model": f"{path.name} (from {ifp.get('source')})",
        "quantization": ifp.get("quantization"),
        "dtype": ifp.get("dtype"),
        "keep": keep,
        "ffn_mb": ffn_bytes / 2**20,
        "prompt": PROMPT,
        "cases": dict(cases),
    }
    c = out["cases"]
    out["flash_saving_mb"] = c["dense"]["peak_rss_mb"] - c["flash"]["peak_rss_mb"]
    out["target_saving_mb"] = 0.8 * (1 - keep) * out["ffn_mb"]
    out["same_tokens_memory_flash"] = c["memory"]["tokens"] == c["flash"]["tokens"]
    out["default_vs_dense_peak"] = c["default"]["peak_rss_mb"] / c["dense"]["peak_rss_mb"]
    out["io"] = flash_io(f, keep, decode_tokens, rounds, predictor)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["cases"])
    rss = [result["cases"][n]["peak_rss_mb"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, rss, color=["#888", "#4a7", "#37c", "#9bd", "#c73"][: len(names)])
    for i, v in enumerate(rss):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(
        f"{result['model']}\none-shot generation at keep {result['keep']}, "
        f"FFN {result['ffn_mb']:.0f} MB",
        fontsize=9,
    )
    ax.set_ylim(min(rss) * 0.9, max(rss) * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if (
    __name__ == "__main__"
):  # one case per process: python -m ifp_mlx.bench.memory FOLDER STORE KEEP N
    folder, store, keep, n, pred = sys.argv[1:6]
    res = run_case(folder, store, None if keep == "None" else float(keep), int(n), pred or None)
    print(json.dumps(res))
