"""Several answers decoding together, each on its own per-prompt units.

Per-prompt pruning gives every answer its own FFN. A batch cannot share one compact model, so
while two or more answers run, the full FFNs are installed and each row is masked to exactly
its own units, plus its own compensation bias (``model.row_masks``, ``row_terms``): every row
computes what its compact model computes (the sum over units just also adds zeros), and one
pass reads the weights once for all rows. An answer running alone runs on its compact model,
as ``stream_generate`` does.

Each :class:`Row` takes the steps ``stream_generate`` takes alone: the predictor reads the
prompt (the activation predictor's dense prefill fills the row's cache), the default's dense
head, and every ``rescore`` tokens a dense pass over the new tokens and a reselection. Those
steps read one prompt and run row by row; the token-by-token decoding in between runs batched
(:func:`step`), with the rows' KV caches merged into mlx-lm's ``BatchKVCache`` for the pass.
"""

import copy
import time
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, trim_prompt_cache

from .budget import budget_units, is_dense, resolve
from .generate import IFPResponse, IFPStats, context_length, following_predictor
from .model import row_masks

PREFILL_STEP = 512


def batchable(cache: list) -> bool:
    """Whether a row with this cache can join a batch: plain KV caches only (a rotating
    sliding-window cache, e.g. Gemma 3's local layers or ``max_kv_size``, runs alone)."""
    return all(type(c) is KVCache for c in cache)


class Row:
    """One answer in a batch: its cache, its units, its sampler and where it is in the dense
    head / reselection schedule. ``start()`` runs its prompt; ``take()`` hears each token."""

    def __init__(self, model: nn.Module, tokenizer, tokens: List[int], cache: list,
                 keep=None, predictor=None, max_tokens: int = 256,
                 sampler: Optional[Callable] = None, selection=None, reselect: bool = True,
                 rescore: Optional[int] = None, dense_head: Optional[int] = None):  # fmt: skip
        from .generate import make_sampler

        self.model, self.tokenizer, self.tokens, self.cache = model, tokenizer, tokens, cache
        self.keep, self.predictor, self.max_tokens = keep, predictor, max_tokens
        self.sampler = sampler or make_sampler()
        self.sel, self.reselect = selection, reselect
        ifp = model.__dict__.get("_ifp_config", {})
        self.every = ifp.get("rescore", 0) if rescore is None else rescore
        self.head = ifp.get("dense_head", 0) if dense_head is None else dense_head
        self.detok = copy.copy(tokenizer.detokenizer)
        self.detok.reset()
        self.stats = IFPStats(prompt_tokens=len(tokens), store=model.ffn_store)
        self.n, self.finish, self.y = 0, None, None
        self.tic = self.t_first = time.perf_counter()  # start(); the first token
        self.pred = None  # the accumulating predictor of a rescoring row
        self._terms = None

    # ------------------------------------------------------------ the prompt

    def start(self, alone: bool) -> None:
        """Score / select from the prompt and prefill all but the token fed next; ``alone``:
        no other answer is running (the row may use its compact model)."""
        model, tokens = self.model, self.tokens
        limit = context_length(model)
        if limit and self.cache[0].offset + len(tokens) >= limit:
            from .errors import IFPError

            raise IFPError(f"prompt is {self.cache[0].offset + len(tokens)} tokens, the model's "
                           f"context is {limit}")  # fmt: skip
        self.tic = time.perf_counter()
        choice = self.choice = resolve(model, self.keep, self.predictor)
        budget_units(choice.keep, model.ffn_units)
        rest, io0 = tokens, model.ffn_io
        if is_dense(choice.keep):
            self.sel = None
        elif self.reselect or self.sel is None:
            self.pred = self._rescorer(choice)
            if self.pred is not None and self.head:  # a dense head: score the prompt only
                _for_scoring(model)
                tic = time.perf_counter()
                result = self.pred.score(model, tokens, self.cache)
                mx.eval(result.scores)
                self.stats.score_prefill_ms = (time.perf_counter() - tic) * 1e3
                self.sel, rest = None, tokens[result.prefilled :]
            else:
                sel = self._select(tokens, choice.keep, self.pred or choice.predictor)
                self.stats.score_prefill_ms, self.stats.select_ms = sel.score_ms, sel.select_ms
                rest = tokens[sel.prefilled :]
        self._note_selection()
        self.stats.read_bytes, self.stats.read_calls = (
            a - b for a, b in zip(model.ffn_io, io0))  # fmt: skip
        self.base, self.rest, self.chunk = self.cache[0].offset, rest, []
        self.steps = self.head if self.pred is not None and self.head else (self.every or None)
        if len(rest) > 1:
            forward([self], [rest[:-1]], alone)
        self.y = rest[-1]

    def _rescorer(self, choice):
        """The predictor that follows the answer, or None (``generate.following_predictor``)."""
        return following_predictor(choice, self.cache) if self.every or self.head else None

    def _select(self, tokens: List[int], keep, predictor):
        sel = self.model.select(tokens, keep, predictor, cache=self.cache, materialize=False)
        sel.expected_kl, sel.max_kl = self.choice.expected_kl, self.choice.max_kl
        self.sel, self._terms = sel, None
        return sel

    def _note_selection(self) -> None:
        if self.sel is not None:
            s = self.stats
            s.keep, s.predictor = self.sel.keep, self.sel.predictor
            s.expected_kl, s.max_kl = self.sel.expected_kl, self.sel.max_kl

    def terms(self):
        """The row's masks and compensation biases over the full FFNs (``row_terms``)."""
        if self._terms is None:
            self._terms = self.model.row_terms(self.sel)
        return self._terms

    # ------------------------------------------------------------ each token

    def take(self, token: int, logprobs: mx.array) -> IFPResponse:
        """The row's next token: its response (text, finish), then a reselection when a chunk
        of the schedule is complete."""
        self.n += 1
        if self.n == 1:
            self.stats.ttft_ms = (time.perf_counter() - self.tic) * 1e3
            self.t_first = time.perf_counter()
        eos = token in self.tokenizer.eos_token_ids
        if not eos:
            self.detok.add_token(token)
        if eos or self.n == self.max_tokens:
            self.detok.finalize()
            self.finish = "stop" if eos else "length"
        resp = self._response(token, logprobs)
        self.chunk.append(token)
        if self.finish is None and self.pred is not None and len(self.chunk) == self.steps:
            self._reselect()
        self.y = token
        return resp

    def _response(self, token: int, logprobs: mx.array) -> IFPResponse:
        s, dt = self.stats, time.perf_counter() - self.t_first
        s.generation_tokens = self.n
        s.generation_tps = (self.n - 1) / dt if dt > 0 else 0.0
        s.prompt_tps = len(self.tokens) / (s.ttft_ms / 1e3) if s.ttft_ms else 0.0
        return IFPResponse(
            text=self.detok.last_segment, token=token, logprobs=logprobs, from_draft=False,
            prompt_tokens=len(self.tokens), prompt_tps=s.prompt_tps, generation_tokens=self.n,
            generation_tps=s.generation_tps, peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=self.finish, ifp=s,
        )  # fmt: skip

    def _reselect(self) -> None:
        """As ``generate.Rescorer``: the cache holds rest + chunk[:-1] from the pruned (or
        head: dense) model; a dense pass rewrites them and adds their activations, the top
        units of prompt + answer so far are chosen, and chunk[-1] is fed next."""
        tic = time.perf_counter()
        trim_prompt_cache(self.cache, self.cache[0].offset - self.base)
        self._select(self.rest + self.chunk, self.choice.keep, self.pred)
        self._note_selection()
        self.stats.rescores += 1
        self.stats.rescore_ms += (time.perf_counter() - tic) * 1e3
        self.base, self.rest, self.chunk = self.cache[0].offset, self.chunk[-1:], []
        self.steps = self.every or None


def _for_scoring(model: nn.Module) -> None:
    """A dense pass next: the full FFNs (memory store), or streamed units (flash store)."""
    if model.__dict__.get("_ifp_state") == "selected":
        model.dense() if model.ffn_store == "memory" else model.release()


def _install(model: nn.Module, rows: List[Row], alone: bool) -> bool:
    """Put in place what a pass of ``rows`` needs; True when it runs on masks. A row alone runs
    on its compact model (dense: the full or streamed FFNs), as it would by itself; two or more
    rows run on the full FFNs (the flash store reads them once, then keeps them)."""
    if alone and len(rows) == 1:
        sel = rows[0].sel
        if sel is None:
            _for_scoring(model)
        elif model.selection is not sel:
            model.apply_selection(sel)
            rows[0].stats.materialize_ms += sel.materialize_ms
        return False
    if model.__dict__.get("_ifp_state") != "dense":  # flash: read once, kept while dense
        model.dense()
    return any(r.sel is not None for r in rows)


def _stacked(parts: list, size: int, fill: float) -> Optional[mx.array]:
    """(rows, 1, size) from per-row vectors (None: ``fill`` everywhere), or None if all are."""
    ref = next((p for p in parts if p is not None), None)
    if ref is None:
        return None
    return mx.stack([mx.full((size,), fill, ref.dtype) if p is None else p for p in parts])[:, None]


_TERMS: dict = {}  # the last batch's stacked masks and biases, by its rows and their units


def _batch_terms(model: nn.Module, rows: List[Row]):
    """Per layer, the rows' masks and biases stacked (rows, 1, ·): built when the batch or a
    row's units change (a row joins, leaves or reselects), not on every token."""
    key = tuple((id(r), id(r.sel)) for r in rows)
    if _TERMS.get("key") != key:
        terms = [r.terms() for r in rows]
        hidden = next((d.shape[-1] for _, ds in terms for d in ds if d is not None), 0)
        masks = [_stacked([t[0][i] for t in terms], n, 1.0) for i, n in enumerate(model.ffn_units)]
        deltas = [_stacked([t[1][i] for t in terms], hidden, 0.0) for i in range(len(masks))]
        _TERMS.clear()
        # the rows and selections stay referenced, so the ids in the key stay theirs
        _TERMS.update(key=key, held=[(r, r.sel) for r in rows], masks=masks, deltas=deltas)
    return _TERMS["masks"], _TERMS["deltas"]


def forward(rows: List[Row], inputs: List[List[int]], alone: bool) -> mx.array:
    """One pass of ``rows`` over ``inputs`` (one row: any length, chunked; several rows: one
    token each), each on its own units; the logits of each row's last input (rows, vocab)."""
    model = rows[0].model
    masked = _install(model, rows, alone)
    masks, deltas = _batch_terms(model, rows) if masked else ([None] * len(model.ffn_units),) * 2
    with row_masks(model, masks, deltas):
        if len(rows) == 1:
            row, tokens, logits = rows[0], inputs[0], None
            for start in range(0, len(tokens), PREFILL_STEP):
                chunk = mx.array(tokens[start : start + PREFILL_STEP])[None]
                logits = model(chunk, cache=row.cache)
                if len(tokens) > 1:  # a prompt: one chunk at a time (a token: with sampling)
                    mx.eval(logits, [c.state for c in row.cache])
            return logits[:, -1]
        caches = [BatchKVCache.merge([r.cache[layer] for r in rows]) for layer in range(len(rows[0].cache))]  # fmt: skip
        logits = model(mx.array(inputs), cache=caches)[:, -1]
        for layer, bc in enumerate(caches):  # each row's cache gets its new entry
            k, v = bc.keys[..., bc._idx - 1 : bc._idx, :], bc.values[..., bc._idx - 1 : bc._idx, :]
            for i, row in enumerate(rows):
                row.cache[layer].update_and_fetch(k[i : i + 1], v[i : i + 1])
        return logits


def step(rows: List[Row], alone: bool) -> List[IFPResponse]:
    """Every row feeds its next token and samples one (batched: one pass for all rows)."""
    logits = forward(rows, [[r.y] for r in rows], alone)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tokens = [r.sampler(logprobs[i : i + 1]) for i, r in enumerate(rows)]
    mx.eval(tokens, logprobs, [c.state for r in rows for c in r.cache])
    return [r.take(int(t.item()), logprobs[i]) for i, (r, t) in enumerate(zip(rows, tokens))]
