"""The predictor interface, the scores it returns and the registry (what ``activation`` and
``learned`` build on; the package's ``__init__`` only gathers them)."""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol

import mlx.core as mx
import mlx.nn as nn

from ..errors import IFPError


@dataclass
class Compensation:
    """What the dense FFNs did over the prompt, per layer: each unit's mean activation and the
    layer's mean output. The dropped units' mean contribution (their share of the output) is
    folded into the compact down projection's bias: free at decode."""

    unit_means: List[mx.array]  # (units,) mean of act(gate)·up over the prompt tokens
    output_means: List[mx.array]  # (hidden,) mean of the dense FFN output


@dataclass
class Scores:
    scores: List[mx.array]  # one (units,) array per FFN layer
    prefilled: int = 0  # prompt tokens already written to the cache (densely)
    compensation: Optional[Compensation] = None  # set by predictors that ran the dense FFNs


class Predictor(Protocol):
    name: str

    def score(self, model: nn.Module, tokens: List[int], cache: Optional[list]) -> Scores: ...


# Who hears a predictor's prefill progress (done, total tokens): long prompts take minutes
# on a CPU, and a dense scoring pass is most of that. Set by ``stream_generate``.
_PROGRESS: ContextVar[Optional[Callable[[int, int], None]]] = ContextVar("ifp_prefill_progress", default=None)  # fmt: skip


@contextmanager
def prefill_progress(callback: Optional[Callable[[int, int], None]]):
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report_prefill(done: int, total: int) -> None:
    callback = _PROGRESS.get()
    if callback is not None:
        callback(done, total)


_REGISTRY: Dict[str, type] = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def get_predictor(predictor) -> "Predictor":
    """A predictor instance from a name or an object with ``score``."""
    if hasattr(predictor, "score"):
        return predictor
    if predictor not in _REGISTRY:
        raise IFPError(f"unknown predictor {predictor!r} (have: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[predictor]()


def available() -> List[str]:
    return sorted(_REGISTRY)
