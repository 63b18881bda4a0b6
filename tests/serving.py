"""A real ifp-serve on a loopback port, for the server tests."""

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct-8bit"  # the bundled server's model id (its folder's name)
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky?", "Name a prime number.", "What is 2 + 3?",
             "Who wrote Hamlet?", "What is the largest ocean?", "Name a fruit.",
             "What gas do plants take in?", "What is the boiling point of water in C?",
             "Name a planet.", "What language is spoken in Spain?", "How many days in a week?",
             "What is the opposite of hot?", "Name a mammal that flies.",
             "What is the chemical symbol for gold?", "What shape has three sides?",
             "Which animal says moo?", "What is frozen water called?",
             "How many hours in a day?"]  # fmt: skip


def random_smol_folder(smol_default, root):
    """A random tiny llama that speaks SmolLM2's tokenizer (49k tokens, chat template, room for
    a tools prompt): whatever it says, a grammar must still hold."""
    from ifp_mlx.convert import convert
    from tests.helpers import make_tiny_hf

    src = make_tiny_hf("llama", root / "hf", seed=3, vocab_size=49152, eos_token_id=2,
                       max_position_embeddings=1024)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol_default / name).is_file():
            shutil.copy(smol_default / name, src / name)
    convert(src, root / "m", progress=False)
    return root / "m"


def random_smol_server(smol_default, root):
    """ifp-serve on :func:`random_smol_folder`."""
    return Server(random_smol_folder(smol_default, root), "--api-key", KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ifp_mlx.apps.serve", "--model", str(folder),
             "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def request(self, method, path, body=None, headers=None, key=KEY, raw=None, host=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {"Content-Type": "application/json", **(headers or {})}
        if host is not None:
            h["Host"] = host
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=h)
        res = conn.getresponse()
        out = res.read()
        conn.close()
        return res.status, json.loads(out) if out else None, dict(res.getheaders())

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def error(server, status, method="POST", path="/v1/chat/completions", **kw):
    got, body, headers = server.request(method, path, **kw)
    assert got == status, (got, body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"], headers
