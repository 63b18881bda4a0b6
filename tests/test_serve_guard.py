"""ifp-serve against what a web page, a flood of connections or a hostile body can send: each
case was a 200, a hang or a 500 before the guard (issue: hardening, round two)."""

import http.client
import json
import random
import socket
import subprocess
import sys
import time

import pytest

from ifp_mlx.convert import convert
from tests.helpers import make_tiny_hf
from tests.serving import KEY, Server, error

MESSAGES = [{"role": "user", "content": "w5 w6 w7"}]
CONTEXT = 4096


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    src = make_tiny_hf("llama", root / "hf", seed=23, max_position_embeddings=CONTEXT)
    convert(src, root / "m", progress=False)
    return root / "m"


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--api-key", KEY, "--allowed-host", "ifp.local",
               "--allowed-origin", "https://app.example", "--max-connections", "24",
               "--timeout", "1.5", "--max-queue", "2", "--batch-size", "1")  # fmt: skip
    yield s
    s.stop()


def chat(server, headers=None, host=None, **kw):
    body = {"messages": MESSAGES, **kw}
    return server.request("POST", "/v1/chat/completions", body=body, headers=headers, host=host)


def test_dns_rebinding_host_is_refused(server):
    """A page whose domain was rebound to 127.0.0.1 sends its own name as Host."""
    err, _ = error(server, 403, body={"messages": MESSAGES, "max_tokens": 1}, host="evil.example")
    assert err["code"] == "host_not_allowed"
    assert error(server, 403, method="GET", path="/health", host="evil.example:8080")
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "ifp.local", "[::1]"):
        assert chat(server, max_tokens=1, host=host)[0] == 200, host


def test_browser_origins_are_refused_unless_allowed(server):
    """The CORS "simple request" (text/plain, no preflight) ran a generation before."""
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    raw = json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode()
    assert error(server, 403, raw=raw, headers=evil)[0]["code"] == "origin_not_allowed"
    served = server.request("GET", "/health")[1]["served"]
    assert error(server, 403, headers={"Origin": "null"}, body={"messages": MESSAGES})
    assert error(server, 403, method="OPTIONS", headers={"Origin": "https://evil.example"})
    assert server.request("GET", "/health")[1]["served"] == served  # nothing ran
    ok = {"Origin": "https://app.example"}
    status, _, headers = server.request("OPTIONS", "/v1/chat/completions", headers={
        **ok, "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in headers["access-control-allow-headers"]
    status, body, headers = chat(server, max_tokens=1, headers=ok)
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"


def test_a_post_must_be_json(server):
    raw = json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        err, _ = error(server, 415, raw=raw, headers={"Content-Type": ctype})
        assert err["code"] == "unsupported_media_type"
    assert chat(server, max_tokens=1, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200  # fmt: skip


@pytest.mark.parametrize(
    "body,param,code",
    [
        ({"max_tokens": 10**9}, "max_tokens", None),
        ({"max_tokens": CONTEXT + 1}, "max_tokens", None),
        ({"seed": 2**64}, "seed", None),
        ({"seed": 10**30}, "seed", None),
        ({"n": True}, "n", None),
        ({"n": 1.0}, "n", None),
        ({"logprobs": "yes"}, "logprobs", None),
        ({"top_logprobs": 3}, "top_logprobs", None),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools", None),
        ({"tool_choice": "required"}, "tool_choice", None),  # without tools
        ({"functions": [{"name": "f"}]}, "functions", "unsupported"),  # the legacy form
        ({"response_format": {"type": "yaml"}}, "response_format", None),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
         "response_format", None),  # fmt: skip
        ({"logit_bias": {"5": 10}}, "logit_bias", "unsupported"),
        ({"frequency_penalty": 1.5}, "frequency_penalty", "unsupported"),
    ],
)
def test_fields_out_of_range_or_not_implemented_are_400(server, body, param, code):
    err, _ = error(server, 400, body={"messages": MESSAGES, **body})
    assert err["param"] == param and err["code"] == code, err


def test_no_op_values_of_unimplemented_fields_are_accepted(server):
    """Clients send the defaults of fields they do not use; those are not refused."""
    status, body, _ = chat(server, max_tokens=1, logprobs=False, tools=[], seed=2**64 - 1,
                           response_format={"type": "text"}, presence_penalty=0, n=1)  # fmt: skip
    assert status == 200, body


def test_the_prompt_and_max_tokens_must_fit_the_context(server):
    long = [{"role": "user", "content": "w5 " * (CONTEXT - 40)}]
    err, _ = error(server, 400, body={"messages": long, "max_tokens": 100})
    assert "context" in err["message"]
    status, body, _ = server.request("POST", "/v1/chat/completions", body={"messages": long})
    assert status == 200 and body["usage"]["total_tokens"] <= CONTEXT  # the default is cut


@pytest.mark.parametrize("depth", [40, 1000, 100000])
def test_deep_json_is_400_not_500(server, depth):
    raw = ('{"messages": ' + "[" * depth + "]" * depth + "}").encode()
    if len(raw) > 50000:  # past --max-body-mb (1 MB): still a 4xx
        assert server.request("POST", "/v1/chat/completions", raw=raw)[0] in (400, 413)
        return
    assert "nested" in error(server, 400, raw=raw)[0]["message"]


def test_tiny_temperature_and_top_p_are_greedy(server):
    greedy = chat(server, max_tokens=6, temperature=0)[1]["choices"][0]["message"]["content"]
    for kw in ({"temperature": 1e-300}, {"temperature": 1e-30, "top_p": 1e-300}):
        got = chat(server, max_tokens=6, seed=1, **kw)[1]["choices"][0]["message"]["content"]
        assert got == greedy, kw


def test_idle_connections_are_closed_and_cannot_starve_the_server(server):
    """Twice --max-connections idle sockets (and one sending half a header): /health still
    answers at once, and the idle ones are closed after --timeout."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(48)]
    socks[0].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")  # no end
    try:
        tic = time.time()
        assert server.request("GET", "/health")[0] == 200
        assert time.time() - tic < 5
        deadline = time.time() + 30  # --timeout is 1.5 s; a loaded machine accepts late
        closed = 0
        for s in socks:
            s.settimeout(max(0.1, deadline - time.time()))
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()


def test_a_request_whose_client_left_is_dropped_before_it_runs(server):
    """While one answer streams, a queued client hangs up: its request never runs."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": MESSAGES, "max_tokens": CONTEXT - 20, "stream": True}  # seconds long
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    res = conn.getresponse()
    res.readline()  # streaming: the model is busy
    before = server.request("GET", "/health")[1]
    queued = socket.create_connection(("127.0.0.1", server.port))
    raw = json.dumps({"messages": MESSAGES, "max_tokens": 4}).encode()
    queued.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                   b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                   b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)  # fmt: skip
    time.sleep(1.0)  # queued behind the stream
    queued.close()
    time.sleep(1.0)  # the server hears the hang-up while the job waits
    conn.close()  # the stream ends: the worker moves on
    deadline = time.time() + 30
    while time.time() < deadline:
        now = server.request("GET", "/health")[1]
        if now["waiting"] == 0 and now["dropped"] > before["dropped"]:
            break
        time.sleep(0.2)
    assert now["dropped"] == before["dropped"] + 1
    assert now["served"] == before["served"]  # the queued request did not run


def test_server_fuzz(server):
    """250 requests built from random valid and invalid parts: no 5xx, no hang."""
    rng = random.Random(29)
    values = [None, True, False, 0, 1, -1, 2, 0.5, 1e-300, 1e308, 2**64, -(2**63), "", "x",
              "w5 w6", [], [1], ["a"], {}, {"type": "text"}, [[[]]], "\x00\udcff"]  # fmt: skip
    fields = ["messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "n", "keep", "predictor", "policy", "model", "logprobs", "tools",
              "stream_options", "response_format", "max_completion_tokens"]  # fmt: skip
    statuses = []
    for i in range(250):
        body = {"max_tokens": 2}
        if rng.random() < 0.7:
            body["messages"] = MESSAGES
        for name in rng.sample(fields, rng.randint(0, 4)):
            body[name] = rng.choice(values)
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        headers = {}
        if rng.random() < 0.1:
            headers["Origin"] = rng.choice(["https://evil.example", "https://app.example"])
        host = rng.choice([None] * 8 + ["evil.example", "localhost"])
        try:
            raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")  # fmt: skip
        except (TypeError, ValueError):
            continue
        if rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]  # cut short
        status = server.request("POST", path, raw=raw, headers=headers, host=host)[0]
        statuses.append(status)
        assert status < 500, (status, raw[:200])
    assert len(statuses) >= 200 and statuses.count(200) >= 10
    assert server.request("GET", "/health")[0] == 200


def _serve(folder, *flags, wait=True):
    return subprocess.run([sys.executable, "-m", "ifp_mlx.apps.serve", "--model", str(folder),
                           *flags], capture_output=True, text=True, timeout=120)  # fmt: skip


def test_an_empty_api_key_is_refused(folder):
    res = _serve(folder, "--api-key", "", "--port", "1")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--api-key is empty" in res.stderr


def test_every_interface_without_a_key_warns(folder):
    from tests.serving import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ifp_mlx.apps.serve", "--model", str(folder),
                             "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "warning: listening on 0.0.0.0" in line
        assert "no --api-key" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
