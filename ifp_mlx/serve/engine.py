"""The worker of ifp-serve: one thread owns the model (MLX runs one stream at a time) and runs
``stream_generate``, unchanged, for each request in arrival order. Waiting requests form a
bounded FIFO queue (full: 429 + Retry-After); a request whose client left while it waited is
dropped before it runs. The last conversation's KV cache is kept: a request that resends it
plus a new message feeds only the new tokens, and under ``policy: "first-turn"`` also keeps
the units it selected."""

import asyncio
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
            if self.active > self.cfg.max_queue:
                raise QueueFull
            self.active += 1
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return max(self.active - 1, 0)

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
        from ..generate import make_sampler, prompt_tokens, stream_generate

        r = job.request
        tools = r.tools if r.tool_choice != "none" else None  # "none": not shown at all
        full = prompt_tokens(self.tokenizer, r.prompt, chat=r.chat, tools=tools)
        full = self.model.check_tokens(full)
        max_tokens, context = r.max_tokens, self.context
        if context and len(full) + max_tokens > context:
            left = context - len(full)
            if r.max_tokens_given or left < 1:
                raise IFPError(f"the model's context is {context} tokens: {len(full)} in the "
                               f"prompt leave {max(left, 0)}, max_tokens asks {max_tokens}")  # fmt: skip
            max_tokens = left  # the server's default, cut to what the context leaves
        settings = {"keep": r.keep, "predictor": r.predictor}
        slot = self.slots.take(full)  # the conversation this continues, or a new one
        new = slot.cache.new_tokens(full)
        # The same conversation, one turn on: the request resends the previous prompt whole.
        continues = 0 < slot.prompt <= len(full) - len(new)
        if not continues:  # a new conversation: exactly what a fresh generation computes
            slot.cache.reset()
            new = full
        reselect = not (continues and r.policy == "first-turn" and slot.settings == settings
                        and slot.selection is not None)  # fmt: skip
        restored = not reselect and self.model.selection is not slot.selection
        if restored:  # its units again (another conversation ran in between)
            self.model.apply_selection(slot.selection)
        sampler = make_sampler(r.temperature, r.top_p, r.seed)
        grammar, calls = r.grammar, None
        if tools:  # the answer's tool calls come out as tool_calls; a forced one by grammar
            from ..tools import CallSplitter, call_format
            from ..tools import grammar as call_grammar

            fmt = call_format(self.tokenizer)
            forced = r.tool_choice if r.tool_choice != "auto" else None
            if forced is not None:
                grammar = call_grammar(fmt, tools, forced["name"] if isinstance(forced, dict) else None)  # fmt: skip
            calls = CallSplitter(fmt, tools, single=forced is not None or not r.parallel_tool_calls)
        if grammar is not None:  # structured output: only what the grammar allows
            from ..constrain import Constrained

            sampler = Constrained(self.tokenizer, self.model.vocab_size, grammar, sampler)
        stream = stream_generate(
            self.model, self.tokenizer, new, keep=r.keep, predictor=r.predictor,
            max_tokens=max_tokens, prompt_cache=slot.cache.cache, reselect=reselect,
            sampler=sampler,
        )  # fmt: skip
        generated, started, text, sent, finish = [], False, "", 0, None
        hold = max((len(s) for s in r.stop), default=1) - 1
        scored, spans, told = [], [], 0  # logprobs: entries, (start, end) in text, sent
        tic = time.perf_counter()
        try:
            for resp in stream:
                if not started:
                    started = True
                    slot.settings, slot.prompt = settings, len(full)
                    job.emit("start", {"prompt_tokens": len(full), "reused": len(full) - len(new),
                                       "reselected": reselect})  # fmt: skip
                if r.logprobs:
                    scored.append(self._scored(resp, r.top_logprobs, generated[-3:]))
                    spans.append((len(text), len(text) + len(resp.text)))
                generated.append(resp.token)
                text += resp.text
                cut = min((i for i in map(text.find, r.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                elif resp.finish_reason:
                    finish = resp.finish_reason
                end = len(text) if finish else max(sent, len(text) - hold)
                if r.logprobs:  # the tokens of the text sent now (at the end: all that show)
                    n = told
                    while n < len(spans) and _shown(spans[n], end, finish):
                        n += 1
                    if n > told:
                        job.emit("logprobs", scored[told:n])
                        told = n
                if end > sent:
                    _send(job, *(calls.feed(text[sent:end]) if calls else (text[sent:end], [])))
                    sent = end
                if self._stop(bool(finish) or job.cancelled.is_set()):
                    break
            stats = resp.ifp if started else None
        finally:
            stream.close()  # one generation per model: this one ends here
            slot.cache.commit(full, generated, started)
            slot.selection = self.model.selection if started else slot.selection
            self.slots.trim()
        if calls is not None:
            _send(job, *calls.finish())
            if calls.calls and finish == "stop":
                finish = "tool_calls"
        job.emit("done", {
            "finish_reason": finish or "length",
            "completion_tokens": len(generated),
            "ifp": {**_ifp_fields(stats, reselect, len(full) - len(new),
                                  (time.perf_counter() - tic) * 1e3), "restored_units": restored},
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
