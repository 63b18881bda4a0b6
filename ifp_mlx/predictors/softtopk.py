"""SoftTopK: a differentiable top-k mask per layer (entropy-regularized, dual solve).

``max_m <s, m> + τ·H(m)  s.t.  Σ m = k, 0 ≤ m ≤ 1`` (H the binary entropy) has the solution
``m_i = σ((s_i − t) / τ)`` where the dual variable t makes the mask sum to k. t is found by a
few bisection iterations without gradient, then one Newton step that *is* differentiated:
its gradient is the implicit-function gradient of t, so the mask's gradient is exact at the
solution and its sum stays k. As τ → 0 the mask tends to the hard top-k.
"""

import mlx.core as mx

ITERATIONS = 40


def soft_topk(scores: mx.array, k: float, tau: float) -> mx.array:
    """Soft mask over the last axis of ``scores`` summing to ``k`` (any leading batch axes)."""
    s = scores.astype(mx.float32)
    n = s.shape[-1]
    if k >= n:
        return mx.ones_like(s)
    sg = mx.stop_gradient(s)
    lo = sg.min(-1, keepdims=True) - 30 * tau
    hi = sg.max(-1, keepdims=True) + 30 * tau
    for _ in range(ITERATIONS):  # Σ σ((s − t)/τ) falls as t rises
        mid = (lo + hi) / 2
        too_many = mx.sigmoid((sg - mid) / tau).sum(-1, keepdims=True) > k
        lo = mx.where(too_many, mid, lo)
        hi = mx.where(too_many, hi, mid)
    t = mx.stop_gradient((lo + hi) / 2)
    m = mx.sigmoid((s - t) / tau)
    slope = (m * (1 - m)).sum(-1, keepdims=True) / tau + 1e-12
    t = t + (m.sum(-1, keepdims=True) - k) / slope  # differentiable Newton step: dt/ds
    return mx.sigmoid((s - t) / tau)


def hard_topk(scores: mx.array, k: int) -> mx.array:
    """0/1 mask of the k largest entries along the last axis."""
    n = scores.shape[-1]
    kth = mx.sort(scores, axis=-1)[..., n - k : n - k + 1] if k > 0 else mx.inf
    return (scores >= kth).astype(mx.float32)


def straight_through(scores: mx.array, k: int, tau: float) -> mx.array:
    """Hard top-k forward (what inference runs), SoftTopK gradient backward."""
    soft = soft_topk(scores, k, tau)
    return mx.stop_gradient(hard_topk(scores, k) - soft) + soft
