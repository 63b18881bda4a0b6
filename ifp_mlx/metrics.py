"""Quality metrics shared by benchmarks and evaluation."""

from typing import List

import mlx.core as mx
import mlx.nn as nn


def text_loss(model: nn.Module, tokens: List[int], window: int = 512) -> float:
    """Mean next-token NLL (nats) over non-overlapping windows of ``tokens``."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = mx.array(tokens[start : start + window + 1])
        if chunk.size < 2:
            break
        logits = model(chunk[None, :-1])[0].astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, chunk[1:], reduction="sum")
        total += nll.item()
        count += chunk.size - 1
    if count == 0:
        raise ValueError("text_loss needs at least 2 tokens")
    return total / count
