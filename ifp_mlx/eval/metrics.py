"""Quality metrics of one method at one keep, each over a fixed list of held-out examples.

Everything is teacher-forced except HumanEval, whose completions are generated and executed in
a separate, network-less Python process with a timeout (never in this process).
"""

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, generation_stream

from .methods import Method

Pair = Tuple[List[int], List[int]]  # (prompt tokens, answer tokens)


def answer_logits(method: Method, prompt: List[int], answer: List[int], keep: float) -> mx.array:
    """Logits predicting each answer token, after ``method`` selected units from the prompt."""
    cache, n = method.prepare(prompt, answer, keep)
    return continue_logits(method.model, cache, n, prompt, answer)


def continue_logits(model, cache, n: int, prompt: List[int], answer: List[int]) -> mx.array:
    """Logits predicting each answer token when ``cache`` already holds ``n`` prompt tokens."""
    seq = prompt + answer
    logits = model(mx.array(seq[n:])[None], cache=cache)[0]
    start = len(prompt) - 1 - n
    return logits[start : start + len(answer)].astype(mx.float32)


def answer_loss(method: Method, pairs: Sequence[Pair], keep: float) -> float:
    """Token-weighted mean NLL (nats) of the reference answers."""
    total, count = 0.0, 0
    for prompt, answer in pairs:
        logits = answer_logits(method, prompt, answer, keep)
        total += nn.losses.cross_entropy(logits, mx.array(answer), reduction="sum").item()
        count += len(answer)
    return total / max(count, 1)


def kl_agreement(dense: mx.array, pruned: mx.array) -> Tuple[float, float]:
    """Mean KL(dense ‖ pruned) per position and top-1 agreement of two logit arrays."""
    logp = dense - mx.logsumexp(dense, axis=-1, keepdims=True)
    logq = pruned - mx.logsumexp(pruned, axis=-1, keepdims=True)
    kl = (mx.exp(logp) * (logp - logq)).sum(-1).mean().item()
    agree = (dense.argmax(-1) == pruned.argmax(-1)).astype(mx.float32).mean().item()
    return kl, agree


@dataclass
class FidelityCase:
    prompt: List[int]
    answer: List[int]  # the dense model's own greedy answer, its end-of-turn token included
    dense_logits: mx.array
    ended: bool = False  # dense ended its turn within the limit (answer[-1] is that token)


def fidelity_cases(dense: Method, prompts: Sequence[List[int]], tokens: int, eos) -> list:
    """Dense greedy answers and their dense logits (computed once, reused for every method)."""
    cases = []
    for prompt in prompts:
        dense.model.dense()
        answer, ended = [], False
        for tok, _ in generate_step(mx.array(prompt), dense.model, max_tokens=tokens):
            tok = int(tok)
            answer.append(tok)  # the end of turn too: ending is part of what a user reads
            if tok in eos:
                ended = True
                break
        mx.synchronize(generation_stream)  # mlx-lm's look-ahead step (generate.stream_generate)
        if len(answer) == int(ended):
            continue
        logits = answer_logits(dense, prompt, answer, 1.0)
        mx.eval(logits)
        cases.append(FidelityCase(prompt, answer, logits, ended))
    return cases


def end_probability(method: Method, cases: Sequence[FidelityCase], keep: float) -> Optional[float]:
    """Mean probability of the end-of-turn token where the dense model ends its answer
    (teacher-forced on dense's answer): how sure the pruned model is that the answer is done."""
    probs = []
    for c in cases:
        if c.ended:
            logits = answer_logits(method, c.prompt, c.answer, keep)[-1]
            probs.append(mx.softmax(logits, axis=-1)[c.answer[-1]].item())
    return sum(probs) / len(probs) if probs else None  # dense ended none of them


def fidelity(method: Method, cases: Sequence[FidelityCase], keep: float) -> Tuple[float, float]:
    kls, agrees = [], []
    for c in cases:
        kl, agree = kl_agreement(c.dense_logits, answer_logits(method, c.prompt, c.answer, keep))
        kls.append(kl)
        agrees.append(agree)
    n = max(len(kls), 1)
    return sum(kls) / n, sum(agrees) / n


def multiple_choice(
    method: Method, items: Sequence[Tuple[List[int], int]], letters: List[int], keep: float
) -> float:
    """Accuracy: the choice letter with the highest next-token log-likelihood."""
    correct = 0
    for prompt, answer in items:
        logits = answer_logits(method, prompt, [letters[answer]], keep)[0]
        pick = int(mx.argmax(logits[mx.array(letters)]).item())
        correct += pick == answer
    return correct / max(len(items), 1)


STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")

SANDBOX = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network is disabled during evaluation")
_s.socket = _s.create_connection = _s.getaddrinfo = _no_network
try:
    import resource as _r
    _r.setrlimit(_r.RLIMIT_AS, (2 << 30, 2 << 30))
except Exception:
    pass
"""


def complete(
    method: Method, tokenizer, prompt: List[int], reference: List[int], keep: float, max_tokens: int
) -> str:
    """Greedy completion of a code prompt, cut at the first stop sequence."""
    cache, n = method.prepare(prompt, reference, keep)
    out, text = [], ""
    for tok, _ in generate_step(
        mx.array(prompt[n:]), method.model, max_tokens=max_tokens, prompt_cache=cache
    ):
        tok = int(tok)
        if tok in tokenizer.eos_token_ids:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if any(s in text for s in STOP):
            break
    cut = min([text.index(s) for s in STOP if s in text] + [len(text)])
    return text[:cut]


def program(ex, completion: str) -> str:
    """A HumanEval candidate: prompt + completion + the problem's tests + the check call."""
    return f"{ex.prompt}{completion}\n\n{ex.test}\n\ncheck({ex.entry_point})\n"


def passes(source: str, timeout: float = 10.0) -> bool:
    """Run a candidate program + its tests in a fresh interpreter; True when it exits 0."""
    with tempfile.TemporaryDirectory(prefix="ifp-eval-exec-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(SANDBOX + source)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
        try:
            r = subprocess.run(
                [sys.executable, "-I", path],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0
