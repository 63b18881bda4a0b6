"""Generation with per-prompt pruning, wrapping mlx-lm's generate loop.

Per prompt: the predictor scores units (the activation predictor does so during a dense
prefill that fills the KV cache), the kept units are materialized once, and mlx-lm's own loop
then prefills the rest and decodes on the compact model. Nothing IFP-specific runs per token.
"""

import functools
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generate_step, generation_stream
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .budget import Budget, is_dense
from .errors import IFPError
from .predictors import prefill_progress
from .selection import Selection

Prompt = Union[str, List[int], List[dict]]


def clean_text(text: str) -> str:
    """Text as valid UTF-8: undecodable bytes (a command line or file read with
    ``surrogateescape``) and lone surrogates become U+FFFD, as a terminal would show them."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _message(m) -> dict:
    if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls"):
        return {**m, "content": ""}  # an assistant turn that only called tools
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise IFPError("a message must be a dict with a 'role' and a text 'content'")
    return {**m, "content": clean_text(m["content"])}


TEMPLATE_SECONDS = 2.0  # a real chat template renders in milliseconds


class TimeLimit(Exception):
    """Raised inside code that ran past :func:`time_limit`."""


@contextmanager
def time_limit(seconds: float):
    """Stop this thread's Python code after ``seconds`` (raises TimeLimit in it). A chat
    template is code from the model folder: jinja compiles it to Python, so a trace function
    that looks at the clock on each call and each line can stop a template that loops for
    ever, without a process or a signal (which a library cannot own)."""
    deadline = time.monotonic() + seconds

    def tracer(frame, event, arg):  # calls everywhere, lines in template code
        if time.monotonic() > deadline:
            raise TimeLimit
        return tracer if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def prompt_tokens(tokenizer, prompt: Prompt, chat: bool = True,
                  tools: Optional[list] = None) -> List[int]:  # fmt: skip
    """Token ids for ``prompt``: a user message (chat template applied), messages, or ids.
    ``tools`` (OpenAI function specs) are shown to the model (``ifp_mlx.tools.render``)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise IFPError("empty prompt")
        messages = [{"role": "user", "content": clean_text(prompt)}]
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        messages = [_message(m) for m in prompt]
    elif isinstance(prompt, (list, tuple)) and prompt:
        return list(prompt)  # token ids: the model checks them (check_tokens)
    else:
        raise IFPError("empty prompt")
    extra: dict = {}
    if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
        from .tools import render

        messages, extra = render(tokenizer, messages, tools)
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            with time_limit(TEMPLATE_SECONDS):
                return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          **extra))  # fmt: skip
        except TimeLimit:
            raise IFPError(f"the model's chat template did not finish within {TEMPLATE_SECONDS:g} "
                           "s (a damaged or hostile template: fix its chat_template)")  # fmt: skip
        except Exception as e:  # jinja errors of a damaged template, raise_exception(), ...
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise IFPError(f"the model's chat template fails on this conversation: {first}")
    return tokenizer.encode("\n".join(m["content"] for m in messages))


# Below these, temperature / top_p sampling overflows float32 (1/T = inf, p rounds to 0) and
# returns noise; their limit (greedy, only the top token) is what the caller means.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


def make_sampler(temp: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 top_k: int = 0, min_p: float = 0.0):  # fmt: skip
    """mlx-lm's sampler for (temp, top_p, top_k, min_p; 0 or 1 = off), taking the greedy limit
    for tiny values; ``seed`` (0 .. 2**64 - 1) seeds MLX's generator first."""
    from mlx_lm.sample_utils import make_sampler as mlx_sampler

    if seed is not None:
        mx.random.seed(seed)
    if temp < MIN_TEMPERATURE or top_p < MIN_TOP_P:
        temp = 0.0
    return mlx_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


def context_length(model: nn.Module) -> Optional[int]:
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "max_seq_len", "context_length"):
        if isinstance(getattr(args, name, None), int):
            return getattr(args, name)
    return None


@dataclass
class IFPStats:
    """What pruning did and cost for one answer (times in ms, speeds in tokens/s)."""

    keep: float = 1.0
    predictor: str = "dense"
    select_ms: float = 0.0  # scoring beyond the prefill + top-k
    score_prefill_ms: float = 0.0  # the predictor's own pass (activation: the dense prefill)
    materialize_ms: float = 0.0
    materialize_gbps: float = 0.0
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    ttft_ms: float = 0.0
    peak_memory_gb: float = 0.0
    store: str = "memory"  # where the FFN units live (ifp_mlx.store)
    read_bytes: int = 0  # flash: bytes read from the unit file for this answer
    read_calls: int = 0
    expected_kl: Optional[float] = None  # calibrated KL to the dense model at this keep
    max_kl: Optional[float] = None  # the target the keep was chosen for (keep="auto")
    rescores: int = 0  # reselections while the answer grew (rescore=N)
    rescore_ms: float = 0.0  # their dense passes + materializations

    def quality(self) -> str:
        """``kept 68% (activation, auto for KL ≤ 0.75, expected KL 0.75)``: the keep in use and
        what it costs in quality (from the folder's calibration)."""
        text = f"kept {100 * self.keep:.0f}% ({self.predictor}"
        if self.max_kl is not None:
            text += f", auto for KL ≤ {self.max_kl:g}"
        if self.expected_kl is not None and self.predictor != "dense":
            text += f", expected KL {self.expected_kl:.2f}"
        return text + ")"

    def line(self) -> str:
        store = f"store {self.store}"
        if self.store != "memory" and self.predictor == "dense":
            store += ", every unit in memory (dense)"
        if self.store != "memory" and (self.read_bytes or self.predictor != "dense"):
            store += f", read {self.read_bytes / 2**20:.1f} MB in {self.read_calls} reads"
        if self.rescores:
            store += f" | reselected {self.rescores}x ({self.rescore_ms:.0f} ms)"
        return (
            f"[{self.quality()} | {store} | select "
            f"{self.select_ms:.0f} ms | materialize {self.materialize_ms:.0f} ms | prompt "
            f"{self.prompt_tps:.0f} tok/s | decode {self.generation_tps:.1f} tok/s | peak "
            f"{self.peak_memory_gb:.2f} GB]"
        )


@dataclass
class IFPResponse(GenerationResponse):
    """mlx-lm's GenerationResponse plus the IFP stats of this answer."""

    ifp: IFPStats = field(default_factory=IFPStats)


@contextmanager
def one_generation(model: nn.Module):
    """Hold ``model`` for one generation. Two interleaved generations would share its
    selection and, through a server's or chat's caches, each other's state: the second one
    is an error instead (finish or close the first: ``gen.close()``)."""
    lock = model.__dict__.setdefault("_ifp_generating", threading.Lock())
    if not lock.acquire(blocking=False):
        raise IFPError("this model is already generating (another stream_generate is open); "
                       "finish or close() that one first")  # fmt: skip
    try:
        yield
    finally:
        lock.release()


def _held(gen_fn):
    """``gen_fn``'s generator, run under :func:`one_generation` of its model."""

    @functools.wraps(gen_fn)
    def held(model, *args, **kwargs):
        with one_generation(model):
            yield from gen_fn(model, *args, **kwargs)

    return held


@_held
def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    keep: Budget = None,
    predictor=None,
    max_tokens: int = 256,
    prompt_cache: Optional[list] = None,
    reselect: bool = True,
    max_kl: Optional[float] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    rescore: Optional[int] = None,
    dense_head: Optional[int] = None,
    **kwargs,
) -> Iterator[IFPResponse]:
    """Like ``mlx_lm.stream_generate`` but prunes the FFNs for this prompt first.

    ``keep``: fraction of FFN units kept per layer (1.0 = dense), a per-layer list, ``"auto"``
    (the smallest calibrated keep whose expected KL to the dense model is ≤ ``max_kl``), or
    None for the folder's default. With ``reselect=False`` the current selection is kept
    (multi-turn "first-turn" policy). ``progress(done, total)`` hears how many prompt tokens
    are prefilled (first with 0, before any work). ``rescore=N`` (activation predictor) scores
    the answer as it grows: every N generated tokens one dense pass over them rewrites their KV
    entries and adds their activations to the prompt's, and the top units are reselected
    (``Rescorer``); None: the folder's ``ifp.rescore`` (0 = off). ``dense_head=H`` (activation
    predictor) writes the first H answer tokens with the dense model and selects from prompt +
    those tokens; None: the folder's ``ifp.dense_head`` (0 = select from the prompt).
    ``max_kv_size=N``: a new cache keeps the last N tokens (rotating, as in mlx-lm). ``kwargs``
    go to mlx-lm (``sampler=``, ...).
    """
    from .budget import budget_units, resolve

    tokens = model.check_tokens(prompt_tokens(tokenizer, prompt))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise IFPError(f"max_tokens must be a whole number ≥ 1, not {max_tokens!r}")
    kv = kwargs.pop("max_kv_size", None)
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
        raise IFPError(f"max_kv_size must be a whole number ≥ 1, not {kv!r}")
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, kv)
    limit = context_length(model)
    used = cache[0].offset if cache and hasattr(cache[0], "offset") else 0
    if limit and used + len(tokens) >= limit:
        raise IFPError(f"prompt is {used + len(tokens)} tokens, the model's context is {limit}")
    choice = resolve(model, keep, predictor, max_kl)
    budget_units(choice.keep, model.ffn_units)  # validate early

    ifp = model.__dict__.get("_ifp_config", {})
    rescore = ifp.get("rescore", 0) if rescore is None else rescore
    dense_head = ifp.get("dense_head", 0) if dense_head is None else dense_head
    for name, value in (("rescore", rescore), ("dense_head", dense_head)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise IFPError(f"{name} must be a whole number ≥ 0, not {value!r}")
    if progress is not None:
        progress(0, len(tokens))
    stats = IFPStats(prompt_tokens=len(tokens), store=model.ffn_store)
    read0, calls0 = model.ffn_io
    mx.reset_peak_memory()
    tic = time.perf_counter()
    rest = tokens
    rescorer = None
    if is_dense(choice.keep):
        model.dense()
    elif reselect or model.selection is None:
        if rescore or dense_head:
            rescorer = Rescorer.make(model, choice, rescore, dense_head, cache)
        with prefill_progress(progress and (lambda done, _: progress(done, len(tokens)))):
            if rescorer is not None:
                sel = rescorer.start(tokens)
            else:
                sel = model.select(tokens, keep, predictor, cache=cache, max_kl=max_kl)
        stats.score_prefill_ms = sel.score_ms
        stats.select_ms = sel.select_ms
        stats.materialize_ms = sel.materialize_ms
        stats.materialize_gbps = sel.materialize_gbps
        rest = tokens[sel.prefilled :]
    stats.read_bytes, stats.read_calls = (a - b for a, b in zip(model.ffn_io, (read0, calls0)))
    if model.selection is not None:
        sel = model.selection
        stats.keep, stats.predictor = sel.keep, sel.predictor
        stats.expected_kl, stats.max_kl = sel.expected_kl, sel.max_kl
    ttft_start = time.perf_counter() - tic

    if progress is not None:
        done = len(tokens) - len(rest)
        kwargs["prompt_progress_callback"] = lambda n, _: progress(done + n, len(tokens))
    if rescorer is not None:
        source = _responses(
            tokenizer, len(rest), rescorer.tokens(rest, max_tokens, kwargs), max_tokens
        )
    else:
        source = _mlx_stream_generate(
            model, tokenizer, rest, max_tokens=max_tokens, prompt_cache=cache, **kwargs
        )
    try:
        for resp in source:
            if rescorer is not None and rescorer.count != stats.rescores:
                stats.rescores, stats.rescore_ms = rescorer.count, rescorer.ms
                sel = model.selection
                stats.keep, stats.predictor = sel.keep, sel.predictor
                stats.expected_kl, stats.max_kl = sel.expected_kl, sel.max_kl
            if resp.generation_tokens == 1 or stats.ttft_ms == 0.0:
                rest_ms = len(rest) / resp.prompt_tps * 1e3 if resp.prompt_tps else 0.0
                stats.ttft_ms = ttft_start * 1e3 + rest_ms
                stats.prompt_tps = len(tokens) / (stats.ttft_ms / 1e3) if stats.ttft_ms else 0.0
            stats.generation_tokens = resp.generation_tokens
            stats.generation_tps = resp.generation_tps
            stats.peak_memory_gb = resp.peak_memory
            fields = {k: getattr(resp, k) for k in resp.__dataclass_fields__}
            fields["prompt_tokens"], fields["prompt_tps"] = len(tokens), stats.prompt_tps
            yield IFPResponse(**fields, ifp=stats)
    finally:
        # mlx-lm computes the next token ahead, so a step may still run when the answer ends.
        # Wait for it: on a sharded model its all_sums would otherwise interleave with the
        # next selection's and the ranks would add up the wrong partial sums.
        mx.synchronize(generation_stream)


def following_predictor(choice, cache: list):
    """A fresh activation predictor that adds each scoring call to the ones before (scores over
    prompt + answer so far), or None where selection cannot follow the answer: a predictor
    that does not read activations, or a cache that cannot be rewound (a rotated window)."""
    from .predictors.activation import ActivationPredictor

    pred = choice.predictor
    if pred == "activation":
        pred = ActivationPredictor()
    if not isinstance(pred, ActivationPredictor) or not can_trim_prompt_cache(cache):
        return None
    return ActivationPredictor(compensate=pred.compensate, accumulate=True)


class Rescorer:
    """Selection that follows the answer: every ``every`` generated tokens, one dense pass over
    them (batched: one memory-bound pass per ``every`` tokens) rewrites their KV entries with
    the dense model's and adds their activations to the prompt's GRIFFIN sums; the top units of
    prompt + answer so far are then materialized. Prompt-only selection drifts from what the
    answer needs; scores over prompt *and* answer (the oracle) are much closer to dense."""

    def __init__(self, model: nn.Module, predictor, choice, every: int, head: int, cache: list):
        self.model, self.predictor, self.choice = model, predictor, choice
        self.every, self.head, self.cache = every, head, cache
        self.count, self.ms = 0, 0.0

    @classmethod
    def make(cls, model: nn.Module, choice, every: int, head: int, cache: list):
        """A rescorer for this request, or None where it cannot run: a predictor that does not
        read activations, or a cache that cannot be rewound (a rotated sliding window)."""
        fresh = following_predictor(choice, cache)
        return None if fresh is None else cls(model, fresh, choice, every, head, cache)

    def start(self, tokens: List[int]) -> Selection:
        """Select from the prompt; with a dense head, only score it (the dense model, or with
        the flash store the units streamed layer by layer, writes the head's tokens)."""
        if not self.head:
            sel = self.model.select(tokens, self.choice.keep, self.predictor, cache=self.cache)
            sel.expected_kl, sel.max_kl = self.choice.expected_kl, self.choice.max_kl
            return sel
        model = self.model
        model.dense() if model.ffn_store == "memory" else model.release()
        tic = time.perf_counter()
        result = self.predictor.score(model, tokens, self.cache)
        mx.eval(result.scores)
        return Selection([], [], "dense", (time.perf_counter() - tic) * 1e3, 0.0,
                         prefilled=result.prefilled)  # fmt: skip

    def tokens(self, rest: List[int], max_tokens: int, kwargs: dict):
        """(token, logprobs) as mlx-lm's ``generate_step`` gives them: a dense head first,
        then reselecting between chunks of ``every`` tokens."""
        kwargs = dict(kwargs)
        n = 0
        while n < max_tokens:
            if hasattr(kwargs.get("sampler"), "rewind"):  # its look-ahead token was dropped
                kwargs["sampler"].rewind(n)
            chunk, base = [], self.cache[0].offset
            size = self.head if n == 0 and self.head else (self.every or max_tokens)
            steps = min(size, max_tokens - n)
            for token, logprobs in generate_step(
                mx.array(rest), self.model, max_tokens=steps, prompt_cache=self.cache, **kwargs
            ):
                chunk.append(token)
                yield token, logprobs
            n += len(chunk)
            kwargs.pop("prompt_progress_callback", None)
            if n >= max_tokens or len(chunk) < steps:
                return
            mx.synchronize(generation_stream)
            tic = time.perf_counter()
            # The cache holds rest + the chunk (mlx-lm's look-ahead step may have fed its last
            # token) from the pruned model: the dense pass rewrites rest + chunk[:-1] and leaves
            # chunk[-1] to feed, as the prompt's selection does.
            trim_prompt_cache(self.cache, self.cache[0].offset - base)
            sel = self.model.select(
                rest + chunk, self.choice.keep, self.predictor, cache=self.cache
            )
            sel.expected_kl, sel.max_kl = self.choice.expected_kl, self.choice.max_kl
            self.count += 1
            self.ms += (time.perf_counter() - tic) * 1e3
            rest = chunk[-1:]


def _responses(tokenizer, prompt_size: int, steps, max_tokens: int) -> Iterator[GenerationResponse]:
    """mlx-lm's stream_generate response loop over our own (token, logprobs) steps."""
    detok = tokenizer.detokenizer
    detok.reset()
    tic = time.perf_counter()
    prompt_tps, n, token, logprobs = 0.0, 0, None, None
    for n, (token, logprobs) in enumerate(steps):
        if n == 0:
            prompt_tps = prompt_size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detok.add_token(token)
        if n + 1 == max_tokens:
            break
        yield GenerationResponse(
            text=detok.last_segment, token=token, logprobs=logprobs, from_draft=False,
            prompt_tokens=prompt_size, prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=None,
        )  # fmt: skip
    detok.finalize()
    yield GenerationResponse(
        text=detok.last_segment, token=token, logprobs=logprobs, from_draft=False,
        prompt_tokens=prompt_size, prompt_tps=prompt_tps, generation_tokens=n + 1,
        generation_tps=(n + 1) / (time.perf_counter() - tic),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason="stop" if token in tokenizer.eos_token_ids else "length",
    )  # fmt: skip


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    keep: Budget = None,
    predictor=None,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Answer ``prompt`` in one shot with the FFNs pruned for it (greedy unless ``sampler=``;
    ``max_kl=`` picks the keep for a quality target, see ``stream_generate``)."""
    text, last = "", None
    for resp in stream_generate(model, tokenizer, prompt, keep, predictor, max_tokens, **kwargs):
        if verbose:
            print(resp.text, end="", flush=True)
        text += resp.text
        last = resp
    if verbose:
        print()
        if last is not None:
            print(last.ifp.line())
    return text
