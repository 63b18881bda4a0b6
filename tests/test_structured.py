"""Structured output: every answer parses and validates, because only the tokens the grammar
allows can be drawn (llguidance). Through ifp-serve on a tiny model with the real SmolLM2
tokenizer (20 prompts, keep 0.5), and in-process on the bundled model itself, pruned."""

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
    src = make_tiny_hf("llama", root / "hf", seed=3, vocab_size=49152, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_default / name).is_file():
            shutil.copy(smol_default / name, src / name)
    convert(src, root / "m", progress=False)
    s = Server(root / "m", "--api-key", KEY)
    yield s
    s.stop()


def test_json_schema_answers_parse_and_validate_through_the_server(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    for q in QUESTIONS:
        r = client.chat.completions.create(model="m", max_tokens=64, response_format=fmt,
            messages=[{"role": "user", "content": q}], extra_body={"keep": 0.5})  # fmt: skip
        assert r.choices[0].finish_reason == "stop", (q, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.model_extra["ifp"]["keep"] == pytest.approx(0.5, abs=0.02)
    chunks = list(client.chat.completions.create(model="m", max_tokens=64, stream=True,
        messages=[{"role": "user", "content": "Sampled, streamed."}], response_format=fmt,
        temperature=1.0, seed=4))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_the_bundled_model_answers_in_the_schema_pruned(smol_default):
    import ifp_mlx
    from ifp_mlx.constrain import Constrained, json_grammar
    from ifp_mlx.generate import make_sampler

    model, tok = ifp_mlx.load(smol_default)
    grammar = json_grammar(SCHEMA)
    for q in QUESTIONS[:2]:
        sampler = Constrained(tok, model.vocab_size, grammar, make_sampler())
        text = ifp_mlx.generate(model, tok, q, keep=0.5, max_tokens=48, sampler=sampler)
        jsonschema.validate(json.loads(text), SCHEMA)
    assert json.loads(text)["answer"]  # the default's dense head and reselection included
    anything = Constrained(tok, model.vocab_size, json_grammar(), make_sampler())  # json_object
    assert anything.matcher.consume_tokens(tok.encode('{"a": [1, "b"]}', add_special_tokens=False))
    assert anything.complete
    assert not Constrained(tok, model.vocab_size, json_grammar(), make_sampler()).allowed()[
        tok.encode("[", add_special_tokens=False)[0]
    ]  # an array is not an object
