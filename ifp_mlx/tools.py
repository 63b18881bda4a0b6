"""Tool calling: the request's tools go into the prompt through the model's chat template, and
the model's calls come out of its answer as OpenAI ``tool_calls``.

A template that knows tools (Qwen2.5's ``{% if tools %}``) renders them itself, and mlx-lm names
its call format (``tokenizer.tool_parser``, ``tool_call_start`` / ``tool_call_end``). A template
that does not (SmolLM2's and Gemma 3's as bundled) gets the Hermes convention, the format
Qwen2.5's template writes: the tools as JSON in a system message, each call answered as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, parsed by mlx-lm's ``json_tools``.

``tool_choice`` "required" or a named tool constrains the answer to one such call (llguidance),
so it always parses and has the schema's required arguments, whatever the model would have said.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from .errors import IFPError

HERMES = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class CallFormat:
    """How one model writes a tool call: between ``start`` and ``end``, read by ``parse``."""

    start: str
    end: str
    parse: Callable  # (text between the tags, tools) -> {"name": ..., "arguments": ...}
    json: bool  # the text between the tags is {"name": ..., "arguments": ...} (constrainable)


def knows_tools(tokenizer) -> bool:
    """Whether the model's chat template renders a ``tools`` list itself."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def call_format(tokenizer) -> CallFormat:
    from mlx_lm.tool_parsers import json_tools

    if knows_tools(tokenizer) and getattr(tokenizer, "has_tool_calling", False):
        parse = tokenizer.tool_parser
        start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
        return CallFormat(start, end, parse, parse is json_tools.parse_tool_call)
    return CallFormat(json_tools.tool_call_start, json_tools.tool_call_end,
                      json_tools.parse_tool_call, True)  # fmt: skip


def render(tokenizer, messages: List[dict], tools: Optional[list]) -> Tuple[List[dict], dict]:
    """(messages, keyword arguments of ``apply_chat_template``) with the tools and the earlier
    calls and results of the conversation in a form this model's template takes."""
    if knows_tools(tokenizer):
        out = []
        for m in messages:
            if m.get("tool_calls"):  # templates read the arguments as an object
                calls = [{**c, "function": {**c["function"],
                          "arguments": _arguments(c["function"]["arguments"])}}
                         for c in m["tool_calls"]]  # fmt: skip
                m = {**m, "content": m.get("content") or "", "tool_calls": calls}
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    fmt = call_format(tokenizer)
    out = []
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_results"):  # several results: one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "_results": True})
        elif m.get("tool_calls"):
            calls = [fmt.start + "\n" + json.dumps({"name": c["function"]["name"],
                     "arguments": _arguments(c["function"]["arguments"])}) + "\n" + fmt.end
                     for c in m["tool_calls"]]  # fmt: skip
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k in ("role", "content")} for m in out]
    if tools:
        listed = HERMES.format(tools="".join("\n" + json.dumps(t) for t in tools))
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + listed}
        else:
            out.insert(0, {"role": "system", "content": listed})
    return out, {}


def _arguments(value):
    """OpenAI sends a call's arguments as JSON text; templates want the object."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def grammar(fmt: CallFormat, tools: list, name: Optional[str] = None) -> str:
    """The grammar of exactly one call (of tool ``name``, or of any of ``tools``) with its
    arguments following the tool's ``parameters`` schema."""
    from llguidance import LLMatcher

    from .constrain import COMPACT

    if not fmt.json:
        raise IFPError("this model's tool calls are not JSON: tool_choice 'required' or a named "
                       "tool cannot be enforced (use 'auto')")  # fmt: skip
    options = [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": t["function"]["name"]},
                        "arguments": _closed(t["function"].get("parameters"))}}
        for t in tools if name is None or t["function"]["name"] == name
    ]  # fmt: skip
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": COMPACT}
    text = f"start: {json.dumps(fmt.start + chr(10))} call {json.dumps(chr(10) + fmt.end)}\n"
    try:
        g = LLMatcher.grammar_from_lark(text + "call: %json " + json.dumps(schema))
    except (ValueError, TypeError) as e:
        raise IFPError(f"a tool's parameters cannot be used: {str(e).splitlines()[0][:200]}")
    return g


def _closed(parameters: Optional[dict]) -> dict:
    """A tool's arguments schema, taking only the arguments it declares unless it says
    otherwise: JSON Schema lets any other key in, and a small model forced into a call then
    invents keys until max_tokens (a random one did on 1 of 20 questions)."""
    schema = dict(parameters or {"type": "object"})
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def openai_call(parsed: dict) -> dict:
    """A parsed call as an OpenAI ``tool_calls`` entry (arguments as JSON text)."""
    args = parsed.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(parsed.get("name", "")),
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}  # fmt: skip


class CallSplitter:
    """Splits streamed answer text into plain text and tool calls: text that may still become a
    call's start tag is held back; a complete call that parses becomes an OpenAI entry; one that
    does not stays text (the client sees what the model wrote)."""

    def __init__(self, fmt: CallFormat, tools: list, single: bool = False):
        self.fmt, self.tools, self.single = fmt, tools, single
        self.buffer, self.calls = "", 0

    def feed(self, text: str) -> Tuple[str, List[dict]]:
        self.buffer += text
        plain, calls = "", []
        while True:
            i = self.buffer.find(self.fmt.start)
            if i < 0:
                keep = _partial(self.buffer, self.fmt.start)
                plain += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return plain, calls
            j = self.buffer.find(self.fmt.end, i + len(self.fmt.start))
            if j < 0:
                plain += self.buffer[:i]
                self.buffer = self.buffer[i:]
                return plain, calls
            inner = self.buffer[i + len(self.fmt.start) : j]
            call = self._parse(inner)
            if call is None or (self.single and self.calls):
                plain += self.buffer[: j + len(self.fmt.end)] if call is None else self.buffer[:i]
            else:
                plain += self.buffer[:i]
                calls.append(call)
                self.calls += 1
            self.buffer = self.buffer[j + len(self.fmt.end) :]

    def finish(self) -> Tuple[str, List[dict]]:
        """At the end: a call left open (the answer hit its limit) is parsed if it can be."""
        rest, self.buffer = self.buffer, ""
        if rest.startswith(self.fmt.start) and not (self.single and self.calls):
            call = self._parse(rest[len(self.fmt.start) :])
            if call is not None:
                self.calls += 1
                return "", [call]
        return rest, []

    def _parse(self, inner: str) -> Optional[dict]:
        try:
            parsed = self.fmt.parse(inner, self.tools)
        except Exception:  # a parser's error: the call is malformed, the text stays text
            return None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return None
        return openai_call(parsed)


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
