"""Answers decoding together (``ifp_mlx.batch``, ``ifp-serve --batch-size``): each row computes
exactly its own pruned model, so a batched answer is the answer the request gets alone."""

import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ifp_mlx import load
from ifp_mlx.batch import Row, step
from ifp_mlx.generate import stream_generate
from ifp_mlx.model import row_masks
from ifp_mlx.predictors.activation import ActivationPredictor
from tests.serving import KEY, Server, random_smol_folder

PROMPTS = [[3, 5, 6, 7, 4, 5], [3, 9, 8, 4, 5, 6, 7, 8, 9, 10, 11, 4], [3, 12, 4]]
SETTINGS = [  # the default's schedule, plain pruning, dense, rescoring without a head
    dict(keep=0.5, rescore=3, dense_head=2),
    dict(keep=0.5),
    dict(keep=1.0),
    dict(keep=0.4, rescore=4, dense_head=0),
]


@pytest.fixture(scope="module")
def folder(serve_folder):
    return serve_folder


@pytest.fixture(scope="module")
def model(folder):
    model, tokenizer = load(folder)
    model._ifp_config["compensate"] = True  # the default's bias per row, too
    return model, tokenizer


def _masked_forward(model, sel, x):
    model.dense()
    masks, deltas = model.row_terms(sel)
    expand = [None if a is None else a[None, None] for a in masks]
    with row_masks(model, expand, [None if d is None else d[None, None] for d in deltas]):
        return model(x)


@pytest.mark.parametrize("quantized", [False, True])
def test_masked_full_ffn_is_the_compact_model(model, tiny_q4, quantized):
    """The full FFNs with a row's mask and compensation bias = its materialized compact FFNs
    (float and quantized: the masked sum only adds zeros)."""
    m = load(tiny_q4)[0] if quantized else model[0]
    sel = m.select(PROMPTS[1], 0.5, ActivationPredictor(compensate=True))
    x = mx.array([[5, 6, 7, 8]])
    compact = np.asarray(m(x))
    masked = np.asarray(_masked_forward(m, sel, x))
    dense = np.asarray(m(x))
    np.testing.assert_allclose(masked, compact, rtol=1e-5, atol=1e-5)
    assert np.abs(dense - compact).max() > 1e-3  # the masks matter


def _together(model, tokenizer, settings, max_tokens=12):
    rows = [Row(model, tokenizer, p, make_prompt_cache(model), max_tokens=max_tokens, **settings)
            for p in PROMPTS]  # fmt: skip
    for i, r in enumerate(rows):
        r.start(alone=False)
    out, active = [[] for _ in rows], list(range(len(rows)))
    while active:
        batch = [rows[i] for i in active]
        for i, resp in zip(list(active), step(batch, alone=len(batch) == 1)):
            out[i].append((resp.token, np.asarray(resp.logprobs)))
            if resp.finish_reason:
                active.remove(i)
    return out, rows


@pytest.mark.parametrize(
    "settings", SETTINGS, ids=["default-schedule", "plain", "dense", "rescore"]
)
def test_rows_decode_as_each_prompt_alone(model, settings):
    """Three prompts decoded together (they finish at different times) give each prompt's
    tokens and log-probabilities from ``stream_generate`` alone: the same selection, dense
    head and reselections, each row on its own units."""
    m, tok = model
    together, rows = _together(m, tok, settings)
    for prompt, got, row in zip(PROMPTS, together, rows):
        alone = [(r.token, np.asarray(r.logprobs)) for r in
                 stream_generate(m, tok, prompt, max_tokens=12, **settings)]  # fmt: skip
        assert [t for t, _ in got] == [t for t, _ in alone]
        for (_, a), (_, b) in zip(got, alone):
            np.testing.assert_allclose(a, b, atol=2e-4)
        if settings.get("rescore"):
            assert row.stats.rescores >= 2  # the schedule ran


# ------------------------------------------------------------------ the server


def _requests():
    base = [{"role": "user", "content": "Name a fruit."}]
    return [
        {"messages": base, "max_tokens": 30, "keep": 0.5},
        {"messages": base, "max_tokens": 30, "keep": 0.5},  # the same conversation, twice
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 24,
         "keep": 1.0, "logprobs": True, "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "Say a colour."}], "max_tokens": 28,
         "keep": 0.4, "stop": ["e"]},
        {"messages": [{"role": "user", "content": "A colour as JSON."}], "max_tokens": 40,
         "keep": 0.5, "response_format": {"type": "json_schema", "json_schema": {
             "name": "colour", "schema": {"type": "object", "required": ["c"], "additionalProperties": False,
                                          "properties": {"c": {"enum": ["red", "blue"]}}}}}},
        {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
         "temperature": 0.8, "seed": 7},  # sampled with a seed: runs alone
    ]  # fmt: skip


def _answers(server, concurrent: bool) -> list:
    reqs, out = _requests(), [None] * len(_requests())
    gate = threading.Barrier(len(reqs))

    def one(i):
        if concurrent:
            gate.wait()
        status, body, _ = server.request("POST", "/v1/chat/completions", reqs[i])
        assert status == 200, body
        out[i] = body

    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(reqs)):
            one(i)
    return out


@pytest.fixture(scope="module")
def smol_random(smol_default, tmp_path_factory):
    return random_smol_folder(smol_default, tmp_path_factory.mktemp("batch-server"))


def test_batched_server_answers_as_fifo(smol_random):
    """Six requests sent at once to ``--batch-size 4`` (plain, the same conversation twice, dense
    with logprobs, a stop string, JSON mode, a seeded sample that runs alone) get the answers
    the one-at-a-time server gives them; at least two decoded together."""
    fifo = Server(smol_random, "--api-key", KEY, "--batch-size", "1")
    try:
        want = _answers(fifo, concurrent=False)
    finally:
        fifo.stop()
    batched = Server(smol_random, "--api-key", KEY, "--batch-size", "4")
    try:
        got = _answers(batched, concurrent=True)
        health = batched.request("GET", "/health")[1]
    finally:
        batched.stop()
    for w, g in zip(want, got):
        wc, gc = w["choices"][0], g["choices"][0]
        assert gc["message"]["content"] == wc["message"]["content"]
        assert gc["finish_reason"] == wc["finish_reason"]
        assert g["usage"]["completion_tokens"] == w["usage"]["completion_tokens"]
        assert g["ifp"]["keep"] == pytest.approx(w["ifp"]["keep"])
        if wc.get("logprobs"):
            for a, b in zip(gc["logprobs"]["content"], wc["logprobs"]["content"]):
                assert a["token"] == b["token"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)  # fmt: skip
                assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]  # fmt: skip
    assert json.loads(got[4]["choices"][0]["message"]["content"])["c"] in ("red", "blue")
    assert max(g["ifp"]["batch"] for g in got) >= 2
    assert got[5]["ifp"]["batch"] == 1  # the seeded sample ran alone
    assert health["waiting"] == 0


def test_batch_survives_a_client_that_hangs_up(folder):
    """A streamed answer whose client leaves mid-batch ends; the others finish, and the server
    goes on answering."""
    import http.client

    server = Server(folder, "--api-key", KEY, "--batch-size", "4")
    try:
        results = {}

        def steady():
            results["steady"] = server.request("POST", "/v1/chat/completions",
                                               {"messages": [{"role": "user", "content": "w5"}],
                                                "max_tokens": 60, "keep": 0.5})  # fmt: skip

        t = threading.Thread(target=steady)
        t.start()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"messages": [{"role": "user", "content": "w6 w7"}], "max_tokens": 60,
                "stream": True}  # fmt: skip
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"})  # fmt: skip
        res = conn.getresponse()
        assert res.status == 200
        res.readline()
        conn.close()  # hang up while it decodes
        t.join()
        status, body, _ = results["steady"]
        assert status == 200 and body["usage"]["completion_tokens"] > 0
        after = server.request("POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "w8"}], "max_tokens": 4})  # fmt: skip
        assert after[0] == 200
    finally:
        server.stop()


def _two_turns_at_once(server, concurrent: bool) -> list:
    """One conversation's first turn, then two different second turns of it sent together."""
    first = [{"role": "user", "content": "w5 w6 w7"}]
    status, body, _ = server.request("POST", "/v1/chat/completions",
                                     {"messages": first, "max_tokens": 6, "keep": 0.5})  # fmt: skip
    assert status == 200
    history = first + [body["choices"][0]["message"]]
    seconds = [history + [{"role": "user", "content": c}] for c in ("w8 w9", "w10")]
    out, gate = [None, None], threading.Barrier(2)

    def one(i):
        if concurrent:
            gate.wait()
        out[i] = server.request("POST", "/v1/chat/completions",
                                {"messages": seconds[i], "max_tokens": 10, "keep": 1.0})[1]  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        if not concurrent:
            t.join()
    for t in threads:
        t.join()
    return out


def test_one_conversation_continued_twice_at_once(folder):
    """Two second turns of one conversation decoding together: one continues its cache, the
    other starts anew (a cache is never written by two answers). Dense and short, so which of
    the two arrives first does not change the answers: those of the FIFO server (a shared
    cache garbles both)."""
    answers = []
    for flags, concurrent in ((("--batch-size", "1"), False), (("--batch-size", "4"), True)):
        server = Server(folder, "--api-key", KEY, *flags)
        try:
            answers.append(_two_turns_at_once(server, concurrent))
        finally:
            server.stop()
    fifo, batched = answers
    assert [b["choices"][0]["message"]["content"] for b in batched] == [
        f["choices"][0]["message"]["content"] for f in fifo]  # fmt: skip
    assert max(b["ifp"]["batch"] for b in batched) == 2
    assert sorted(b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for b in batched) == [False, True]  # fmt: skip


def _alternating(server) -> list:
    """Two conversations taking turns (first-turn policy): their second turns reuse their own
    units, materialized again from the stored selection."""
    convs = [[{"role": "user", "content": "w5 w6 w7"}], [{"role": "user", "content": "w9 w3"}]]
    out = []
    for turn in range(2):
        for c in convs:
            if turn:
                c.append({"role": "user", "content": "w8"})
            body = server.request("POST", "/v1/chat/completions",
                                  {"messages": c, "max_tokens": 8, "keep": 0.5})[1]  # fmt: skip
            c.append(body["choices"][0]["message"])
            ifp = body["ifp"]  # a restored turn runs no predictor: select_ms 0
            out.append((body["choices"][0]["message"]["content"], ifp["reselected"],
                        ifp["restored_units"], ifp["select_ms"] == 0))  # fmt: skip
    return out


def test_alternating_conversations_keep_their_units_batched(folder):
    """The batched server (its default) answers two alternating conversations as the FIFO
    server does: each second turn restores its own units instead of selecting again."""
    answers = []
    for size in ("1", "8"):
        server = Server(folder, "--api-key", KEY, "--batch-size", size)
        try:
            answers.append(_alternating(server))
        finally:
            server.stop()
    assert answers[1] == answers[0]
    assert [a[1:] for a in answers[1][2:]] == [(False, True, True), (False, True, True)]


def test_bench_throughput_compares_fifo_and_batched(folder, tmp_path):
    """``ifp-bench serve --throughput``: FIFO and batched rows at each client count, answers
    compared with FIFO's (all equal), the JSON naming the model, not a path."""
    import subprocess
    import sys

    out = tmp_path / "t.json"
    res = subprocess.run([sys.executable, "-m", "ifp_mlx.apps.bench", "serve", "--throughput",
                          "--model", str(folder), "--clients", "1", "3", "--per-client", "2",
                          "--max-tokens", "12", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    r = json.loads(out.read_text())
    assert [(row["server"], row["clients"]) for row in r["rows"]] == [
        ("fifo", 1), ("fifo", 3), ("batched", 1), ("batched", 3)]  # fmt: skip
    assert all(row["same_as_fifo"] == 1.0 and row["tokens"] > 0 for row in r["rows"])
    assert r["model"] == folder.name and str(tmp_path) not in out.read_text()
    assert "vs FIFO" in res.stdout


def test_a_conversation_being_written_is_never_handed_out_twice(model):
    """``Slots.take``: a conversation whose answer is being written is not continued by a
    second request at the same time (it starts anew); once written, it is continued."""
    from ifp_mlx.serve.slots import Slots

    slots = Slots(model[0])
    first = slots.take([3, 5, 6])
    first.cache.tokens, first.prompt = [3, 5, 6, 7], 3  # its answer so far
    assert first.busy
    second = slots.take([3, 5, 6, 7, 8])
    assert second is not first and second.busy
    first.busy = False
    second.busy = False
    assert slots.take([3, 5, 6, 7, 8]) is first
