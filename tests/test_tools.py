"""Tool calling without a model: what the model is shown (its template's way, or the Hermes
convention), how its answer is split into text and calls, and which requests are refused."""

import json

import pytest

from ifp_mlx.serve.protocol import BadRequest, ServeConfig, parse_request
from ifp_mlx.tools import CallSplitter, call_format, render

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALLED = [{"role": "user", "content": "Weather in Oslo?"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
           "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "rain"},
          {"role": "tool", "tool_call_id": "c2", "content": "8 C"}]  # fmt: skip


class Plain:  # a template without tools (SmolLM2's, Gemma 3's)
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


class Native:  # a template that renders tools itself, with mlx-lm's JSON parser (Qwen2.5's)
    chat_template = "{% if tools %}...{% endif %}"
    has_tool_calling = True
    tool_call_start, tool_call_end = "<tool_call>", "</tool_call>"

    @staticmethod
    def tool_parser(text, tools):
        return json.loads(text)


def test_a_template_without_tools_gets_them_in_a_system_message_and_calls_as_text():
    messages, extra = render(Plain(), CALLED, [WEATHER])
    assert extra == {} and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"] and "<tools>" in messages[0]["content"]
    call = messages[2]["content"]
    assert call.startswith("<tool_call>\n") and call.endswith("\n</tool_call>")
    assert json.loads(call[12:-13]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    # two results in a row: one user turn, in order
    assert messages[3]["content"] == ("<tool_response>\nrain\n</tool_response>\n"
                                      "<tool_response>\n8 C\n</tool_response>")  # fmt: skip
    with_system, _ = render(
        Plain(), [{"role": "system", "content": "Be brief."}] + CALLED, [WEATHER]
    )
    assert with_system[0]["content"].startswith("Be brief.\n\n# Tools")
    assert render(Plain(), CALLED[:1], None)[0] == CALLED[:1]  # no tools: nothing added


def test_a_template_with_tools_gets_them_and_the_arguments_as_an_object():
    messages, extra = render(Native(), CALLED, [WEATHER])
    assert extra == {"tools": [WEATHER]} and messages[1]["role"] == "assistant"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert CALLED[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # untouched
    assert messages[2:] == CALLED[2:]
    assert call_format(Native()).parse is Native.tool_parser and not call_format(Native()).json


def test_the_answer_splits_into_text_and_calls_across_chunks():
    s = CallSplitter(call_format(Plain()), [WEATHER])
    pieces = ["Sure. <tool", '_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool',
              "_call> then <tool_call>{not json}</tool_call> and <", "tool_call>"]  # fmt: skip
    out = [s.feed(p) for p in pieces]
    assert [t for t, _ in out] == ["Sure. ", "", " then <tool_call>{not json}</tool_call> and ", ""]
    (call,) = out[2][1]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert s.finish() == ("<tool_call>", [])  # an open tag with nothing parsable: text
    assert s.calls == 1


def test_one_call_only_and_an_unclosed_call_at_the_limit():
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
    s = CallSplitter(call_format(Plain()), [WEATHER], single=True)
    text, calls = s.feed(one + one.replace('"A"', '"B"'))
    assert text == "" and len(calls) == 1 and "A" in calls[0]["function"]["arguments"]
    s = CallSplitter(call_format(Plain()), [WEATHER])
    assert s.feed(one[:-12]) == ("", [])
    text, calls = s.finish()  # max_tokens cut the end tag: the call still parses
    assert text == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "A"}


def _parse(**body):
    return parse_request({"messages": [{"role": "user", "content": "hi"}], **body}, True, "m",
                         ServeConfig())  # fmt: skip


def test_tool_requests_are_read_and_bad_ones_refused():
    r = _parse(tools=[WEATHER])
    assert r.tool_choice == "auto" and r.tools == [WEATHER] and r.parallel_tool_calls
    assert _parse().tool_choice == "none"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert _parse(tools=[WEATHER], tool_choice=named).tool_choice == {"name": "get_weather"}
    r = parse_request({"messages": CALLED, "tools": [WEATHER]}, True, "m", ServeConfig())
    assert r.prompt[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert r.prompt[2] == {"role": "tool", "content": "rain", "tool_call_id": "c1"}
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ]  # fmt: skip
    for body, param in bad:
        with pytest.raises(BadRequest) as e:
            _parse(**body)
        assert e.value.param == param and e.value.status == 400, body
    with pytest.raises(BadRequest, match="chat/completions"):
        parse_request({"prompt": "hi", "tools": [WEATHER]}, False, "m", ServeConfig())
    with pytest.raises(BadRequest, match="tool_calls"):
        parse_request({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]},
                                    {"role": "user", "content": "x"}]}, True, "m", ServeConfig())  # fmt: skip
