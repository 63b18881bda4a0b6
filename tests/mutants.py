"""Hand-made mutants of the runtime: each one breaks a behaviour the suite claims to check,
and must turn the tests that guard it red. Run from the repository root:

    python -m tests.mutants            # every mutant (≈ 5 min on a 2-core CPU)
    python -m tests.mutants NAME ...   # some of them; --list names them

Each mutant is applied to a copy of the tree (never to the working tree), and only the tests
that guard it run (``-x -m "not real"``: the tiny models, no cached real conversions). A mutant
whose tests still pass is a *survivor*; the command exits 1 if any survive.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: List[str]  # pytest arguments that must fail
    why: str = ""


M = Mutant
MUTANTS = [
    M(
        "chat-no-cache-reuse",
        "ifp_mlx/chat.py",
        "        n = common_prefix_len(self.tokens, full)\n",
        "        self.reset()\n        n = 0\n",
        ["tests/test_chat.py"],
        "a chat that throws the KV cache away every turn",
    ),
    M(
        "chat-no-trim",
        "ifp_mlx/chat.py",
        "                trim_prompt_cache(self.cache, extra)\n",
        "                pass\n",
        ["tests/test_chat.py", "-k", "trimmed"],
        "a diverged history left in the cache",
    ),
    M(
        "chat-no-rebuild",
        "ifp_mlx/chat.py",
        "                self.cache, n = make_prompt_cache(self.model, self.max_kv_size), 0\n",
        "                pass\n",
        ["tests/test_chat.py", "-k", "trimmed"],
        "an untrimmable (rotating) cache reused as is",
    ),
    M(
        "chat-per-turn-never-reselects",
        "ifp_mlx/chat.py",
        'self.policy == "per-turn" or not self._selected',
        "not self._selected",
        ["tests/test_chat.py"],
        "the per-turn policy ignored",
    ),
    M(
        "chat-reset-ignored",
        "ifp_mlx/apps/chat.py",
        "        conv.reset()\n",
        "        pass\n",
        ["tests/test_chat.py", "-k", "reset"],
        "/reset that keeps the conversation",
    ),
    M(
        "sampler-ignores-temp",
        "ifp_mlx/generate.py",
        "return mlx_sampler(temp=temp,",
        "return mlx_sampler(temp=0.0,",
        ["tests/test_chat.py", "-k", "sampling"],
        "--temp ignored",
    ),
    M(
        "seed-ignored",
        "ifp_mlx/generate.py",
        "        mx.random.seed(seed)\n",
        "        pass\n",
        ["tests/test_chat.py", "-k", "sampling"],
        "--seed ignored",
    ),
    M(
        "random-scores",
        "ifp_mlx/predictors/activation.py",
        "            return Scores([mx.sqrt(s) for s in sums], prefilled)",
        "            return Scores([mx.random.uniform(shape=s.shape) for s in sums], prefilled)",
        ["tests/test_selection.py"],
        "an activation predictor returning random scores",
    ),
    M(
        "griffin-unnormalized",
        "ifp_mlx/predictors/activation.py",
        "    norms = mx.sqrt(sq.sum(-1, keepdims=True) if unit_sum is None else unit_sum(sq)) + 1e-6\n",
        "    norms = 1.0\n",
        ["tests/test_selection.py"],
        "GRIFFIN without the per-token normalization",
    ),
    M(
        "chunks-without-context",
        "ifp_mlx/predictors/activation.py",
        "                model(chunk, cache=run)\n",
        "                model(chunk, cache=None)\n",
        ["tests/test_selection.py"],
        "prefill chunks past 512 tokens that forget earlier ones",
    ),
    M(
        "identity-materialize",
        "ifp_mlx/selection.py",
        "        compact = [store.gather(i, idx) for i, idx in enumerate(selection.indices)]",
        "        compact = [store.full(i) for i, idx in enumerate(selection.indices)]",
        ["tests/test_selection.py"],
        "a selection that keeps every unit",
    ),
    M(
        "wrong-topk-order",
        "ifp_mlx/selection.py",
        'return np.sort(np.argsort(-s, kind="stable")[:k])',
        'return np.sort(np.argsort(s, kind="stable")[:k])',
        ["tests/test_selection.py"],
        "the k lowest-scoring units kept",
    ),
    M(
        "block-index",
        "ifp_mlx/selection.py",
        "idx = (best[:, None] * block + np.arange(block))",
        "idx = (best[:, None] + np.arange(block))",
        ["tests/test_selection.py", "-k", "block"],
        "blocks gathered at the wrong offset",
    ),
    M(
        "skip-dequantize",
        "ifp_mlx/model.py",
        "    return exact_embed_scale(dequantize_model(model))\n",
        "    return model\n",
        ["tests/test_selection.py", "-k", "dequantize"],
        "dequantize that leaves 4-bit layers",
    ),
    M(
        "sandbox-off",
        "ifp_mlx/eval/metrics.py",
        "            f.write(SANDBOX + source)\n",
        "            f.write(source)\n",
        ["tests/test_eval.py", "-k", "sandbox"],
        "HumanEval candidates run with the network",
    ),
    M(
        "kl-direction",
        "ifp_mlx/eval/metrics.py",
        "(mx.exp(logp) * (logp - logq))",
        "(mx.exp(logq) * (logq - logp))",
        ["tests/test_eval.py", "-k", "maths"],
        "KL(pruned ‖ dense) reported as KL(dense ‖ pruned)",
    ),
    M(
        "answer-loss-off-by-one",
        "ifp_mlx/eval/metrics.py",
        "    start = len(prompt) - 1 - n\n",
        "    start = len(prompt) - n\n",
        ["tests/test_eval.py", "-k", "maths"],
        "answer tokens scored one position late",
    ),
    M(
        "multiple-choice-argmin",
        "ifp_mlx/eval/metrics.py",
        "mx.argmax(logits[mx.array(letters)])",
        "mx.argmin(logits[mx.array(letters)])",
        ["tests/test_eval.py", "-k", "maths"],
        "the least likely letter picked",
    ),
    M(
        "split-salt",
        "ifp_mlx/eval/data.py",
        'SALT = "ifp-mlx-split-v1"',
        'SALT = "ifp-mlx-split-v2"',
        ["tests/test_eval.py", "-k", "splits"],
        "held-out splits reshuffled",
    ),
    M(
        "oracle-ignores-answer",
        "ifp_mlx/eval/methods.py",
        "        result = ActivationPredictor().score(model, full + [0], cache)",
        "        result = ActivationPredictor().score(model, list(tokens) + [0], cache)",
        ["tests/test_learned.py", "-k", "oracle"],
        "oracle targets built from the prompt only",
    ),
    M(
        "fit-on-shuffled-losses",
        "ifp_mlx/search.py",
        "    held = make().fit(X[train], y[train])\n",
        "    held = make().fit(X[train], np.random.default_rng(1).permutation(y[train]))\n",
        ["tests/test_search.py", "-k", "fit"],
        "an accuracy predictor that learns nothing",
    ),
    M(
        "ideal-speedup-formula",
        "ifp_mlx/bench/speed.py",
        "    return 1.0 / (1.0 - f * (1.0 - keep))",
        "    return 1.0 / (1.0 - f * keep)",
        ["tests/test_bench.py"],
        "the memory-bound ideal computed wrong",
    ),
    M(
        "byte-share-weights-only",
        "ifp_mlx/bench/speed.py",
        "    ffn = sum(v.nbytes for _, m in find_ffns(model) for _, v in tree_flatten(m.parameters()))",
        "    ffn = sum(m[k].weight.nbytes for _, m in find_ffns(model) for k in ('gate_proj', 'up_proj', 'down_proj'))",
        ["tests/test_bench.py", "-k", "speed_bench"],
        "FFN bytes without scales and biases",
    ),
    M(
        "garble-before-quantize",
        "convert/core.py",
        "        quant = None\n        if quantize:\n",
        "        quant = None\n        if quantize:\n            for _, m in find_ffns(model):\n"
        "                m.up_proj.weight = m.up_proj.weight[::-1]\n",
        ["tests/test_quant.py"],
        "a converter that garbles weights before quantizing",
    ),
    M(
        "group-size-ignored",
        "convert/core.py",
        "                    model, cfg, q_group_size, q_bits, quant_predicate=predicate",
        "                    model, cfg, 64, q_bits, quant_predicate=predicate",
        ["tests/test_quant.py"],
        "--q-group-size ignored",
    ),
    M(
        "rope-scaling-dropped",
        "convert/config.py",
        '    if kind in (None, "default"):\n        return None\n',
        "    return None\n",
        ["tests/test_tiny_families.py", "-k", "rope"],
        "RoPE scaling lost in conversion",
    ),
    M(
        "gguf-gemma-norms",
        "convert/gguf_reader.py",
        "            w = w - 1.0\n",
        "            w = w\n",
        ["tests/test_tiny_families.py", "-k", "gguf"],
        "Gemma's 1 + w norms read as w",
    ),
    M(
        "gguf-qk-order",
        "convert/gguf_reader.py",
        "        if arch in _PERMUTED_QK and name.endswith(",
        "        if False and name.endswith(",
        ["tests/test_tiny_families.py", "-k", "gguf"],
        "llama.cpp's q/k interleave kept",
    ),
    M(
        "gguf-gemma-scale",
        "convert/gguf_reader.py",
        '        cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if big else cfg["head_dim"]\n',
        "        pass\n",
        ["tests/test_tiny_families.py", "-k", "gguf"],
        "transformers' default Gemma attention scale",
    ),
    M(
        "load-newer-format",
        "ifp_mlx/loading.py",
        '    if ifp.get("format_version", 0) > FORMAT_VERSION:',
        '    if ifp.get("format_version", 0) > FORMAT_VERSION + 100:',
        ["tests/test_load_errors.py"],
        "a folder from a newer ifp-mlx loaded anyway",
    ),
    M(
        "load-foreign-predictor",
        "ifp_mlx/loading.py",
        "    if head is not None and list(head.cfg.units) != model.ffn_units:",
        "    if False:",
        ["tests/test_load_errors.py"],
        "a predictor made for another model accepted",
    ),
    M(
        "flash-reads-next-unit",
        "ifp_mlx/store.py",
        "        return self._read(layer, None if whole else idx)\n",
        "        return self._read(layer, None if whole else np.minimum(idx + 1, self.units[layer] - 1))\n",
        ["tests/test_store.py"],
        "the flash store reading the wrong units",
    ),
    M(
        "gemma-embed-scale-bf16",
        "ifp_mlx/model.py",
        '    if getattr(args, "model_type", None) != "gemma3_text" or emb is None:',
        "    if True:",
        ["tests/test_tiny_families.py", "-k", "parity"],
        "Gemma's embedding scale in bfloat16",
    ),
    M(
        "token-ids-unchecked",
        "ifp_mlx/selection.py",
        "            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n:",
        "            if False:",
        ["tests/test_bad_input.py", "-k", "vocabulary"],
        "ids past the embedding table accepted",
    ),
    M(
        "utf8-not-cleaned",
        "ifp_mlx/generate.py",
        '    return raw.decode("utf-8", "replace")\n',
        "    return text\n",
        ["tests/test_bad_input.py", "-k", "utf8"],
        "invalid UTF-8 in a prompt reaches the tokenizer",
    ),
    M(
        "force-replaces-anything",
        "ifp_mlx/convert/writer.py",
        "        if any(out.iterdir()) and not _is_model_folder(out):",
        "        if False:",
        ["tests/test_convert_errors.py", "-k", "force"],
        "--force deletes a folder of other files",
    ),
    M(
        "truncated-shard-unchecked",
        "ifp_mlx/validate.py",
        "    if 8 + n + end != size:",
        "    if False:",
        ["tests/test_load_errors.py"],
        "a truncated safetensors shard loaded",
    ),
    M(
        "top-p-unchecked",
        "ifp_mlx/apps/common.py",
        "    if not 0 < args.top_p <= 1:",
        "    if False:",
        ["tests/test_bad_input.py", "-k", "sampling"],
        "--top-p outside (0, 1] accepted",
    ),
    M(
        "compensation-sign",
        "ifp_mlx/selection.py",
        "    delta = comp.output_means[layer] - down(",
        "    delta = -comp.output_means[layer] + down(",
        ["tests/test_selection.py", "-k", "compensation"],
        "the dropped units' bias subtracted",
    ),
    # hardening, round two: the server's guard and the folder rules
    M(
        "guard-any-host",
        "ifp_mlx/serve/guard.py",
        '        if not self.host_ok(headers.get("host", "")):\n',
        "        if False:\n",
        ["tests/test_serve_guard.py", "-k", "rebinding"],
        "a DNS-rebinding page served",
    ),
    M(
        "guard-any-origin",
        "ifp_mlx/serve/guard.py",
        "        if origin is not None and not self.origin_ok(origin):\n",
        "        if False:\n",
        ["tests/test_serve_guard.py", "-k", "origins"],
        "any web page drives the server",
    ),
    M(
        "guard-any-content-type",
        "ifp_mlx/serve/guard.py",
        'if method == "POST" and ctype != "application/json":',
        'if method == "POST" and ctype == "text/x-never":',
        ["tests/test_serve_guard.py", "-k", "must_be_json"],
        "a CORS simple request (text/plain) accepted",
    ),
    M(
        "guard-no-header-timeout",
        "ifp_mlx/serve/guard.py",
        "            if self._idle():\n                self.transport.close()\n",
        "            pass\n",
        ["tests/test_serve_guard.py", "-k", "idle_connections"],
        "idle connections never closed",
    ),
    M(
        "serve-max-tokens-unbounded",
        "ifp_mlx/serve/protocol.py",
        '"max_tokens", 1, cfg.max_tokens, context)',
        '"max_tokens", 1, cfg.max_tokens, None)',
        ["tests/test_serve_guard.py", "-k", "out_of_range"],
        "max_tokens of 10**9 accepted",
    ),
    M(
        "serve-gone-client-runs",
        "ifp_mlx/serve/app.py",
        "                if await request.is_disconnected():\n                    job.cancelled.set()\n",
        "                pass\n",
        ["tests/test_serve_guard.py", "-k", "client_left"],
        "a queued request whose client left still runs",
    ),
    M(
        "serve-unsupported-ignored",
        "ifp_mlx/serve/protocol.py",
        "    _unsupported(body)\n",
        "",
        ["tests/test_serve_guard.py", "-k", "out_of_range"],
        "logprobs/tools/response_format silently ignored",
    ),
    M(
        "paths-dotdot",
        "ifp_mlx/paths.py",
        ' or ".." in parts:',
        ":",
        ["tests/test_hardening.py", "-k", "outside"],
        "a folder's ../ names read",
    ),
    M(
        "paths-no-resolve",
        "ifp_mlx/paths.py",
        "    real = Path(path).resolve()\n",
        "    real = Path(path).absolute()\n",
        ["tests/test_hardening.py", "-k", "symlink"],
        "symlinks out of the folder followed",
    ),
    M(
        "paths-fifo",
        "ifp_mlx/paths.py",
        "    if not stat.S_ISREG(mode):\n",
        "    if stat.S_ISDIR(mode):\n",
        ["tests/test_hardening.py", "-k", "fifo"],
        "a FIFO read (the converter hangs)",
    ),
    M(
        "template-no-limit",
        "ifp_mlx/generate.py",
        "    sys.settrace(tracer)\n",
        "    pass\n",
        ["tests/test_hardening.py", "-k", "loops_for_ever"],
        "a hostile chat template hangs every prompt",
    ),
    M(
        "printable-keeps-escapes",
        "ifp_mlx/apps/common.py",
        '    return _ESCAPES.sub("", text)\n',
        "    return text\n",
        ["tests/test_hardening.py", "-k", "escape or printable"],
        "model text drives the terminal",
    ),
    M(
        "flash-no-identity",
        "ifp_mlx/store.py",
        "        if _identity(st) != self.identity:\n",
        "        if False:\n",
        ["tests/test_hardening.py", "-k", "rewritten_in_place"],
        "a unit file rewritten in place read as garbage",
    ),
    M(
        "convert-no-sweep",
        "ifp_mlx/convert/writer.py",
        "        sweep_stale(out.parent)\n",
        "",
        ["tests/test_hardening.py", "-k", "killed_convert"],
        "a killed convert's temp folder stays for ever",
    ),
    M(
        "generate-no-hold",
        "ifp_mlx/generate.py",
        "    if not lock.acquire(blocking=False):\n",
        "    if not lock.acquire(blocking=False) and False:\n",
        ["tests/test_hardening.py", "-k", "interleaved"],
        "two generations corrupt each other",
    ),
]

# Round two (#30): written from the code of last round's modules before reading their tests,
# the way an outsider would (off-by-ones, a wrong neighbour, a dropped condition, a parameter
# ignored on one path); each guarding test was then written from what a user would see.
ROUND_TWO = [
    # ---- flash store (ifp_mlx/store.py)
    M(
        "flash-gap-gather-skipped",
        "ifp_mlx/store.py",
        "        for src, local, dest in gathers:\n            np.take(src, local, axis=0, out=dest)\n",
        "        for src, local, dest in gathers:\n            pass\n",
        ["tests/test_store.py", "-k", "bit_for_bit"],
        "units read across a small gap never copied out of scratch",
    ),
    M(
        "flash-threaded-chunk-offset",
        "ifp_mlx/store.py",
        "            jobs = [(v[c : c + READ_CHUNK], o + c) for v, o in jobs",
        "            jobs = [(v[c : c + READ_CHUNK], o) for v, o in jobs",
        ["tests/test_store.py", "-k", "threaded"],
        "every chunk of a threaded read starts at its span's first byte",
    ),
    M(
        "flash-bytes-read-counts-gaps",
        "ifp_mlx/store.py",
        "        self.bytes_read += len(idx) * rec\n",
        "        self.bytes_read += int(spans[:, 1].sum()) * rec\n",
        ["tests/test_store.py", "-k", "threaded or exactly_the_kept"],
        "bytes_read reports the gaps as kept units",
    ),
    M(
        "flash-verify-first-layer",
        "ifp_mlx/store.py",
        "        for i, layer in enumerate(self.spec.layers):\n            if layer.crc32 is None:",
        "        for i, layer in enumerate(self.spec.layers[:1]):\n            if layer.crc32 is None:",
        ["tests/test_hardening.py", "-k", "checksum"],
        "--verify-store checks only the first layer",
    ),
    M(
        "flash-resident-kept-whole",
        "ifp_mlx/store.py",
        "            return self.resident[layer] if whole else gather_resident(self.resident[layer], idx)",
        "            return self.resident[layer]",
        ["tests/test_varied.py", "-k", "encoder_layers"],
        "a resident layer (learned encoder) never pruned on flash",
    ),
    M(
        "flash-streamed-keeps-units",
        "ifp_mlx/store.py",
        "            self._layer.mods = None\n",
        "            pass\n",
        ["tests/test_store.py", "-k", "holds_one_layer"],
        "a streamed dense pass keeps every layer's units",
    ),
    M(
        "store-group-size-fixed",
        "ifp_mlx/store.py",
        '    return {"bits": module.bits, "group_size": module.group_size, "mode": module.mode}',
        '    return {"bits": module.bits, "group_size": 64, "mode": module.mode}',
        ["tests/test_store.py", "-k", "bit_for_bit"],
        "the unit file records group size 64 whatever was quantized",
    ),
    M(
        "memory-whole-by-first-layer",
        "ifp_mlx/store.py",
        "        if len(idx) == self.units[layer]:\n            return self.layers[layer]",
        "        if len(idx) == self.units[0]:\n            return self.layers[layer]",
        ["tests/test_varied.py", "-k", "uneven"],
        "layers of other sizes: 'kept whole' judged by layer 0's size",
    ),
    # ---- budgets (ifp_mlx/budget.py)
    M(
        "budget-floor",
        "ifp_mlx/budget.py",
        "        blocks = max(1, round(f * n / block))",
        "        blocks = max(1, int(f * n / block))",
        ["tests/test_varied.py", "-k", "budgets"],
        "k rounded down instead of nearest",
    ),
    M(
        "budget-block-overshoot",
        "ifp_mlx/budget.py",
        "        out.append(min(n, blocks * block))",
        "        out.append(blocks * block)",
        ["tests/test_varied.py", "-k", "budgets"],
        "k past the layer's units",
    ),
    M(
        "curve-no-envelope",
        "ifp_mlx/budget.py",
        "        return np.maximum.accumulate(kl[::-1])[::-1]",
        "        return kl",
        ["tests/test_calibrate.py", "-k", "lucky_dip"],
        "a lucky dip in the curve picks a too-small keep",
    ),
    M(
        "keep-for-upper-grid",
        "ifp_mlx/budget.py",
        "        t = (v0 - max_kl) / (v0 - v1) if v0 > v1 else 1.0",
        "        t = 1.0",
        ["tests/test_calibrate.py", "-k", "interpolates"],
        "no interpolation between measured keeps",
    ),
    M(
        "protect-inner-naive",
        "ifp_mlx/budget.py",
        "    inner = min(1.0, max(0.01, (keep * layers - first - last) / rest))",
        "    inner = keep",
        ["tests/test_calibrate.py", "-k", "protected"],
        "protected layers on top of the mean",
    ),
    M(
        "protect-last-ignored",
        "ifp_mlx/budget.py",
        "    return [1.0] * first + [inner] * rest + [1.0] * last",
        "    return [1.0] * first + [inner] * (rest + last)",
        ["tests/test_calibrate.py", "-k", "protected"],
        "the last layers not protected",
    ),
    M(
        "resolve-keep-unprotected",
        "ifp_mlx/budget.py",
        "    return Choice(protected_budget(keep, protect, layers), predictor, expected, None, keep)",
        "    return Choice(keep, predictor, expected, None, keep)",
        ["tests/test_calibrate.py", "-k", "protected"],
        "an explicit keep ignores ifp.protect",
    ),
    M(
        "resolve-default-max-kl-ignored",
        "ifp_mlx/budget.py",
        'else check_max_kl(ifp.get("default_max_kl", DEFAULT_MAX_KL))',
        "else DEFAULT_MAX_KL",
        ["tests/test_calibrate.py", "-k", "resolution_rules"],
        "the folder's default quality target ignored",
    ),
    M(
        "resolve-compensate-ignored",
        "ifp_mlx/budget.py",
        '    if name == "activation" and ifp.get("compensate"):',
        "    if False:",
        ["tests/test_varied.py", "-k", "compensate_and_protect"],
        "ifp.compensate ignored",
    ),
    # ---- calibration (ifp_mlx/calibrate.py)
    M(
        "calibrate-no-dense-point",
        "ifp_mlx/calibrate.py",
        "    keeps = sorted(set(float(k) for k in cfg.keeps) | {1.0})",
        "    keeps = sorted(set(float(k) for k in cfg.keeps))",
        ["tests/test_calibrate.py", "-k", "calibrat"],
        "a curve without keep 1.0 (unreadable once saved)",
    ),
    M(
        "calibrate-leaves-pruned",
        "ifp_mlx/calibrate.py",
        "    model.dense()\n    return Curve(",
        "    return Curve(",
        ["tests/test_calibrate.py", "-k", "leaves_the_dense"],
        "the model left pruned after calibrating",
    ),
    M(
        "calibrate-on-test-split",
        "ifp_mlx/calibrate.py",
        "data.chat_pairs(tokenizer, SPLIT,",
        'data.chat_pairs(tokenizer, "test",',
        ["tests/test_calibrate.py", "-k", "measures_and_stores"],
        "calibrated on the prompts quality is reported on",
    ),
    # ---- compensation and protected layers (ifp_mlx/selection.py)
    M(
        "compensate-whole-layers",
        "ifp_mlx/selection.py",
        "            if len(idx) == selection.units[i]:\n                continue\n",
        "            if False:\n                continue\n",
        ["tests/test_varied.py", "-k", "compensate_and_protect"],
        "compensation folded into a protected (whole) layer: dense() no longer exact",
    ),
    M(
        "compensate-drops-bias",
        "ifp_mlx/selection.py",
        '            down.bias = down["bias"] + delta if "bias" in down else delta\n',
        "            down.bias = delta\n",
        ["tests/test_varied.py", "-k", "reproduces_the_dense"],
        "a down_proj bias lost by compensation",
    ),
    M(
        "mask-offset-by-kept",
        "ifp_mlx/selection.py",
        "            start += n\n",
        "            start += len(idx)\n",
        ["tests/test_varied.py", "-k", "mask"],
        "Selection.mask shifted after layer 0",
    ),
    M(
        "token-id-at-vocab-size",
        "ifp_mlx/selection.py",
        "or not 0 <= t < n:",
        "or not 0 <= t <= n:",
        ["tests/test_bad_input.py", "-k", "vocabulary"],
        "the id vocab_size let in",
    ),
    # ---- distributed (ifp_mlx/distributed.py)
    M(
        "balanced-no-offset",
        "ifp_mlx/distributed.py",
        "                picks.append(lo + top_units(s[lo:hi], part, block) if part else [])",
        "                picks.append(top_units(s[lo:hi], part, block) if part else [])",
        ["tests/test_distributed.py", "-k", "balanced"],
        "balanced picks indexed from each rank's 0",
    ),
    M(
        "balanced-share-by-units",
        "ifp_mlx/distributed.py",
        "                part = k_r[1] - k_r[0]\n",
        "                part = k * (hi - lo) // shard.units[layer]\n",
        ["tests/test_distributed.py", "-k", "balanced"],
        "balanced shares of k that do not add up to k",
    ),
    M(
        "assemble-no-local-slice",
        "ifp_mlx/distributed.py",
        "            if s.shape[0] == shard.units[layer] and shard.size > 1:\n",
        "            if False:\n",
        ["tests/test_distributed.py", "-k", "learned_predictor"],
        "a learned head's whole-layer scores on a rank",
    ),
    M(
        "down-bias-every-rank",
        "ifp_mlx/distributed.py",
        '        if shard.rank != 0 and "bias" in down:',
        '        if False and "bias" in down:',
        ["tests/test_distributed.py", "-k", "odd_units"],
        "down_proj's bias added once per rank",
    ),
    M(
        "rank-seed-unsynced",
        "ifp_mlx/distributed.py",
        "    seed = int(mx.distributed.all_sum(mx.array([seed]), group=group).item())\n",
        "    seed = int(np.random.SeedSequence().entropy % (1 << 30))\n",
        ["tests/test_distributed.py", "-k", "learned_predictor"],
        "ranks sample with their own seeds",
    ),
    M(
        "local-range-inclusive",
        "ifp_mlx/distributed.py",
        "(idx >= lo) & (idx < hi)",
        "(idx >= lo) & (idx <= hi)",
        ["tests/test_distributed.py", "-k", "two_ranks_compute"],
        "a rank takes its neighbour's first unit",
    ),
    # ---- server (ifp_mlx/serve/)
    M(
        "serve-settings-change-ignored",
        "ifp_mlx/serve/engine.py",
        "and slot.settings == self.settings\n",
        "and True\n",
        ["tests/test_serve.py", "-k", "reuses_its_cache"],
        "a new keep mid-conversation keeps the old selection",
    ),
    M(
        "serve-stop-no-hold",
        "ifp_mlx/serve/engine.py",
        "        self.hold = max((len(s) for s in r.stop), default=1) - 1\n",
        "        self.hold = 0\n",
        ["tests/test_serve.py", "-k", "stop_string"],
        "a stream sends the start of a stop string",
    ),
    M(
        "serve-max-completion-tokens-ignored",
        "ifp_mlx/serve/protocol.py",
        '    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))',
        '    max_tokens = body.get("max_tokens")',
        ["tests/test_serve.py", "-k", "max_completion"],
        "max_completion_tokens ignored",
    ),
    M(
        "serve-chunked-body-unbounded",
        "ifp_mlx/serve/app.py",
        "                if len(body) > limit:\n",
        "                if False:\n",
        ["tests/test_serve.py", "-k", "content_length"],
        "a body without Content-Length has no size limit",
    ),
    M(
        "sampler-seed-zero",
        "ifp_mlx/generate.py",
        "    if seed is not None:\n        mx.random.seed(seed)",
        "    if seed:\n        mx.random.seed(seed)",
        ["tests/test_serve.py", "-k", "seed"],
        "seed 0 means no seed",
    ),
    # ---- validation (ifp_mlx/validate.py)
    M(
        "safetensors-too-long-ok",
        "ifp_mlx/validate.py",
        "    if 8 + n + end != size:",
        "    if 8 + n + end > size:",
        ["tests/test_load_errors.py", "-k", "shards"],
        "a shard with trailing bytes accepted",
    ),
    M(
        "index-first-shard-only",
        "ifp_mlx/validate.py",
        "    for shard in shards:\n        check_safetensors(folder / shard, folder)",
        "    for shard in shards[:1]:\n        check_safetensors(folder / shard, folder)",
        ["tests/test_load_errors.py", "-k", "shards"],
        "only the first of several shards checked",
    ),
    M(
        "tokenizer-vocab-boundary",
        "ifp_mlx/validate.py",
        "    if top >= vocab_size:",
        "    if top > vocab_size:",
        ["tests/test_load_errors.py", "-k", "another_model"],
        "a tokenizer one id past the embedding accepted",
    ),
    # ---- converter (convert/)
    M(
        "convert-first-shard-only",
        "ifp_mlx/convert/readers.py",
        "    for f in progress(_weight_files(folder)):",
        "    for f in progress(_weight_files(folder)[:1]):",
        ["tests/test_convert_errors.py", "-k", "sharded_checkpoint_converts"],
        "a sharded checkpoint read from its first shard",
    ),
    M(
        "q-down-bits-ignored",
        "ifp_mlx/convert/core.py",
        '                if q_down_bits is not None and path.endswith("down_proj"):',
        "                if False:",
        ["tests/test_convert_errors.py", "tests/test_quant.py"],
        "--q-down-bits ignored",
    ),
    M(
        "permute-bias-fixed",
        "ifp_mlx/convert/layout.py",
        '            if "bias" in proj:\n                proj.bias = proj.bias[idx]',
        "            if False:\n                proj.bias = proj.bias[idx]",
        ["tests/test_layout.py", "-k", "permute"],
        "gate/up biases not permuted with their units",
    ),
    M(
        "convert-revision-ignored",
        "ifp_mlx/convert/core.py",
        "        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))",
        "        folder = Path(snapshot_download(repo, revision=None, allow_patterns=patterns))",
        ["tests/test_convert_errors.py", "-k", "hub_cache"],
        "--revision ignored: main converted",
    ),
    # ---- a predictor belongs to its weights (#28)
    M(
        "load-foreign-weights-accepted",
        "ifp_mlx/loading.py",
        '        reason = None if predictor_any else foreign(ifp_config["predictor"], ifp_config)',
        "        reason = None",
        ["tests/test_load_errors.py", "-k", "other_weights"],
        "a head trained on 4-bit used on 8-bit",
    ),
    M(
        "convert-forgets-trained-on",
        "ifp_mlx/convert/core.py",
        '            cfg["ifp"]["predictor"]["trained_on"] = source_ifp["predictor"].get(\n',
        '            cfg["ifp"]["predictor"]["trained_on"] = weights_of(cfg["ifp"]) or dict(\n',
        ["tests/test_load_errors.py", "-k", "converting_again"],
        "a requantized folder claims its predictor was trained on it",
    ),
    # ---- logprobs in the server (#31)
    M(
        "logprobs-least-likely",
        "ifp_mlx/serve/engine.py",
        'np.argsort(-lp, kind="stable")[:top]',
        'np.argsort(lp, kind="stable")[:top]',
        ["tests/test_serve.py", "-k", "logprobs"],
        "top_logprobs lists the least likely tokens",
    ),
    M(
        "logprobs-stream-dropped",
        "ifp_mlx/serve/app.py",
        "shape.chunk(data, None, logprobs=shape.logprobs(pending, sent))",
        "shape.chunk(data, None)",
        ["tests/test_serve.py", "-k", "logprobs"],
        "a stream loses the logprobs of its text chunks",
    ),
    # ---- conversations and structured output in the server (#31)
    M(
        "slots-one-conversation",
        "ifp_mlx/serve/slots.py",
        "            if slot.prompt and n >= slot.prompt and n > longest:\n",
        "            if slot is self.slots[0] and slot.prompt and n >= slot.prompt:\n",
        ["tests/test_serve.py", "-k", "alternating"],
        "a second conversation throws the first one's cache away",
    ),
    M(
        "slots-no-restore",
        "ifp_mlx/serve/engine.py",
        "                self.model.apply_selection(turn.slot.selection)\n",
        "                pass\n",
        ["tests/test_serve.py", "-k", "alternating"],
        "a conversation answered with another one's units",
    ),
    M(
        "constrain-no-rewind",
        "ifp_mlx/constrain.py",
        "            self.matcher.rollback(self.count - emitted)\n",
        "            pass\n",
        ["tests/test_structured.py", "-m", "real", "-k", "bundled"],  # converts the model
        "the look-ahead token of a reselection chunk stays in the grammar",
    ),
    M(
        "tools-open-arguments",
        "ifp_mlx/tools.py",
        '        schema["additionalProperties"] = False\n',
        "        pass\n",
        ["tests/test_tool_calls.py", "-m", "real", "-k", "random_model"],
        "a forced call invents argument keys until max_tokens",
    ),
    M(
        "tools-no-partial-tag",
        "ifp_mlx/tools.py",
        "        if text.endswith(tag[:n]):\n",
        "        if False:\n",
        ["tests/test_tools.py"],
        "the first half of a call's start tag is streamed as text",
    ),
    M(
        "tools-finish-stop",
        "ifp_mlx/serve/engine.py",
        '                finish = "tool_calls"\n',
        "                pass\n",
        ["tests/test_tool_calls.py", "-m", "real", "-k", "random_model"],
        "an answer that called a tool ends with finish_reason stop",
    ),
    M(
        "tools-arguments-as-text",
        "ifp_mlx/tools.py",
        '"arguments": _arguments(c["function"]["arguments"])}}\n',
        '"arguments": c["function"]["arguments"]}}\n',
        ["tests/test_tools.py"],
        "a template that renders tools gets a call's arguments as JSON text",
    ),
]
MUTANTS += ROUND_TWO

BATCH = [  # answers decoding together (ifp_mlx.batch, ifp-serve --batch-size)
    M(
        "batch-no-masks",
        "ifp_mlx/batch.py",
        "    return any(r.sel is not None for r in rows)\n",
        "    return False\n",
        ["tests/test_batch.py", "-k", "rows_decode"],
        "rows decoding together run the full FFNs, not their own units",
    ),
    M(
        "batch-no-compensation",
        "ifp_mlx/selection.py",
        "            deltas.append(_dropped_mean(comp, i, down, comp.unit_means[i] * mask))\n",
        "            deltas.append(None)\n",
        ["tests/test_batch.py", "-k", "masked_full"],
        "a masked row loses its dropped units' mean output",
    ),
    M(
        "batch-no-kv-write-back",
        "ifp_mlx/batch.py",
        "                row.cache[layer].update_and_fetch(k[i : i + 1], v[i : i + 1])\n",
        "                pass\n",
        ["tests/test_batch.py", "-k", "rows_decode"],
        "a batched token's keys and values never reach its row's cache",
    ),
    M(
        "batch-no-reselection",
        "ifp_mlx/batch.py",
        "            self._reselect()\n",
        "            pass\n",
        ["tests/test_batch.py", "-k", "rows_decode"],
        "a batched row keeps its prompt's units: no dense head end, no reselection",
    ),
    M(
        "batch-shared-slot",
        "ifp_mlx/serve/slots.py",
        "            if slot.busy:",
        "            if False:",
        ["tests/test_batch.py", "-k", "twice or handed_out"],
        "two answers at once write one conversation's cache",
    ),
    M(
        "batch-no-restore",
        "ifp_mlx/serve/engine.py",
        "sampler=self.sampler, selection=None if self.reselect else slot.selection,",
        "sampler=self.sampler, selection=None,",
        ["tests/test_batch.py", "-k", "alternating"],
        "a batched conversation's next turn selects anew instead of using its units",
    ),
]
MUTANTS += BATCH


def _tree(dst: Path) -> None:
    """A copy of the working tree importable as ``ifp_mlx`` (convert/ and apps/ linked in as
    the package-dir mapping of pyproject.toml does it)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    for sub in ("convert", "apps"):
        (dst / "ifp_mlx" / sub).symlink_to(dst / sub, target_is_directory=True)


def _source(tree: Path, m: Mutant) -> Path:
    rel = m.path.replace("ifp_mlx/apps/", "apps/").replace("ifp_mlx/convert/", "convert/")
    return tree / rel


def run(mutants: List[Mutant]) -> int:
    survivors, broken = [], []
    with tempfile.TemporaryDirectory(prefix="ifp-mutants-") as tmp:
        tree = Path(tmp)
        _tree(tree)
        env = {k: v for k, v in os.environ.items() if k != "IFP_TEST_CACHE"}
        env["PYTHONPATH"] = str(tree)
        for m in mutants:
            path = _source(tree, m)
            text = path.read_text()
            if text.count(m.old) != 1:
                broken.append(m.name)
                print(f"{m.name:32s} BROKEN: its text occurs {text.count(m.old)}× in {m.path}")
                continue
            path.write_text(text.replace(m.old, m.new))
            tic = time.time()
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 "-m", "not real", *m.tests], cwd=tree, env=env, capture_output=True, text=True,
            )  # fmt: skip
            path.write_text(text)
            status = {0: "SURVIVED", 1: "killed"}.get(res.returncode, f"error {res.returncode}")
            if res.returncode == 0:
                survivors.append(m.name)
            elif res.returncode != 1:
                broken.append(m.name)
            failed = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")][:1]
            print(f"{m.name:32s} {status:9s} {time.time() - tic:5.1f}s  {m.why}")
            for ln in failed:
                print(f"{'':32s} {ln[:110]}")
    print(f"\n{len(mutants)} mutants: {len(mutants) - len(survivors) - len(broken)} killed, "
          f"{len(survivors)} survived {survivors or ''}, {len(broken)} broken {broken or ''}")  # fmt: skip
    return 1 if survivors or broken else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.why}")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    return run(chosen)


if __name__ == "__main__":
    sys.exit(main())
