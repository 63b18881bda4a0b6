"""Constrained decoding: a sampler that draws only tokens a grammar allows (llguidance).

Structured output (``response_format`` JSON / JSON schema, a forced tool call) must parse every
time, not usually: at each step the grammar's matcher gives the set of tokens that keep the
text inside the grammar, every other token's log-probability becomes -inf, and the request's
own sampler (greedy, temperature, top-p, ...) draws from what is left. Once the grammar is
complete only the end-of-sequence token remains. llguidance computes the masks (Rust, about
a millisecond a token here); applying it is an ``mx.where`` on any backend.

The sampler runs inside mlx-lm's generate loop (``sampler=``), so it works with every path of
``stream_generate`` (dense head, rescoring): each call draws exactly one answer token.
"""

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import IFPError

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict = {}  # llguidance's view of a tokenizer (≈ 1-2 s to build): one per tokenizer


def _ll_tokenizer(tokenizer, vocab_size: int):
    import llguidance.hf

    key = (id(tokenizer), vocab_size)
    if key not in _TOKENIZERS:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        try:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(hf, vocab_size, eos))
        except ValueError as e:
            raise IFPError(f"structured output needs a fast (Rust) tokenizer: {e}")
    return _TOKENIZERS[key][1]


def json_grammar(schema: Optional[dict] = None) -> str:
    """The grammar of JSON text following ``schema`` (None: any JSON object)."""
    from llguidance import LLMatcher

    schema = schema if schema is not None else {"type": "object"}
    try:  # one-line JSON: with free whitespace a small model pads an answer with newlines
        # until max_tokens instead of closing it (SmolLM2 did, on 4 of 4 questions)
        return LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    except (ValueError, TypeError) as e:
        raise IFPError(f"the JSON schema cannot be used: {str(e).splitlines()[0][:200]}")


class Constrained:
    """``sampler(logprobs) -> token`` that keeps the answer inside ``grammar``."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str, sampler: Callable):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar)
        if self.matcher.is_error():
            raise IFPError(f"the grammar cannot be used: {self.matcher.get_error()[:200]}")
        self.sampler, self.vocab = sampler, vocab_size
        self.bitmask = allocate_token_bitmask(1, vocab_size)
        self.eos = sorted(getattr(tokenizer, "eos_token_ids", []))
        self.count = 0  # tokens the matcher has consumed

    def allowed(self) -> np.ndarray:
        """Which tokens may come next (a bool per vocabulary entry)."""
        from llguidance.numpy import fill_next_token_bitmask

        if self.matcher.is_stopped():  # complete: only the end
            out = np.zeros(self.vocab, bool)
            out[self.eos] = True
            return out
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab].astype(bool)

    def __call__(self, logprobs: mx.array) -> mx.array:
        mask = mx.array(self.allowed())
        token = self.sampler(mx.where(mask, logprobs, -float("inf")))
        chosen = int(token.reshape(-1)[0].item())
        if not self.matcher.is_stopped():
            if not self.matcher.consume_token(chosen):
                raise IFPError(f"constrained decoding went off its grammar: {self.matcher.get_error()[:200]}")  # fmt: skip
            self.count += 1
        return token

    def rewind(self, emitted: int) -> None:
        """Forget tokens drawn past the ``emitted`` ones: mlx-lm draws one token ahead, and a
        generate loop that stops there (to reselect units) throws that token away."""
        if self.count > emitted:
            self.matcher.rollback(self.count - emitted)
            self.count = emitted

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()
