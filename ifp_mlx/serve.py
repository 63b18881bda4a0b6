"""``ifp-serve``: an OpenAI-compatible local server with per-request pruning.

Requests are parsed and validated here (OpenAI-style errors); generation is
``stream_generate``, unchanged, on one worker thread that owns the model (MLX runs one stream at
a time). Waiting requests form a bounded FIFO queue (full: 429 + Retry-After). The last
conversation's KV cache is kept: a request that resends it plus a new message feeds only the
new tokens, and under ``policy: "first-turn"`` also keeps the units it selected.
"""

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import IFPError

ROLES = ("system", "user", "assistant")


@dataclass
class ServeConfig:
    model: Optional[str] = None  # folder (None: the bundled model)
    keep: Any = None  # the server's default budget (None: the folder's default)
    predictor: Optional[str] = None
    policy: str = "first-turn"
    ffn_store: str = "auto"  # flash where the folder has a unit file
    api_key: Optional[str] = None
    max_queue: int = 8  # requests waiting behind the running one
    max_body_mb: float = 1.0
    max_tokens: int = 512  # when a request gives none
    distributed: bool = False  # one rank of an mlx.launch job (rank 0 serves HTTP)
    shard_policy: str = "global"


class BadRequest(Exception):
    """A 4xx: an OpenAI-style error body."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind)  # fmt: skip

    def body(self) -> dict:
        err = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return {"error": err}


# ---------------------------------------------------------------- request validation


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise BadRequest(f"'{name}' must be a number", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        bracket = "(" if lo_open else "["
        raise BadRequest(f"'{name}' must be in {bracket}{lo}, {hi}], not {v}", name)
    return v


def _integer(body: dict, name: str, lo: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BadRequest(f"'{name}' must be an integer ≥ {lo}", name)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):  # fmt: skip
            raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
        return "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise BadRequest(f"messages[{i}].content must be a string", "messages")
    return c


@dataclass
class Request:
    """One validated completion request."""

    chat: bool
    prompt: Any  # messages (chat) or a string / token ids (completions)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    keep: Any = None
    predictor: Optional[str] = None
    policy: str = "first-turn"


def parse_request(body: Any, chat: bool, model_id: str, cfg: ServeConfig) -> Request:
    from .chat import POLICIES
    from .predictors import available
    from .selection import check_keep

    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    if model not in (None, model_id):
        raise BadRequest(f"model {model!r} is not served here (this server has {model_id!r})",
                         "model", status=404, code="model_not_found")  # fmt: skip
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        prompt = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] needs a role in {', '.join(ROLES)}", "messages")
            prompt.append({"role": m["role"], "content": _content(m, i)})
        if not any(m["content"].strip() for m in prompt):
            raise BadRequest("the messages are empty", "messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)  # fmt: skip
        if not ids and not (isinstance(prompt, str) and prompt.strip()):
            raise BadRequest("'prompt' must be a non-empty string or list of token ids", "prompt")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 1, cfg.max_tokens)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):  # fmt: skip
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be {\"include_usage\": bool}", "stream_options")
    keep = body.get("keep", cfg.keep)
    try:
        if keep is not None and keep != "auto":
            for k in keep if isinstance(keep, list) else [keep]:
                if isinstance(k, bool) or not isinstance(k, (int, float)):
                    raise IFPError("keep must be a number in (0, 1], a list of them or 'auto'")
                check_keep(k)
    except IFPError as e:
        raise BadRequest(str(e), "keep")
    predictor = body.get("predictor", cfg.predictor)
    if predictor is not None and predictor not in available():
        raise BadRequest(f"unknown predictor {predictor!r} (have: {', '.join(available())})",
                         "predictor")  # fmt: skip
    policy = body.get("policy", cfg.policy)
    if policy not in POLICIES:
        raise BadRequest(f"'policy' must be one of {', '.join(POLICIES)}", "policy")
    return Request(
        chat, prompt, max_tokens,
        temperature=_number(body, "temperature", 0, 2, 0.0),
        top_p=_number(body, "top_p", 0, 1, 1.0, lo_open=True),
        seed=_integer(body, "seed", 0, None),
        stop=stop, stream=stream, include_usage=options.get("include_usage", False),
        keep=keep, predictor=predictor, policy=policy,
    )  # fmt: skip


# ---------------------------------------------------------------- the engine


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
            from . import load
            from .chat import PromptCache

            self.model, self.tokenizer = load(self.cfg.model, ffn_store=self.cfg.ffn_store,
                                              distributed=self.cfg.distributed,
                                              shard_policy=self.cfg.shard_policy)  # fmt: skip
            shard = getattr(self.model, "sharding", None)
            self.group = shard.group if shard is not None and shard.size > 1 else None
            self.rank = shard.rank if shard is not None else 0
            self.cache = PromptCache(self.model)
            self.last: Optional[dict] = None  # the previous request's selection settings
            self.prev_prompt = 0  # and its prompt's length in tokens
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
                if not skip:
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
        from .distributed import broadcast_text

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
        from .distributed import broadcast_flag

        return broadcast_flag(self.group, stop)

    def _generate(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        from .generate import prompt_tokens, stream_generate

        r = job.request
        full = self.model.check_tokens(prompt_tokens(self.tokenizer, r.prompt, chat=r.chat))
        settings = {"keep": r.keep, "predictor": r.predictor}
        new = self.cache.new_tokens(full)
        # The same conversation, one turn on: the request resends the previous prompt whole.
        continues = 0 < self.prev_prompt <= len(full) - len(new)
        if not continues:  # another conversation: exactly what a fresh generation computes
            self.cache.reset()
            new = full
        reselect = not (continues and r.policy == "first-turn" and self.last == settings
                        and self.model.selection is not None)  # fmt: skip
        if r.seed is not None:
            mx.random.seed(r.seed)
        sampler = make_sampler(temp=r.temperature, top_p=r.top_p)
        stream = stream_generate(
            self.model, self.tokenizer, new, keep=r.keep, predictor=r.predictor,
            max_tokens=r.max_tokens, prompt_cache=self.cache.cache, reselect=reselect,
            sampler=sampler,
        )  # fmt: skip
        generated, started, text, sent, finish = [], False, "", 0, None
        hold = max((len(s) for s in r.stop), default=1) - 1
        tic = time.perf_counter()
        try:
            for resp in stream:
                if not started:
                    started = True
                    self.last, self.prev_prompt = settings, len(full)
                    job.emit("start", {"prompt_tokens": len(full), "reused": len(full) - len(new),
                                       "reselected": reselect})  # fmt: skip
                generated.append(resp.token)
                text += resp.text
                cut = min((i for i in map(text.find, r.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                elif resp.finish_reason:
                    finish = resp.finish_reason
                end = len(text) if finish else max(sent, len(text) - hold)
                if end > sent:
                    job.emit("text", text[sent:end])
                    sent = end
                if self._stop(bool(finish) or job.cancelled.is_set()):
                    break
            stats = resp.ifp if started else None
        finally:
            self.cache.commit(full, generated, started)
        job.emit("done", {
            "finish_reason": finish or "length",
            "completion_tokens": len(generated),
            "ifp": _ifp_fields(stats, reselect, len(full) - len(new),
                               (time.perf_counter() - tic) * 1e3),
        })  # fmt: skip


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


# ---------------------------------------------------------------- the ASGI app


def create_app(cfg: ServeConfig, engine: Optional[Engine] = None):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    engine = engine or Engine(cfg)
    model_id = Path(cfg.model).resolve().name if cfg.model else "SmolLM2-135M-Instruct-8bit"
    created = int(time.time())

    def error(e: BadRequest, headers=None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def read_json(request) -> Any:
        limit = int(cfg.max_body_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the body is over {cfg.max_body_mb:g} MB", status=413,
                             code="request_too_large")  # fmt: skip
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(f"the body is over {cfg.max_body_mb:g} MB", status=413,
                                 code="request_too_large")  # fmt: skip
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("the body is not valid UTF-8")
        except json.JSONDecodeError as e:
            raise BadRequest(f"the body is not valid JSON ({e.msg} at {e.pos})")

    def authorized(request) -> bool:
        return not cfg.api_key or request.headers.get("authorization") == f"Bearer {cfg.api_key}"

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "waiting": engine.waiting})

    async def models(request):
        if not authorized(request):
            return error(_unauthorized())
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "ifp-mlx"}]})  # fmt: skip

    async def completions(request, chat: bool):
        if not authorized(request):
            return error(_unauthorized())
        try:
            r = parse_request(await read_json(request), chat, model_id, cfg)
        except BadRequest as e:
            return error(e)
        except ClientDisconnect:
            return JSONResponse({}, status_code=400)
        job = Job(r, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            busy = BadRequest("the server is busy: too many requests waiting; retry shortly",
                              status=429, code="queue_full", kind="rate_limit_error")  # fmt: skip
            return error(busy, {"Retry-After": "1"})
        kind, data = await job.events.get()  # "start", or what ended the job before it
        if kind in ("error", "fatal"):
            await job.events.get()  # "end"
            if kind == "fatal":
                e = BadRequest(f"internal error: {data}", status=500, kind="server_error")
                return error(e)
            return error(BadRequest(data))
        if kind == "end":
            return JSONResponse({}, status_code=499)
        start = data
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _Shape(rid, model_id, chat)
        if r.stream:
            return _stream_response(job, shape, start, r.include_usage)
        text, done = "", None
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(job.events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # free the model for the others
                        job.cancelled.set()
                    continue
                if kind == "text":
                    text += data
                elif kind == "done":
                    done = data
                elif kind == "end":
                    break
        finally:
            job.cancelled.set()
        if done is None:
            return error(BadRequest("internal error", status=500, kind="server_error"))
        return JSONResponse(shape.full(text, done, start))

    async def chat_route(request):
        return await completions(request, True)

    async def text_route(request):
        return await completions(request, False)

    async def not_found(request, exc):
        return error(BadRequest(f"no route {request.url.path}", status=404, code="not_found"))

    async def bad_method(request, exc):
        status = getattr(exc, "status_code", 400)
        return error(BadRequest(str(getattr(exc, "detail", "bad request")), status=status))

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_route, methods=["POST"]),
            Route("/v1/completions", text_route, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: bad_method},
        lifespan=_lifespan(engine),
    )
    app.state.engine = engine
    app.state.model_id = model_id
    return app


def _lifespan(engine: Engine):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    return lifespan


def _unauthorized() -> BadRequest:
    return BadRequest("missing or wrong API key (Authorization: Bearer KEY)", status=401,
                      code="invalid_api_key", kind="authentication_error")  # fmt: skip


class _Shape:
    """OpenAI response and chunk bodies for one request."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat, self.created = rid, model, chat, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(start: dict, done: dict) -> dict:
        p, c = start["prompt_tokens"], done["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def full(self, text: str, done: dict, start: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": done["finish_reason"], "logprobs": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"],
                      "logprobs": None}  # fmt: skip
        body = self._base("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": [choice], "usage": self.usage(start, done), "ifp": done["ifp"]}

    def chunk(self, text: Optional[str], finish: Optional[str], first=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})  # fmt: skip
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}


def _stream_response(job: Job, shape: _Shape, start: dict, include_usage: bool):
    from sse_starlette.sse import EventSourceResponse

    async def events():
        try:
            yield {"data": json.dumps(shape.chunk("", None, first=True))}
            while True:
                kind, data = await job.events.get()
                if kind == "text":
                    yield {"data": json.dumps(shape.chunk(data, None))}
                elif kind == "done":
                    last = shape.chunk(None, data["finish_reason"])
                    last["ifp"] = data["ifp"]
                    if include_usage:
                        last["usage"] = None
                    yield {"data": json.dumps(last)}
                    if include_usage:
                        tail = {**shape._base("chat.completion.chunk" if shape.chat else "text_completion"),
                                "choices": [], "usage": shape.usage(start, data)}  # fmt: skip
                        yield {"data": json.dumps(tail)}
                elif kind in ("error", "fatal"):
                    err = BadRequest(data, kind="server_error" if kind == "fatal" else "invalid_request_error")  # fmt: skip
                    yield {"data": json.dumps(err.body())}
                elif kind == "end":
                    break
            yield {"data": "[DONE]"}
        finally:  # a client that went away frees the model at the next token
            job.cancelled.set()

    return EventSourceResponse(events(), ping=15)
