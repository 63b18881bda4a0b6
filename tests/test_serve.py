"""ifp-serve: the real server on a loopback port, driven by the official openai client and by
raw HTTP for bad requests."""

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

from tests.serving import KEY, Server
from tests.serving import error as _error


@pytest.fixture(scope="module")
def folder(serve_folder):
    return serve_folder


@pytest.fixture(scope="module")
def server(folder):
    s = Server(
        folder, "--api-key", KEY, "--max-body-mb", "0.05", "--max-queue", "0", "--batch-size", "1"
    )  # one request at a time: the FIFO path and its queue
    yield s
    s.stop()


MESSAGES = [{"role": "user", "content": "w5 w6 w7"}]


def test_chat_with_the_openai_client(server):
    client = server.client()
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6,
                                       extra_body={"keep": 0.5})  # fmt: skip
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 6  # w3 w5 w6 w7 w4 w5
    ifp = r.model_extra["ifp"]
    assert ifp["keep"] == pytest.approx(0.5, abs=0.02) and ifp["predictor"] == "activation"
    assert ifp["materialize_ms"] > 0 and ifp["reselected"] is True
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6,
                                            extra_body={"keep": 0.5}, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]  # fmt: skip
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 6
    dense = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6,
                                           extra_body={"keep": 1.0})  # fmt: skip
    assert dense.model_extra["ifp"]["keep"] == 1.0 and dense.model_extra["ifp"]["predictor"] == "dense"  # fmt: skip


def test_text_completions_stop_and_models(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["m"]
    r = client.completions.create(model="m", prompt="w5 w6", max_tokens=8)
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and text
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    cut = client.completions.create(model="m", prompt="w5 w6", max_tokens=8, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_a_conversation_reuses_its_cache_and_units(server):
    client = server.client()
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 60))}]
    reports = []
    for turn in range(3):
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                           extra_body={"keep": 0.5}, stream=False)  # fmt: skip
        reports.append(r.model_extra["ifp"])
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"w{20 + turn} w{30 + turn}"}]  # fmt: skip
    assert reports[0]["reselected"] and reports[0]["reused_prompt_tokens"] == 0
    for later in reports[1:]:  # first-turn: neither a new selection nor a re-prefill
        assert not later["reselected"] and later["reused_prompt_tokens"] > 50
        assert later["materialize_ms"] == 0
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=2,
                                       extra_body={"keep": 0.5, "policy": "per-turn"})  # fmt: skip
    assert r.model_extra["ifp"]["reselected"] and r.model_extra["ifp"]["reused_prompt_tokens"] > 50

    # the same conversation, one turn on, asking for another keep: a new selection at it
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "w40 w41"}]  # fmt: skip
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=2,
                                       extra_body={"keep": 0.25})  # fmt: skip
    ifp = r.model_extra["ifp"]
    assert ifp["reselected"] and ifp["keep"] == pytest.approx(0.25, abs=0.02)
    assert ifp["reused_prompt_tokens"] > 50  # the prompt's cache is still the conversation's


def test_two_alternating_conversations_keep_their_caches_and_units(server, folder):
    """Two conversations taking turns (an LRU of prompt caches, each with its selection): both
    reuse their cache on their second turn, their units come back without a new selection, and
    each answers what the library's first-turn Conversation answers it alone."""
    import ifp_mlx
    from ifp_mlx.chat import Conversation

    client = server.client()
    opening = {"a": " ".join(f"w{i}" for i in range(10, 40)),
               "b": " ".join(f"w{i}" for i in range(50, 80))}  # fmt: skip
    follow = ["w61 w71", "w62 w72"]
    history = {k: [{"role": "user", "content": v}] for k, v in opening.items()}
    answers, last = {k: [] for k in opening}, {}
    for turn in range(2):
        for k, messages in history.items():
            r = client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                               extra_body={"keep": 0.5})  # fmt: skip
            answers[k].append(r.choices[0].message.content)
            last[k] = (r.usage, r.model_extra["ifp"])
            messages += [{"role": "assistant", "content": answers[k][-1]},
                         {"role": "user", "content": follow[turn]}]  # fmt: skip
    model, tok = ifp_mlx.load(folder)
    for k, text in opening.items():
        usage, ifp = last[k]
        assert usage.prompt_tokens_details.cached_tokens > 30, k
        assert not ifp["reselected"] and ifp["restored_units"], k
        conv = Conversation(model, tok, keep=0.5, predictor="activation")
        alone = ["".join(r.text for r in conv.ask(m, max_tokens=4)) for m in (text, follow[0])]
        assert alone == answers[k], k


def test_a_stop_string_never_streams(server):
    """A stop string that spans tokens: the stream holds its start back until it is sure, so
    the streamed text is the non-streamed text, cut before the stop string."""
    client = server.client()
    full = client.completions.create(model="m", prompt="w5 w6", max_tokens=12).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]  # four characters: usually two tokens
    assert len(stop) == 4 and full.index(stop) > 0
    cut = client.completions.create(model="m", prompt="w5 w6", max_tokens=12, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    chunks = list(client.completions.create(model="m", prompt="w5 w6", max_tokens=12,
                                            stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text


def test_max_completion_tokens_is_the_new_name_of_max_tokens(server):
    client = server.client()
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_body_without_content_length_is_still_bounded(server):
    """Chunked bodies (no Content-Length) are read up to the same limit (0.05 MB here)."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 2}
    status, answer, _ = server.request("POST", "/v1/chat/completions",
                                       raw=iter([json.dumps(body).encode()]))  # fmt: skip
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
    big = json.dumps({**body, "messages": [{"role": "user", "content": "w5 " * 30000}]}).encode()
    pieces = (big[i : i + 8192] for i in range(0, len(big), 8192))
    err, _ = _error(server, 413, raw=pieces)
    assert "over 0.05 MB" in err["message"]


def test_a_seed_repeats_a_sampled_answer_and_zero_is_a_seed(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="m", prompt="w5 w6", max_tokens=16,
                                          temperature=1.0, seed=seed).choices[0].text  # fmt: skip

    first = sample(0)
    others = {sample(None) for _ in range(3)}
    assert sample(0) == first and len(others | {first}) > 1  # unseeded draws differ


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_logprobs_are_the_models_log_softmax_at_its_tokens(server, folder, keep):
    """Each answer token's logprob (and the top alternatives) under the model that produced
    it: the dense one, or the one pruned for this prompt (the same selection in-process)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    import ifp_mlx
    from ifp_mlx.generate import prompt_tokens

    client = server.client()
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, logprobs=True,
                                       top_logprobs=3, extra_body={"keep": keep})  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == r.choices[0].message.content
    model, tok = ifp_mlx.load(folder)
    prompt = prompt_tokens(tok, MESSAGES)
    answer = [t.token for t in ifp_mlx.stream_generate(model, tok, MESSAGES, keep=keep,
                                                       predictor="activation", max_tokens=6)]  # fmt: skip
    # the model that answered: the prompt's KV entries from the predictor's dense prefill (all
    # but its last token), then the pruned FFNs for the rest
    cache = make_prompt_cache(model)
    if keep < 1:
        done = model.select(prompt, keep=keep, predictor="activation", cache=cache).prefilled
    else:
        model.dense()
        done = 0
    logits = model(mx.array(prompt[done:] + answer[:-1])[None], cache=cache)[0]
    logits = logits[len(prompt) - done - 1 :].astype(mx.float32)
    want = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for i, c in enumerate(content):
        assert c.logprob == pytest.approx(want[i, answer[i]], abs=1e-3)
        best = np.argsort(-want[i])[:3]
        got = [a.logprob for a in c.top_logprobs]
        assert np.allclose(got, want[i, best], atol=1e-3), (i, got, want[i, best].tolist())
        assert c.top_logprobs[0].logprob >= c.logprob - 1e-6  # greedy: the answer's own token
    streamed = list(client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"keep": keep}))  # fmt: skip
    got = [e for c in streamed if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in got] == [c.token for c in content]
    assert [e.logprob for e in got] == pytest.approx([c.logprob for c in content], abs=1e-5)
    legacy = client.completions.create(model="m", prompt="w5 w6", max_tokens=4, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text and lp.text_offset[0] == 0
    assert all(len(alt) <= 2 and v <= 0 for alt, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_dense_requests_match_ifp_generate(server, folder):
    client = server.client()
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10,
                                       temperature=1.0, seed=7, extra_body={"keep": 1})  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "ifp_mlx.apps.generate", "--model", str(folder), "--prompt",
         "w5 w6 w7", "--keep", "1", "--temp", "1.0", "--seed", "7", "--max-tokens", "10"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert r.choices[0].message.content == res.stdout.rstrip("\n")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages"),
        ({"messages": "w5"}, "messages"),
        ({"messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "seed": -1}, "seed"),
        ({"messages": MESSAGES, "stop": [1, 2]}, "stop"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES, "keep": 2}, "keep"),
        ({"messages": MESSAGES, "keep": [0.5]}, None),  # one layer given, the model has 2
        ({"messages": MESSAGES, "predictor": "magic"}, "predictor"),
        ({"messages": MESSAGES, "policy": "never"}, "policy"),
        ({"messages": MESSAGES, "n": 3}, "n"),
    ],
)
def test_invalid_requests_are_400(server, body, param):
    err, _ = _error(server, 400, body=body)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_bodies_and_routes(server):
    assert _error(server, 400, raw=b"{not json")[0]["message"].startswith("the body is not valid JSON")  # fmt: skip
    assert "UTF-8" in _error(server, 400, raw=b'{"messages": "\xff\xfe"}')[0]["message"]
    assert _error(server, 400, body=[1, 2])[0]["message"] == "the body must be a JSON object"
    assert _error(server, 400, path="/v1/completions", body={"prompt": ""})[0]["param"] == "prompt"
    assert _error(server, 404, body={"model": "gpt-9", "messages": MESSAGES})[0]["code"] == "model_not_found"  # fmt: skip
    assert _error(server, 413, raw=b'{"x": "' + b"a" * 60000 + b'"}')[0]["code"] == "request_too_large"  # fmt: skip
    assert _error(server, 404, method="GET", path="/v1/nothing")[0]["code"] == "not_found"
    assert _error(server, 405, method="GET", path="/v1/chat/completions")
    assert _error(server, 401, key=None, body={"messages": MESSAGES})[0]["type"] == "authentication_error"  # fmt: skip
    assert _error(server, 401, key="wrong", method="GET", path="/v1/models")
    assert server.request("GET", "/health", key=None)[0] == 200  # no key needed
    big = [{"role": "user", "content": "w5 " * 5000}]  # past the 4096-token context
    assert "context" in _error(server, 400, body={"messages": big, "max_tokens": 2}, raw=None)[0]["message"]  # fmt: skip


def _stream_open(server, max_tokens):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "keep": 0.5}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    res = conn.getresponse()
    assert res.status == 200
    res.readline()  # the first event: generation is running
    return conn, res


def test_busy_is_429_and_a_cancelled_stream_frees_the_model(server):
    """--max-queue 0: while one answer streams, another request gets 429 + Retry-After; the
    streaming client hangs up and the model is free again at once (not after its 4000 tokens)."""
    conn, res = _stream_open(server, 4000)
    err, headers = _error(server, 429, body={"messages": MESSAGES, "max_tokens": 2})
    assert err["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline, status = time.time() + 20, None
    while time.time() < deadline:
        status = server.request("POST", "/v1/chat/completions",
                                body={"messages": MESSAGES, "max_tokens": 2})[0]  # fmt: skip
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200


def test_serve_load_bench(folder, tmp_path):
    """ifp-bench serve: 120 requests from 8 clients (streamed, plain, cancelled, invalid)."""
    out = tmp_path / "serve.json"
    tic = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "ifp_mlx.apps.bench", "serve", "--model", str(folder),
         "--requests", "120", "--clients", "8", "--max-tokens", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    outside = time.perf_counter() - tic  # the whole run, timed from here
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["requests"] == 120 and r["server_errors"] == 0 and r["hung"] == 0
    assert r["valid_unanswered"] == 0 and r["invalid_rejected"] == r["invalid"] > 0
    assert r["cancelled"] > 0 and r["rss_after_mb"] <= 1.1 * r["rss_idle_mb"]
    # every answer came within the load phase, which lies within the run timed from outside
    assert 0 < r["latency_ms"]["p50"] and r["latency_ms"]["p95"] <= 1e3 * r["wall_s"]
    assert r["wall_s"] < outside and r["throughput_rps"] >= r["answered"] / outside
    assert str(folder) not in out.read_text()
