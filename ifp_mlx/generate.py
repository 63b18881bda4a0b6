"""Generation with per-prompt pruning, wrapping mlx-lm's generate loop.

Per prompt: the predictor scores units (the activation predictor does so during a dense
prefill that fills the KV cache), the kept units are materialized once, and mlx-lm's own loop
then prefills the rest and decodes on the compact model. Nothing IFP-specific runs per token.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.models.cache import make_prompt_cache

from .errors import IFPError
from .predictors import prefill_progress
from .selection import Budget, Selection, is_dense

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
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise IFPError("a message must be a dict with a 'role' and a text 'content'")
    return {**m, "content": clean_text(m["content"])}


def prompt_tokens(tokenizer, prompt: Prompt, chat: bool = True) -> List[int]:
    """Token ids for ``prompt``: a user message (chat template applied), messages, or ids."""
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
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # jinja errors of a damaged template, raise_exception(), ...
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise IFPError(f"the model's chat template fails on this conversation: {first}")
    return tokenizer.encode("\n".join(m["content"] for m in messages))


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
    **kwargs,
) -> Iterator[IFPResponse]:
    """Like ``mlx_lm.stream_generate`` but prunes the FFNs for this prompt first.

    ``keep``: fraction of FFN units kept per layer (1.0 = dense), a per-layer list, ``"auto"``
    (the smallest calibrated keep whose expected KL to the dense model is ≤ ``max_kl``), or
    None for the folder's default. With ``reselect=False`` the current selection is kept
    (multi-turn "first-turn" policy). ``progress(done, total)`` hears how many prompt tokens
    are prefilled (first with 0, before any work). ``kwargs`` go to mlx-lm (``sampler=``, ...).
    """
    from .calibrate import resolve
    from .selection import budget_units

    tokens = model.check_tokens(prompt_tokens(tokenizer, prompt))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise IFPError(f"max_tokens must be a whole number ≥ 1, not {max_tokens!r}")
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    limit = context_length(model)
    used = cache[0].offset if cache and hasattr(cache[0], "offset") else 0
    if limit and used + len(tokens) >= limit:
        raise IFPError(f"prompt is {used + len(tokens)} tokens, the model's context is {limit}")
    choice = resolve(model, keep, predictor, max_kl)
    budget_units(choice.keep, model.ffn_units)  # validate early

    if progress is not None:
        progress(0, len(tokens))
    stats = IFPStats(prompt_tokens=len(tokens), store=model.ffn_store)
    read0, calls0 = model.ffn_io
    mx.reset_peak_memory()
    tic = time.perf_counter()
    rest = tokens
    if is_dense(choice.keep):
        model.dense()
    elif reselect or model.selection is None:
        with prefill_progress(progress and (lambda done, _: progress(done, len(tokens)))):
            sel: Selection = model.select(tokens, keep, predictor, cache=cache, max_kl=max_kl)
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
    try:
        for resp in _mlx_stream_generate(
            model, tokenizer, rest, max_tokens=max_tokens, prompt_cache=cache, **kwargs
        ):
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
