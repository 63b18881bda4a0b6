"""The HTTP routes of ifp-serve (Starlette): OpenAI chat and text completions, models and
health, behind the guard (``guard.py``) that keeps web pages out."""

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import IFPError
from .engine import Engine, Job, QueueFull
from .guard import Guard
from .protocol import BadRequest, ServeConfig, check_depth, parse_request


def create_app(cfg: ServeConfig, engine: Optional[Engine] = None):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if cfg.api_key is not None and not cfg.api_key.strip():
        raise IFPError("the API key is empty: give a key, or None for no authentication")
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

        async def read() -> bytes:
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BadRequest(f"the body is over {cfg.max_body_mb:g} MB", status=413,
                                     code="request_too_large")  # fmt: skip
            return body

        try:  # a body that trickles in would hold the connection (and a slot) for ever
            body = await asyncio.wait_for(read(), cfg.body_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the body did not arrive within {cfg.body_timeout:g} s", status=408,
                             code="request_timeout")  # fmt: skip
        try:
            data = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("the body is not valid UTF-8")
        except json.JSONDecodeError as e:
            raise BadRequest(f"the body is not valid JSON ({e.msg} at {e.pos})")
        except RecursionError:  # deeper than Python's parser goes
            raise BadRequest("the body is nested too deeply")
        check_depth(data)
        return data

    expected = f"Bearer {cfg.api_key}".encode() if cfg.api_key is not None else None

    def authorized(request) -> bool:  # compared in constant time
        got = request.headers.get("authorization", "").encode()
        return expected is None or secrets.compare_digest(got, expected)

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "waiting": engine.waiting,
                             "served": engine.served, "dropped": engine.dropped})  # fmt: skip

    async def models(request):
        if not authorized(request):
            return error(_unauthorized())
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "ifp-mlx"}]})  # fmt: skip

    async def completions(request, chat: bool):
        if not authorized(request):
            return error(_unauthorized())
        try:
            r = parse_request(await read_json(request), chat, model_id, cfg, engine.context)
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
        while True:  # "start", or what ended the job before it; a client gone drops the job
            try:
                kind, data = await asyncio.wait_for(job.events.get(), 0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
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
        text, done, scored, calls = "", None, [] if r.logprobs else None, []
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(job.events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # free the model for the others
                        job.cancelled.set()
                    continue
                if kind == "logprobs":
                    scored += data
                elif kind == "text":
                    text += data
                elif kind == "tool_calls":
                    calls += data
                elif kind == "done":
                    done = data
                elif kind == "end":
                    break
        finally:
            job.cancelled.set()
        if done is None:
            return error(BadRequest("internal error", status=500, kind="server_error"))
        return JSONResponse(shape.full(text, done, start, scored, calls))

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
        middleware=[Middleware(Guard, cfg=cfg)],
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
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": start["reused"]}}  # fmt: skip

    def logprobs(self, scored: Optional[list], offset: int = 0) -> Optional[dict]:
        """OpenAI's logprobs object: chat's ``content`` list, or the legacy completions form
        (``offset``: where these tokens' text starts in the answer)."""
        if scored is None:
            return None
        if self.chat:
            return {"content": scored, "refusal": None}
        offsets = list(offset + np.cumsum([0] + [len(e["token"]) for e in scored[:-1]]))
        return {
            "tokens": [e["token"] for e in scored],
            "token_logprobs": [e["logprob"] for e in scored],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in scored],
            "text_offset": [int(o) for o in offsets] if scored else [],
        }

    def full(self, text: str, done: dict, start: dict, scored: Optional[list] = None,
             calls: Optional[list] = None) -> dict:  # fmt: skip
        logprobs = self.logprobs(scored)
        if self.chat:
            message = {"role": "assistant", "content": text}
            if calls:  # OpenAI: content is null when the answer is only tool calls
                message = {
                    "role": "assistant",
                    "content": text.strip() or None,
                    "tool_calls": calls,
                }
            choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"],
                      "logprobs": logprobs}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"],
                      "logprobs": logprobs}  # fmt: skip
        body = self._base("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": [choice], "usage": self.usage(start, done), "ifp": done["ifp"]}

    def chunk(self, text: Optional[str], finish: Optional[str], first=False, logprobs=None,
              calls: Optional[list] = None) -> dict:  # fmt: skip
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})  # fmt: skip
            if calls:  # each call whole, numbered across the answer (``index``)
                delta["tool_calls"] = calls
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {**self._base("text_completion"), "choices": [choice]}


def _stream_response(job: Job, shape: _Shape, start: dict, include_usage: bool):
    from sse_starlette.sse import EventSourceResponse

    async def events():
        try:
            yield {"data": json.dumps(shape.chunk("", None, first=True))}
            pending, sent, n = None, 0, 0  # logprobs of the text about to go out; its offset; calls
            while True:
                kind, data = await job.events.get()
                if kind == "logprobs":
                    pending = (pending or []) + data
                elif kind == "text":
                    yield {"data": json.dumps(shape.chunk(data, None, logprobs=shape.logprobs(pending, sent)))}  # fmt: skip
                    pending, sent = None, sent + len(data)
                elif kind == "tool_calls":
                    numbered = [{"index": n + i, **c} for i, c in enumerate(data)]
                    n += len(data)
                    yield {"data": json.dumps(shape.chunk(None, None, calls=numbered))}
                elif kind == "done":
                    last = shape.chunk(None, data["finish_reason"], logprobs=shape.logprobs(pending, sent))  # fmt: skip
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
