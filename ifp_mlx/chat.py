"""Multi-turn conversations with a KV cache kept across turns and a pruning policy.

Policies:
- ``first-turn`` (the paper): select from the first user message, keep that compact model for
  the whole conversation; later turns only prefill their new tokens.
- ``per-turn``: reselect on every new user message (the activation predictor scores the new
  turn's tokens during their dense prefill, on top of the cached conversation).
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import common_prefix_len

from .budget import Budget, budget_units, is_dense, resolve
from .errors import IFPError
from .generate import IFPResponse, prompt_tokens, stream_generate
from .predictors import get_predictor

POLICIES = ("first-turn", "per-turn")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise IFPError(f"unknown policy {policy!r} (have: {', '.join(POLICIES)})")
    return policy


class PromptCache:
    """A KV cache and the tokens it holds. A prompt that extends them (the next turn of a
    conversation, or an API request that resends it) feeds only what is new: the cache is
    trimmed back to the common prefix, or rebuilt when it cannot be trimmed (a rotated
    sliding-window cache)."""

    def __init__(self, model: nn.Module, max_kv_size: Optional[int] = None):
        self.model, self.max_kv_size = model, max_kv_size
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model, self.max_kv_size)
        self.tokens: List[int] = []

    @property
    def offset(self) -> int:
        return self.cache[0].offset if hasattr(self.cache[0], "offset") else 0

    def new_tokens(self, full: List[int]) -> List[int]:
        """Trim the cache back to what ``full`` shares with it; return what is left to feed."""
        n = common_prefix_len(self.tokens, full)
        n = min(n, len(full) - 1)  # always feed at least one token
        extra = self.offset - n
        if extra > 0:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, extra)
            else:
                self.cache, n = make_prompt_cache(self.model, self.max_kv_size), 0
        return full[n:]

    def commit(self, full: List[int], generated: List[int], started: bool) -> None:
        """After a generation (finished, stopped or failed): the tokens the cache now holds."""
        held = (full + generated) if started else self.tokens
        self.tokens = held[: self.offset]


@dataclass
class Conversation:
    model: nn.Module
    tokenizer: object
    keep: Budget = None  # a fraction, a per-layer list, "auto", None: the folder's default
    predictor: Optional[str] = None  # None: the model's default predictor
    policy: str = "first-turn"
    system: Optional[str] = None
    messages: List[dict] = field(default_factory=list)
    max_kl: Optional[float] = None  # quality target of keep="auto"
    max_kv_size: Optional[int] = None  # a rotating KV cache of this many tokens (None: all)

    def __post_init__(self):
        check_policy(self.policy)
        if self.predictor is None:
            self.predictor = self.model.default_predictor
        get_predictor(self.predictor)
        self.set_keep(self.keep, self.max_kl)
        self.reset()

    def set_keep(self, keep: Budget, max_kl: Optional[float] = None) -> None:
        """A new budget (or quality target), validated now, used from the next user message."""
        self.choice = resolve(self.model, keep, self.predictor, max_kl)
        budget_units(self.choice.keep, self.model.ffn_units)
        self.keep, self.max_kl = keep, max_kl
        self._selected = False

    def describe(self) -> str:
        """``keep 0.62 (auto for KL ≤ 0.5, expected KL 0.50)`` — the banner's budget part."""
        c = self.choice
        if c.mean is not None:
            keep = f"{c.mean:.2f}"
        else:  # a per-layer budget as given
            keep = f"per-layer budget (mean {sum(c.keep) / len(c.keep):.2f})"
        protect = self.model.__dict__.get("_ifp_config", {}).get("protect")
        if protect and isinstance(c.keep, list) and c.mean is not None:
            keep += f", first {protect[0]} + last {protect[1]} layers whole"
        notes = [f"auto for KL ≤ {c.max_kl:g}"] if c.max_kl is not None else []
        if c.expected_kl is not None and not is_dense(c.keep):
            notes.append(f"expected KL {c.expected_kl:.2f}")
        return f"keep {keep}" + (f" ({', '.join(notes)})" if notes else "")

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.prompt_cache = PromptCache(self.model, self.max_kv_size)
        self._selected = False
        self.model.release()

    @property
    def cache(self) -> list:
        return self.prompt_cache.cache

    @property
    def cache_tokens(self) -> List[int]:
        return self.prompt_cache.tokens

    def ask(self, text: str, max_tokens: int = 512, **kwargs) -> Iterator[IFPResponse]:
        """Stream the answer to a new user message; the answer is added to the conversation
        even if the caller stops early (Ctrl-C)."""
        if not text.strip():
            raise IFPError("empty message")
        messages = self.messages + [{"role": "user", "content": text}]
        full = prompt_tokens(self.tokenizer, messages)
        new = self.prompt_cache.new_tokens(full)
        reselect = not is_dense(self.choice.keep) and (
            self.policy == "per-turn" or not self._selected
        )
        answer, generated, started = "", [], False
        stream = stream_generate(
            self.model,
            self.tokenizer,
            new,
            keep=self.keep,
            predictor=self.predictor,
            max_kl=self.max_kl,
            max_tokens=max_tokens,
            prompt_cache=self.cache,
            reselect=reselect,
            **kwargs,
        )
        try:
            for resp in stream:
                if not started:  # the turn is part of the conversation from here on
                    started, self.messages = True, messages
                    self._selected = self._selected or reselect
                answer += resp.text
                generated.append(resp.token)
                yield resp
        finally:
            stream.close()  # the model is free for the next turn at once
            if started:
                self.messages.append({"role": "assistant", "content": answer})
            self.prompt_cache.commit(full, generated, started)
