"""Tool calls through ifp-serve with the openai client: a named tool on the bundled model at
keep 0.5, required / named / streamed on a random tiny model with the real SmolLM2 tokenizer
(whatever the model would say, the grammar makes the answer one valid call)."""

import json

import jsonschema

from tests.serving import MODEL, QUESTIONS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"]}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"]}}}  # fmt: skip


def _call(r, name=None):
    """The one tool call of a response, its arguments checked against the tool's schema."""
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    assert name in (None, call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, spec["function"]["parameters"])
    return call, args


def test_a_named_tool_is_always_called_with_its_required_arguments(bundled_server):
    client = bundled_server.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    for q in QUESTIONS[:1] + ["What is the weather in Paris?"]:  # ~30 s each on a CPU
        r = client.chat.completions.create(model=MODEL, max_tokens=48, tools=[WEATHER, TIME],
            tool_choice=named, messages=[{"role": "user", "content": q}],
            extra_body={"keep": 0.5})  # fmt: skip
        call, args = _call(r, "get_weather")
        assert call.id.startswith("call_") and r.choices[0].message.content is None
    assert "paris" in args["city"].lower()
    # the result goes back as a tool message; the model answers in words (tools stay offered)
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, max_tokens=24, tools=[WEATHER, TIME],
                                       messages=messages, tool_choice="none")  # fmt: skip
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_required_and_streamed_tool_calls_on_a_random_model(random_server):
    """A random model says anything: the grammar still makes each answer one parsable call."""
    client = random_server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    for i, q in enumerate(QUESTIONS):
        choice = "required" if i % 2 else named
        r = client.chat.completions.create(model="m", max_tokens=64, tools=[WEATHER, TIME],
            tool_choice=choice, messages=[{"role": "user", "content": q}],
            temperature=1.0, seed=i, extra_body={"keep": 0.5})  # fmt: skip
        _call(r, None if choice == "required" else "get_time")
    chunks = list(client.chat.completions.create(model="m", max_tokens=64, stream=True,
        tools=[WEATHER], tool_choice="required", messages=[{"role": "user", "content": "hi"}]))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
