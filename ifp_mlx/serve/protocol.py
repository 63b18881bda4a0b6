"""The OpenAI protocol of ifp-serve: the server's settings and request validation (every field
checked before use: a bad request is a 4xx with an OpenAI-style error body, never a 500). The
response and chunk bodies are ``app._Shape``."""

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from ..errors import IFPError

ROLES = ("system", "user", "assistant", "tool")


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
    host: str = "127.0.0.1"  # the bound address: a name a request may use besides loopback's
    allowed_hosts: List[str] = field(default_factory=list)  # more Host names (DNS rebinding)
    allowed_origins: List[str] = field(default_factory=list)  # browser origins let in (CORS)
    max_connections: int = 64  # open connections; more are closed at once
    header_timeout: float = 10.0  # seconds for a connection to send its request headers
    body_timeout: float = 30.0  # seconds for a request body to arrive
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    verify_store: bool = False  # check the unit file's checksums at load
    prompt_cache_size: int = 8  # conversations kept (KV cache + selection each)
    prompt_cache_bytes: int = 1 << 30  # and the most bytes their KV caches hold
    predictor_any: bool = False  # a learned predictor trained on other weights is used
    batch_size: int = 8  # answers decoding together (1: one request at a time, FIFO)


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


def _integer(body: dict, name: str, lo: int, default, hi: Optional[int] = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        within = f"in {lo}..{hi}" if hi is not None else f"≥ {lo}"
        raise BadRequest(f"'{name}' must be an integer {within}", name)
    return v


# OpenAI fields this server does not implement: refused (400 "unsupported") unless they carry
# their no-op value, so a client never believes it got logprobs, a tool call or JSON it did not.
UNSUPPORTED = {
    "functions": ([],),
    "function_call": ("none",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
}
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DEPTH = 32  # JSON nesting a request may have (the deepest real one is ~5)


def _unsupported(body: dict) -> None:
    for name, noop in UNSUPPORTED.items():
        v = body.get(name)
        if v is None or any(type(v) is type(n) and v == n for n in noop):
            continue
        raise BadRequest(f"'{name}' is not supported by this server", name, code="unsupported")


def _response_format(fmt: Any) -> Optional[str]:
    """The grammar ``response_format`` asks for: none for text, any JSON object for
    ``json_object``, the schema's for ``json_schema`` (a schema it cannot use is a 400)."""
    from ..constrain import json_grammar

    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        schema = None
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object",
                             "response_format")  # fmt: skip
    else:
        raise BadRequest("'response_format' must be text, json_object or json_schema",
                         "response_format")  # fmt: skip
    try:
        return json_grammar(schema)
    except IFPError as e:
        raise BadRequest(str(e), "response_format")


def _tools(body: dict, chat: bool) -> Tuple[Optional[list], str, bool]:
    """(tools, tool_choice, parallel_tool_calls): tool_choice is "none", "auto", "required"
    or the name of the one tool the answer must call."""
    tools = body.get("tools")
    if tools is None or tools == []:
        tools = None
    elif not chat:
        raise BadRequest("'tools' need /v1/chat/completions", "tools")
    elif not isinstance(tools, list):
        raise BadRequest("'tools' must be a list of functions", "tools")
    else:
        names = set()
        for i, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not TOOL_NAME.match(f["name"]):  # fmt: skip
                raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                 "{\"name\": ...}} with a name of up to 64 letters, digits, _ or -",
                                 "tools")  # fmt: skip
            if f["name"] in names:
                raise BadRequest(f"tools[{i}]: the name {f['name']!r} is given twice", "tools")
            names.add(f["name"])
            if not isinstance(f.get("parameters", {}), dict):
                raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                                 "tools")  # fmt: skip
            if not isinstance(f.get("description", ""), str):
                raise BadRequest(f"tools[{i}].function.description must be a string", "tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str):
            raise BadRequest("'tool_choice' must be none, auto, required or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                             "tool_choice")  # fmt: skip
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise BadRequest(f"'tool_choice' names {name!r}, which is not in 'tools'",
                             "tool_choice")  # fmt: skip
        choice = {"name": name}
    elif choice not in ("none", "auto", "required"):
        raise BadRequest("'tool_choice' must be none, auto, required or a named function",
                         "tool_choice")  # fmt: skip
    if choice == "required" and not tools:
        raise BadRequest("'tool_choice': 'required' needs 'tools'", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadRequest("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    return tools, choice, parallel


def _tool_calls(calls: Any, i: int) -> list:
    """An assistant message's earlier ``tool_calls`` (shown to the model again)."""
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", "{}"), (str, dict))
        for c in calls
    )  # fmt: skip
    if not ok:
        raise BadRequest(f"messages[{i}].tool_calls must be a list of "
                         "{\"function\": {\"name\": ..., \"arguments\": ...}}", "messages")  # fmt: skip
    return [{"id": str(c.get("id", "")), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": c["function"].get("arguments", "{}")}} for c in calls]  # fmt: skip


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """A 400 for JSON nested deeper than ``limit`` (walked without recursion)."""
    stack: List[Tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise BadRequest(f"the body is nested deeper than {limit} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


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
    max_tokens_given: bool = True  # False: the server's default, cut to the context left
    logprobs: bool = False  # each answer token's log-probability
    grammar: Optional[str] = None  # the answer must follow it (response_format; llguidance)
    top_logprobs: int = 0  # and the most likely tokens at its place
    tools: Optional[list] = None  # OpenAI function specs shown to the model
    tool_choice: Any = "none"  # "none" | "auto" | "required" | {"name": the one to call}
    parallel_tool_calls: bool = True  # False: one call at most


def parse_request(body: Any, chat: bool, model_id: str, cfg: ServeConfig,
                  context: Optional[int] = None) -> Request:  # fmt: skip
    """A validated request; ``context``: the model's context length (bounds max_tokens)."""
    from ..budget import check_keep
    from ..chat import POLICIES
    from ..predictors import available

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
            calls = m.get("tool_calls") if m["role"] == "assistant" else None
            if calls:  # an earlier turn that called tools: its content may be null
                entry = {"role": "assistant", "content": "" if m.get("content") is None
                         else _content(m, i), "tool_calls": _tool_calls(calls, i)}  # fmt: skip
            else:
                entry = {"role": m["role"], "content": _content(m, i)}
            if m["role"] == "tool":
                entry["tool_call_id"] = str(m.get("tool_call_id", ""))
            prompt.append(entry)
        if not any(m["content"].strip() or m.get("tool_calls") for m in prompt):
            raise BadRequest("the messages are empty", "messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)  # fmt: skip
        if not ids and not (isinstance(prompt, str) and prompt.strip()):
            raise BadRequest("'prompt' must be a non-empty string or list of token ids", "prompt")
    if chat:
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest("'logprobs' must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, 20)
        if top and not logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = bool(logprobs)
    else:  # the legacy field: how many alternatives per token (0: the tokens' own only)
        top = _integer(body, "logprobs", 0, None, 5)
        logprobs, top = top is not None, top or 0
    grammar = _response_format(body.get("response_format"))
    tools, tool_choice, parallel = _tools(body, chat)
    if grammar is not None and tool_choice not in ("none", "auto"):
        raise BadRequest("'response_format' and a required tool call cannot both shape the "
                         "answer", "tool_choice")  # fmt: skip
    n = body.get("n", 1)
    if type(n) is not int or n != 1:
        raise BadRequest("only n = 1 is supported", "n")
    _unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    given = max_tokens is not None
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 1, cfg.max_tokens, context)
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
        seed=_integer(body, "seed", 0, None, 2**64 - 1),
        max_tokens_given=given,
        stop=stop, stream=stream, include_usage=options.get("include_usage", False),
        keep=keep, predictor=predictor, policy=policy, logprobs=logprobs, top_logprobs=top,
        grammar=grammar, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
    )  # fmt: skip
