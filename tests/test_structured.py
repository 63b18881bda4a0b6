"""Structured output: every answer parses and validates, because only the tokens
the grammar allows can be drawn (llguidance). Through ifp-serve with the openai client, on the
bundled model at keep 0.5 (20 prompts) and on a random tiny model with the real SmolLM2
tokenizer (whatever a model would say, the answer still parses)."""

import json

import jsonschema
import pytest

from tests.serving import MODEL, QUESTIONS

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 24},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def test_json_schema_answers_parse_and_validate_on_the_bundled_model(bundled_server):
    client = bundled_server.client()
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


def test_json_schema_answers_parse_and_validate_on_a_random_model(random_server):
    client = random_server.client()
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
