"""The worker of ifp-serve: one thread owns the model (MLX runs one stream at a time). With
``--batch-size 1`` it runs ``stream_generate``, unchanged, for each request in arrival order;
with more, requests that arrive while others run decode together (``ifp_mlx.batch``: one pass
per token for all, each on its own units). Waiting requests form a bounded FIFO queue (full:
429 + Retry-After); a request whose client left while it waited is dropped before it runs.
Conversations keep their KV caches (``Slots``): a request that resends one plus a new message
feeds only the new tokens, and under ``policy: "first-turn"`` also keeps the units it
selected."""

import asyncio
import collections
import json
import queue
import threading
import time
from dataclasses import asdict
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from .protocol import Request, ServeConfig


class Job:
    """One request's passage through the worker: events flow back on an asyncio queue."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, data: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class QueueFull(Exception):
    pass


class _Mirror:
    """A job as a follower rank runs it: rank 0's request, nobody to tell."""

    def __init__(self, request: Request):
        self.request, self.cancelled = request, threading.Event()

    def emit(self, kind: str, data: Any = None) -> None:
        pass


class Engine:
    """Owns the model on one thread; runs jobs in arrival order, one at a time."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.active = 0  # jobs admitted and not finished: the running one + those waiting
        self.served = 0  # jobs run
        self.dropped = 0  # jobs whose client left before they ran
        self.running = 0  # answers decoding together (batched)
        self._batchable: Optional[bool] = None  # the model's cache can join a batch
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="ifp-serve-worker", daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.active >= self.cfg.max_queue + max(self.cfg.batch_size, 1):
                raise QueueFull
            self.active += 1
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return max(self.active - max(self.running, 1), 0)

    def close(self) -> None:
        self.jobs.put(None)

    # everything below runs on the worker thread (it alone touches MLX)

    def _run(self) -> None:
        try:
            from .. import load
            from .slots import Slots

            self.model, self.tokenizer = load(self.cfg.model, ffn_store=self.cfg.ffn_store,
                                              verify_store=self.cfg.verify_store,
                                              predictor_any=self.cfg.predictor_any,
                                              distributed=self.cfg.distributed,
                                              shard_policy=self.cfg.shard_policy)  # fmt: skip
            shard = getattr(self.model, "sharding", None)
            self.group = shard.group if shard is not None and shard.size > 1 else None
            self.rank = shard.rank if shard is not None else 0
            from ..generate import context_length

            self.context = context_length(self.model)  # tokens (None: unknown)
            self.slots = Slots(self.model, self.cfg.prompt_cache_size, self.cfg.prompt_cache_bytes)
        except BaseException as e:  # reported by the constructor, in the main thread
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        if self.cfg.batch_size > 1 and self.group is None:
            return self._serve_batched()
        while True:
            job, skip = self._next_job()
            if job is None:
                return
            try:
                if skip:
                    self.dropped += 1
                else:
                    self.served += 1
                    self._generate(job)
            except IFPError as e:
                job.emit("error", str(e))
            except Exception as e:  # a bug: the request fails, the server goes on
                job.emit("fatal", f"{type(e).__name__}: {e}")
            finally:
                with self.lock:
                    self.active -= 1
                job.emit("end")

    def _serve_batched(self) -> None:
        """Requests that run at the same time decode together (``ifp_mlx.batch``): up to
        ``batch_size`` answers, each on its own units, one pass per token for all of them. A
        request joins at the next token; one that must run alone (``_alone``) waits
        for the batch to empty, and the requests behind it wait too (arrival order)."""
        from ..batch import step

        rows: list = []  # (turn, row) decoding
        waiting: collections.deque = collections.deque()  # taken from the queue, not started
        closing = False
        while True:
            while not closing:  # what has arrived; wait only when there is nothing to do
                try:
                    job = self.jobs.get(block=not rows and not waiting)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                else:
                    waiting.append(job)
            while waiting and len(rows) < self.cfg.batch_size:
                job = waiting[0]
                if job.cancelled.is_set():  # its client left while it waited
                    waiting.popleft()
                    self.dropped += 1
                    self._end(job)
                    continue
                alone = self._alone(job.request)
                if alone and rows:
                    break  # it runs alone once the batch is done
                waiting.popleft()
                self.served += 1
                if alone:
                    self._run_one(job)
                    continue
                try:
                    turn = Turn(self, job)
                except Exception as e:
                    self._fail(job, e)
                    continue
                try:
                    row = turn.row()
                    row.start(alone=not rows)
                    rows.append((turn, row))
                except Exception as e:  # its prompt may be part-prefilled
                    turn.discard()
                    self._fail(job, e)
            self.running = len(rows)
            if not rows:
                if closing and not waiting:
                    return
                continue
            try:
                responses = step([row for _, row in rows], alone=len(rows) == 1)
                for turn, _ in rows:
                    turn.batch = max(turn.batch, len(rows))
                finished = [t.feed(resp) for (t, _), resp in zip(rows, responses)]
            except Exception as e:  # a bug in the shared pass: every answer in it fails
                finished = [True] * len(rows)
                for turn, _ in rows:
                    turn.failed = e
            for (turn, row), end in zip(list(rows), finished):
                if end:
                    rows.remove((turn, row))
                    self._finish(turn, row.sel)

    def _alone(self, request: Request) -> bool:
        """Whether a request must decode alone: a seeded sampled answer (its random draws must
        not interleave with another's), or a model whose cache is a rotating window."""
        from mlx_lm.models.cache import make_prompt_cache

        from ..batch import batchable

        if self._batchable is None:
            self._batchable = batchable(make_prompt_cache(self.model))
        return (request.seed is not None and request.temperature > 0) or not self._batchable

    def _run_one(self, job) -> None:
        """``job`` by itself, through ``stream_generate`` (the FIFO path)."""
        try:
            self._generate(job)
        except Exception as e:
            self._fail(job, e, end=False)
        self._end(job)

    def _finish(self, turn: "Turn", selection) -> None:
        """A batched answer is over: its conversation keeps its cache and units; the client
        hears the end (or the failure of the pass)."""
        try:
            if turn.failed is not None:  # its cache may be part-written: the conversation restarts
                turn.discard()
                raise turn.failed
            turn.commit(selection)
            turn.done()
        except Exception as e:
            self._fail(turn.job, e, end=False)
        self._end(turn.job)

    def _fail(self, job, e: BaseException, end: bool = True) -> None:
        if isinstance(e, IFPError):
            job.emit("error", str(e))
        else:  # a bug: the request fails, the server goes on
            job.emit("fatal", f"{type(e).__name__}: {e}")
        if end:
            self._end(job)

    def _end(self, job) -> None:
        with self.lock:
            self.active -= 1
        job.emit("end")

    def _next_job(self):
        """(job, skip it): from the queue, or on a sharded model from rank 0, which tells the
        other ranks each job (and whether it was cancelled while waiting) so every rank runs
        the same generations in the same order."""
        if self.group is None:
            job = self.jobs.get()
            return job, job is not None and job.cancelled.is_set()
        from ..distributed import broadcast_text

        if self.rank == 0:
            job = self.jobs.get()
            skip = job is not None and job.cancelled.is_set()
            text = "" if job is None else json.dumps({"request": asdict(job.request), "skip": skip})
            broadcast_text(self.group, text)
            return job, skip
        text = broadcast_text(self.group, None)
        if not text:
            return None, False
        d = json.loads(text)
        return _Mirror(Request(**d["request"])), d["skip"]

    def _stop(self, stop: bool) -> bool:
        """Whether to end this answer now: rank 0 decides for every rank (only it hears a
        client hang up)."""
        if self.group is None:
            return stop
        from ..distributed import broadcast_flag

        return broadcast_flag(self.group, stop)

    def _scored(self, resp, top: int, before: list) -> dict:
        """The token's log-probability under the model that produced it (pruned or dense: the
        log-softmax of its logits), with the ``top`` most likely tokens at its place; each
        token's text as it reads after the answer's last tokens ``before``."""
        lp = np.asarray(resp.logprobs.astype(mx.float32))
        base = self.tokenizer.decode(before) if before else ""

        def entry(token: int) -> dict:
            piece = self.tokenizer.decode(before + [token])[len(base) :]
            return {"token": piece, "logprob": float(lp[token]),
                    "bytes": list(piece.encode("utf-8"))}  # fmt: skip

        out = entry(resp.token)
        best = np.argsort(-lp, kind="stable")[:top] if top else []  # no sort when none asked
        out["top_logprobs"] = [entry(int(i)) for i in best]
        return out

    def _generate(self, job: Job) -> None:
        """``job`` alone: mlx-lm's loop through ``stream_generate``."""
        from ..generate import stream_generate

        turn = Turn(self, job)
        r = turn.request
        stream = stream_generate(
            self.model, self.tokenizer, turn.new, keep=r.keep, predictor=r.predictor,
            max_tokens=turn.max_tokens, prompt_cache=turn.slot.cache.cache,
            reselect=turn.reselect, sampler=turn.sampler,
        )  # fmt: skip
        try:
            if turn.restored:  # its units again (another conversation ran in between)
                self.model.apply_selection(turn.slot.selection)
            for resp in stream:
                if turn.feed(resp):
                    break
        finally:
            stream.close()  # one generation per model: this one ends here
            turn.commit(self.model.selection)
        turn.done()


class Turn:
    """One request as the worker answers it: its prompt against the conversation it continues
    (``Slots``), its sampler (grammar, forced tool call), and what reaches the client as each
    token arrives (text held back for stop strings, logprobs, tool calls). The tokens come from
    ``stream_generate`` (a request alone) or from a batch (``ifp_mlx.batch``)."""

    def __init__(self, engine: "Engine", job):
        from ..generate import make_sampler, prompt_tokens

        self.engine, self.job = engine, job
        r = self.request = job.request
        tokenizer, model = engine.tokenizer, engine.model
        tools = r.tools if r.tool_choice != "none" else None  # "none": not shown at all
        full = prompt_tokens(tokenizer, r.prompt, chat=r.chat, tools=tools)
        full = self.full = model.check_tokens(full)
        max_tokens, context = r.max_tokens, engine.context
        if context and len(full) + max_tokens > context:
            left = context - len(full)
            if r.max_tokens_given or left < 1:
                raise IFPError(f"the model's context is {context} tokens: {len(full)} in the "
                               f"prompt leave {max(left, 0)}, max_tokens asks {max_tokens}")  # fmt: skip
            max_tokens = left  # the server's default, cut to what the context leaves
        self.max_tokens = max_tokens
        sampler = make_sampler(r.temperature, r.top_p, r.seed)
        grammar, self.calls = r.grammar, None
        if tools:  # the answer's tool calls come out as tool_calls; a forced one by grammar
            from ..tools import CallSplitter, call_format
            from ..tools import grammar as call_grammar

            fmt = call_format(tokenizer)
            forced = r.tool_choice if r.tool_choice != "auto" else None
            if forced is not None:
                grammar = call_grammar(fmt, tools, forced["name"] if isinstance(forced, dict) else None)  # fmt: skip
            self.calls = CallSplitter(fmt, tools, single=forced is not None or not r.parallel_tool_calls)  # fmt: skip
        if grammar is not None:  # structured output: only what the grammar allows
            from ..constrain import Constrained

            sampler = Constrained(tokenizer, model.vocab_size, grammar, sampler)
        self.settings = {"keep": r.keep, "predictor": r.predictor}
        slot = self.slot = engine.slots.take(full)  # the conversation this continues, or new
        new = slot.cache.new_tokens(full)
        # The same conversation, one turn on: the request resends the previous prompt whole.
        continues = 0 < slot.prompt <= len(full) - len(new)
        if not continues:  # a new conversation: exactly what a fresh generation computes
            slot.cache.reset()
            new = full
        self.new = new
        self.reselect = not (continues and r.policy == "first-turn"
                             and slot.settings == self.settings
                             and slot.selection is not None)  # fmt: skip
        self.restored = not self.reselect and model.selection is not slot.selection
        self.sampler = sampler
        self.generated, self.started, self.text, self.sent, self.finish = [], False, "", 0, None
        self.hold = max((len(s) for s in r.stop), default=1) - 1
        self.scored, self.spans, self.told = [], [], 0  # logprobs: entries, spans in text, sent
        self.stats = None
        self.batch = 1  # the most answers it decoded beside (itself included)
        self.failed: Optional[BaseException] = None  # the batched pass it was in failed
        self.tic = time.perf_counter()

    def row(self):
        """This request as a row of a batch (``ifp_mlx.batch.Row``)."""
        from ..batch import Row

        r, slot = self.request, self.slot
        return Row(self.engine.model, self.engine.tokenizer, self.new, slot.cache.cache,
                   keep=r.keep, predictor=r.predictor, max_tokens=self.max_tokens,
                   sampler=self.sampler, selection=None if self.reselect else slot.selection,
                   reselect=self.reselect)  # fmt: skip

    def feed(self, resp) -> bool:
        """One token's response; True when the answer ends here (finished, a stop string, the
        client gone)."""
        job, r, engine = self.job, self.request, self.engine
        if not self.started:
            self.started = True
            self.slot.settings, self.slot.prompt = self.settings, len(self.full)
            job.emit("start", {"prompt_tokens": len(self.full),
                               "reused": len(self.full) - len(self.new),
                               "reselected": self.reselect})  # fmt: skip
        if r.logprobs:
            self.scored.append(engine._scored(resp, r.top_logprobs, self.generated[-3:]))
            self.spans.append((len(self.text), len(self.text) + len(resp.text)))
        self.generated.append(resp.token)
        self.text += resp.text
        self.stats = resp.ifp
        cut = min((i for i in map(self.text.find, r.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
        elif resp.finish_reason:
            self.finish = resp.finish_reason
        end = len(self.text) if self.finish else max(self.sent, len(self.text) - self.hold)
        if r.logprobs:  # the tokens of the text sent now (at the end: all that show)
            n = self.told
            while n < len(self.spans) and _shown(self.spans[n], end, self.finish):
                n += 1
            if n > self.told:
                job.emit("logprobs", self.scored[self.told : n])
                self.told = n
        if end > self.sent:
            piece = self.text[self.sent : end]
            _send(job, *(self.calls.feed(piece) if self.calls else (piece, [])))
            self.sent = end
        return engine._stop(bool(self.finish) or job.cancelled.is_set())

    def commit(self, selection) -> None:
        """The conversation's cache and units after this answer (finished, stopped or failed)."""
        slot = self.slot
        slot.busy = False
        slot.cache.commit(self.full, self.generated, self.started)
        slot.selection = selection if self.started else slot.selection
        self.engine.slots.trim()

    def discard(self) -> None:
        """Forget the conversation's cache and units (a failed pass may have written some
        layers' caches and not others); its next request starts anew."""
        slot = self.slot
        slot.busy, slot.prompt, slot.selection = False, 0, None
        slot.cache.reset()
        self.engine.slots.trim()

    def done(self) -> None:
        finish = self.finish
        if self.calls is not None:
            _send(self.job, *self.calls.finish())
            if self.calls.calls and finish == "stop":
                finish = "tool_calls"
        self.job.emit("done", {
            "finish_reason": finish or "length",
            "completion_tokens": len(self.generated),
            "ifp": {**_ifp_fields(self.stats if self.started else None, self.reselect,
                                  len(self.full) - len(self.new),
                                  (time.perf_counter() - self.tic) * 1e3),
                    "restored_units": self.restored, "batch": self.batch},
        })  # fmt: skip


def _send(job, text: str, found: list) -> None:
    """Answer text to the client, and the tool calls found in it (``tools.CallSplitter``)."""
    if text:
        job.emit("text", text)
    if found:
        job.emit("tool_calls", found)


def _shown(span, end: int, finish: Optional[str]) -> bool:
    """Whether a token whose text is ``span`` of the answer belongs with the text sent up to
    ``end``: all of it is sent; at the end, any of it (a stop string cuts the rest)."""
    if not finish:
        return span[1] <= end
    return finish != "stop" or span[0] < end


def _ifp_fields(stats, reselected: bool, reused: int, total_ms: float) -> dict:
    if stats is None:
        return {}
    return {
        "keep": round(stats.keep, 4),
        "predictor": stats.predictor,
        "reselected": reselected,
        "reused_prompt_tokens": reused,
        "select_ms": round(stats.select_ms + stats.score_prefill_ms, 2),
        "materialize_ms": round(stats.materialize_ms, 2),
        "bytes_read": stats.read_bytes,
        "ttft_ms": round(stats.ttft_ms, 2),
        "expected_kl": stats.expected_kl,
        "ffn_store": stats.store,
    }
