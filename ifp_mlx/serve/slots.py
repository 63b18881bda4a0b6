"""The server's conversations: an LRU of prompt caches, each with the selection it answered with.

A local server talks to several conversations at once (two chat windows, an app and a notebook).
With one cache, each turn of one conversation would throw the other's KV cache and selected
units away; here each keeps its own. A request that resends a conversation plus a new message
continues it: only the new tokens are fed and, under ``policy: "first-turn"``, its units are
materialized again from its stored selection (no predictor run, no dense prefill). The least
recently used conversation goes first when there are more than ``size`` of them or their KV
caches hold more than ``max_bytes`` (the one in use always stays).
"""

from dataclasses import dataclass
from typing import List, Optional

from mlx_lm.utils import common_prefix_len

from ..chat import PromptCache


@dataclass
class Slot:
    cache: PromptCache
    prompt: int = 0  # the last request's prompt length in tokens (0: nothing answered yet)
    settings: Optional[dict] = None  # its keep / predictor
    selection: Optional[object] = None  # the units it was answered with (None: dense)
    busy: bool = False  # an answer is being written into it (batched: never shared)

    @property
    def nbytes(self) -> int:
        return sum(getattr(c, "nbytes", 0) for c in self.cache.cache)


class Slots:
    def __init__(self, model, size: int = 8, max_bytes: int = 1 << 30):
        self.model, self.size, self.max_bytes = model, size, max_bytes
        self.slots: List[Slot] = []

    def take(self, full: List[int]) -> Slot:
        """The conversation ``full`` continues (its whole last prompt is a prefix of ``full``;
        the longest such wins), or a new one; either is now the most recently used."""
        best, longest = None, 0
        for slot in self.slots:
            if slot.busy:  # the same conversation sent twice at once: the second starts anew
                continue
            n = common_prefix_len(slot.cache.tokens, full)
            if slot.prompt and n >= slot.prompt and n > longest:
                best, longest = slot, n
        if best is None:
            best = Slot(PromptCache(self.model))
        else:
            self.slots.remove(best)
        self.slots.insert(0, best)
        self.trim()
        best.busy = True
        return best

    def trim(self) -> None:
        while len(self.slots) > max(self.size, 1) or (
            len(self.slots) > 1 and sum(s.nbytes for s in self.slots) > self.max_bytes
        ):
            self.slots.pop()
