"""``ifp-bench serve``: a load test of ifp-serve through real HTTP.

The server runs as a subprocess on a free loopback port; N client threads share M requests,
mixing plain and streamed chat completions, streams cancelled after their first event, and
invalid requests. Reported: 5xx count (must be 0), hung connections (timeouts), valid requests
neither answered nor told 429, latency percentiles, throughput, and the server's RSS when warm
and idle (after one warm-up request) vs after the run.
"""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

KINDS = ("plain", "plain", "plain", "plain", "stream", "stream", "stream", "cancel", "invalid",
         "bad-json")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class _Client:
    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout

    def chat(self, messages: list, max_tokens: int, keep=0.5) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            body = {"messages": messages, "max_tokens": max_tokens}
            if keep is not None:  # None: the server's (the folder's) default
                body["keep"] = keep
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})  # fmt: skip
            res = conn.getresponse()
            data = json.loads(res.read())
            if res.status != 200:
                raise RuntimeError(f"ifp-serve answered {res.status}: {data}")
            return data
        finally:
            conn.close()

    def send(self, kind: str, max_tokens: int, i: int) -> dict:
        messages = [{"role": "user", "content": f"Request {i}: name a fruit and a colour."}]
        body = {"messages": messages, "max_tokens": max_tokens, "keep": 0.5}
        if kind in ("stream", "cancel"):
            body["stream"] = True
        if kind == "invalid":
            body["temperature"] = -3
        raw = b"{oops" if kind == "bad-json" else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        tic = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body=raw,
                         headers={"Content-Type": "application/json"})  # fmt: skip
            res = conn.getresponse()
            if kind == "cancel" and res.status == 200:
                res.readline()  # the stream has started: hang up
                conn.sock.shutdown(socket.SHUT_RDWR)
                return {"kind": kind, "status": 200, "ms": (time.perf_counter() - tic) * 1e3}
            data = res.read()
            ok = res.status != 200 or kind != "stream" or data.rstrip().endswith(b"data: [DONE]")
            return {"kind": kind, "status": res.status if ok else -2,
                    "ms": (time.perf_counter() - tic) * 1e3}  # fmt: skip
        except socket.timeout:
            return {"kind": kind, "status": -1, "ms": (time.perf_counter() - tic) * 1e3}
        except OSError:
            return {"kind": kind, "status": -3, "ms": (time.perf_counter() - tic) * 1e3}
        finally:
            conn.close()


TURNS = ["Tell me about the ocean in two sentences.", "Now about the desert.",
         "Which of the two is colder at night?"]  # fmt: skip


def _conversation_ttft(client: "_Client", max_tokens: int) -> dict:
    """Server-side TTFT of turns 2 and 3 of one conversation: resent whole as clients do,
    reusing the cached prompt and units (first-turn), vs fresh (an unrelated request between
    turns takes the cache)."""
    out = {}
    for mode in ("reused", "fresh"):
        messages, ttft = [], []
        for turn in TURNS:
            if mode == "fresh":
                client.chat([{"role": "user", "content": "Say hi."}], 2)
            messages.append({"role": "user", "content": turn})
            r = client.chat(messages, max_tokens)
            messages.append(r["choices"][0]["message"])
            ttft.append(r["ifp"]["ttft_ms"])
        out[mode] = ttft[1:]
    out["saved_ms"] = [f - r for f, r in zip(out["fresh"], out["reused"])]
    return out


def _start(model: Optional[str], flags: List[str], timeout: float):
    """ifp-serve on a free loopback port, up and answering /health: (process, port)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "ifp_mlx.apps.serve", "--port", str(port), *flags]
    cmd += ["--model", str(model)] if model else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ifp-serve exited: {proc.stderr.read()[-500:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("ifp-serve did not start")
            time.sleep(0.2)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_serve_load(model: Optional[str], requests: int, clients: int, max_tokens: int,
                   max_queue: int = 8, timeout: float = 120.0, batch_size: int = 8) -> dict:  # fmt: skip
    flags = ["--max-queue", str(max_queue), "--batch-size", str(batch_size)]
    proc, port = _start(model, flags, timeout)
    try:
        client = _Client(port, timeout)
        client.send("plain", max_tokens, -1)  # warm-up: first-use allocations are not a leak
        reuse = _conversation_ttft(client, max_tokens)
        time.sleep(0.5)
        idle = _rss_mb(proc.pid)
        results: List[dict] = []
        lock, counter = threading.Lock(), iter(range(requests))

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = client.send(KINDS[i % len(KINDS)], max_tokens, i)
                with lock:
                    results.append(r)

        tic = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - tic
        time.sleep(1.0)  # let cancelled generations wind down
        after = _rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        _stop(proc)
    valid = [r for r in results if r["kind"] in ("plain", "stream")]
    answered = [r for r in valid if r["status"] == 200]
    invalid = [r for r in results if r["kind"] in ("invalid", "bad-json")]
    lat = np.array([r["ms"] for r in answered]) if answered else np.zeros(1)
    return {
        "model": Path(model).resolve().name if model else "bundled SmolLM2-135M-Instruct 8-bit",
        "requests": len(results),
        "clients": clients,
        "max_tokens": max_tokens,
        "max_queue": max_queue,
        "batch_size": batch_size,
        "answered": len(answered),
        "busy_429": sum(r["status"] == 429 for r in results),
        "server_errors": sum(r["status"] >= 500 for r in results),
        "hung": sum(r["status"] == -1 for r in results),
        "broken_streams": sum(r["status"] == -2 for r in results),
        "valid_unanswered": sum(r["status"] not in (200, 429) for r in valid),
        "invalid": len(invalid),
        "invalid_rejected": sum(400 <= r["status"] < 500 for r in invalid),
        "cancelled": sum(r["kind"] == "cancel" and r["status"] == 200 for r in results),
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))},
        "throughput_rps": len(answered) / wall,
        "wall_s": wall,
        "rss_idle_mb": idle,
        "rss_after_mb": after,
        "server_alive": alive,
        "conversation_ttft_ms": reuse,
    }


QUESTIONS = ["Name a fruit and its colour.", "What is the capital of Italy?",
             "Give one reason to drink water.", "How many legs does a cat have?",
             "Name a large ocean.", "What do bees make?", "Say something about the moon.",
             "Which season is the coldest?", "Name a musical instrument.",
             "What is 3 + 4?", "Name a planet near the sun.", "Why do leaves fall?"]  # fmt: skip


def run_serve_throughput(model: Optional[str], clients: List[int], batch_size: int,
                         per_client: int = 2, max_tokens: int = 32, keep=None,
                         timeout: float = 1800.0) -> dict:  # fmt: skip
    """FIFO (``--batch-size 1``) vs batched (``--batch-size N``) at each number of concurrent
    clients: every client sends ``per_client`` distinct greedy questions one after the other
    (at most ``max_tokens`` each; an answer may end sooner). Reported per server
    and client count: answer tokens per second over the wall time, requests per second,
    latency and server TTFT percentiles, and whether each answer equals the FIFO server's
    (greedy: the same units, the same tokens)."""
    out = {"model": Path(model).resolve().name if model else "bundled SmolLM2-135M-Instruct 8-bit",
           "max_tokens": max_tokens, "per_client": per_client, "batch_size": batch_size,
           "keep": keep, "rows": []}  # fmt: skip
    answers: dict = {}
    for mode, size in (("fifo", 1), ("batched", batch_size)):
        proc, port = _start(model, ["--batch-size", str(size), "--max-queue", "64"], timeout)
        try:
            client = _Client(port, timeout)
            client.chat([{"role": "user", "content": "Hi."}], 2, keep)  # warm-up
            for n in clients:
                results: List[dict] = []
                lock = threading.Lock()

                def worker(c: int):
                    for j in range(per_client):
                        q = QUESTIONS[(c * per_client + j) % len(QUESTIONS)]
                        tic = time.perf_counter()
                        r = client.chat([{"role": "user", "content": q}], max_tokens, keep)
                        with lock:
                            results.append({"q": q, "ms": (time.perf_counter() - tic) * 1e3,
                                            "text": r["choices"][0]["message"]["content"],
                                            "tokens": r["usage"]["completion_tokens"],
                                            "ttft_ms": r["ifp"]["ttft_ms"],
                                            "batch": r["ifp"].get("batch", 1)})  # fmt: skip

                tic = time.perf_counter()
                threads = [threading.Thread(target=worker, args=(c,)) for c in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - tic
                lat = np.array([r["ms"] for r in results])
                ttft = np.array([r["ttft_ms"] for r in results])
                texts = {r["q"]: r["text"] for r in results}
                if mode == "fifo":
                    answers[n] = texts
                same = [texts[q] == answers[n].get(q) for q in texts]
                out["rows"].append({
                    "server": mode, "batch_size": size, "clients": n, "requests": len(results),
                    "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
                    "tokens_per_s": sum(r["tokens"] for r in results) / wall,
                    "requests_per_s": len(results) / wall,
                    "latency_ms": {"p50": float(np.percentile(lat, 50)),
                                   "p95": float(np.percentile(lat, 95))},
                    "ttft_ms": {"p50": float(np.percentile(ttft, 50)),
                                "p95": float(np.percentile(ttft, 95))},
                    "largest_batch": max(r["batch"] for r in results),
                    "same_as_fifo": sum(same) / len(same),
                })  # fmt: skip
        finally:
            _stop(proc)
    for row in out["rows"]:
        fifo = next(r for r in out["rows"] if r["server"] == "fifo" and r["clients"] == row["clients"])  # fmt: skip
        row["vs_fifo"] = row["tokens_per_s"] / fifo["tokens_per_s"]
    return out
