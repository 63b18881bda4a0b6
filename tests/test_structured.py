"""Structured output and tool calls: every answer parses and validates, because only the tokens
the grammar allows can be drawn (llguidance). Through ifp-serve with the openai client, on the
bundled model at keep 0.5 (20 prompts) and on a random tiny model with the real SmolLM2
tokenizer (whatever a model would say, the answer still parses)."""

import json
import shutil

import jsonschema
import pytest

from tests.serving import KEY, Server

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 24},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky?", "Name a prime number.", "What is 2 + 3?",
             "Who wrote Hamlet?", "What is the largest ocean?", "Name a fruit.",
             "What gas do plants take in?", "What is the boiling point of water in C?",
             "Name a planet.", "What language is spoken in Spain?", "How many days in a week?",
             "What is the opposite of hot?", "Name a mammal that flies.",
             "What is the chemical symbol for gold?", "What shape has three sides?",
             "Which animal says moo?", "What is frozen water called?",
             "How many hours in a day?"]  # fmt: skip


@pytest.fixture(scope="module")
def server(smol_default, tmp_path_factory):
    """A random tiny llama that speaks SmolLM2's tokenizer (49k tokens, chat template)."""
    from ifp_mlx.convert import convert
    from tests.helpers import make_tiny_hf

    root = tmp_path_factory.mktemp("structured")
    src = make_tiny_hf(
        "llama", root / "hf", seed=3, vocab_size=49152, eos_token_id=2, max_position_embeddings=1024
    )  # room for a tools prompt
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_default / name).is_file():
            shutil.copy(smol_default / name, src / name)
    convert(src, root / "m", progress=False)
    s = Server(root / "m", "--api-key", KEY)
    yield s
    s.stop()


MODEL = "SmolLM2-135M-Instruct-8bit"  # the bundled server's model id (its folder's name)


@pytest.fixture(scope="module")
def bundled(smol_default):
    s = Server(smol_default, "--api-key", KEY)
    yield s
    s.stop()


def test_json_schema_answers_parse_and_validate_on_the_bundled_model(bundled):
    client = bundled.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    answers = []
    for q in QUESTIONS:
        r = client.chat.completions.create(model=MODEL, max_tokens=48, response_format=fmt,
            messages=[{"role": "user", "content": q}], extra_body={"keep": 0.5})  # fmt: skip
        assert r.choices[0].finish_reason == "stop", (q, r.choices[0].message.content)
        answers.append(json.loads(r.choices[0].message.content))
        jsonschema.validate(answers[-1], SCHEMA)
        assert r.model_extra["ifp"]["keep"] == pytest.approx(0.5, abs=0.02)
    assert sum(bool(a["answer"].strip()) for a in answers) >= 15  # answers, not empty strings


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


def test_a_named_tool_is_always_called_with_its_required_arguments(bundled):
    client = bundled.client()
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


def test_required_and_streamed_tool_calls_on_a_random_model(server):
    """A random model says anything: the grammar still makes each answer one parsable call."""
    client = server.client()
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


def test_json_schema_answers_parse_and_validate_on_a_random_model(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    for q in QUESTIONS[:4]:
        r = client.chat.completions.create(model="m", max_tokens=64, response_format=fmt,
            messages=[{"role": "user", "content": q}], extra_body={"keep": 0.5})  # fmt: skip
        assert r.choices[0].finish_reason == "stop", (q, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model="m", max_tokens=64, stream=True,
        messages=[{"role": "user", "content": "Sampled, streamed."}], response_format=fmt,
        temperature=1.0, seed=4))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_grammar_takes_any_object_and_no_array(smol_default):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ifp_mlx.constrain import Constrained, json_grammar
    from ifp_mlx.generate import make_sampler

    tok = load_tokenizer(smol_default)
    n = 49152
    anything = Constrained(tok, n, json_grammar(), make_sampler())  # json_object
    assert anything.matcher.consume_tokens(tok.encode('{"a": [1, "b"]}', add_special_tokens=False))
    assert anything.complete
    assert not Constrained(tok, n, json_grammar(), make_sampler()).allowed()[
        tok.encode("[", add_special_tokens=False)[0]
    ]  # an array is not an object
