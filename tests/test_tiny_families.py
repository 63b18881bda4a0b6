"""Converted tiny random llama / qwen2 / gemma3_text models compute what transformers does."""

import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from tests.helpers import make_tiny_hf, mlx_greedy, mlx_logits, torch_greedy, torch_logits


@pytest.mark.parametrize(
    "family,config",
    [("llama", {}), ("qwen2", {}), ("gemma3_text", {}), ("gemma3_text", {"hidden_size": 40})],
    ids=["llama", "qwen2", "gemma3", "gemma3-hidden40"],
)
def test_tiny_family_parity(family, config, tmp_path):
    """hidden 40: √40 is not a bfloat16 number, so Gemma's embedding scale must be computed in
    the weights' dtype as transformers does (mlx-lm rounds it to bfloat16)."""
    src = make_tiny_hf(family, tmp_path / "hf", **config)
    out = tmp_path / "mlx"
    convert(src, out, progress=False)
    model, tok = ifp_mlx.load(out)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 96, size=24).tolist()
    ref = torch_logits(src, tokens)
    got = mlx_logits(model, tokens)
    assert np.abs(ref - got).max() <= 1e-4
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_tiny_greedy_continuation_matches_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_hf("qwen2", tmp_path / "hf", seed=3)
    convert(src, tmp_path / "mlx", progress=False)
    model, _ = ifp_mlx.load(tmp_path / "mlx")
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    prompt = [5, 17, 40, 9, 33, 70]
    assert mlx_greedy(model, prompt, 12) == torch_greedy(ref, prompt, 12)


def _parity(src, out, tokens, source=None, atol=1e-4):
    """Convert ``source`` (default: ``src``); its logits must be transformers' on ``src``."""
    convert(source or src, out, progress=False)
    model, _ = ifp_mlx.load(out)
    ref, got = torch_logits(src, tokens), mlx_logits(model, tokens)
    assert np.abs(ref - got).max() <= atol
    return model


@pytest.mark.parametrize(
    "family,arch", [("llama", "llama"), ("qwen2", "qwen2"), ("gemma3_text", "gemma3")]
)
def test_gguf_end_to_end(family, arch, tmp_path):
    """A GGUF written as llama.cpp writes one (q/k interleave, Gemma's 1 + w norms, no
    query_pre_attn_scalar) converts to the model transformers computes from the source."""
    from tests.fixtures.tiny_gguf import write_gguf

    src = make_tiny_hf(family, tmp_path / "hf", seed=1)
    gguf = write_gguf(src, arch, tmp_path / "m.gguf")
    tokens = np.random.default_rng(2).integers(3, 96, size=24).tolist()
    model = _parity(src, tmp_path / "mlx", tokens, source=gguf)
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    assert mlx_greedy(model, tokens[:6], 10) == torch_greedy(ref, tokens[:6], 10)


ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_scaling_is_carried_over(kind, tmp_path):
    """Scaled RoPE (transformers 5's rope_parameters) reaches mlx-lm: logits match at
    positions far past the original context, where scaling changes every rotation."""
    family = "qwen2" if kind == "yarn" else "llama"
    rope = {**ROPE[kind], "rope_theta": 10000.0}
    peaked = dict(seed=6, initializer_range=0.1)  # attention that depends on position
    src = make_tiny_hf(family, tmp_path / "hf", rope_parameters=rope, **peaked)
    tokens = np.random.default_rng(3).integers(3, 96, size=160).tolist()
    _parity(src, tmp_path / "mlx", tokens)
    plain = {"rope_type": "default", "rope_theta": 10000.0}  # what a dropped mapping gives
    unscaled = make_tiny_hf(family, tmp_path / "plain", rope_parameters=plain, **peaked)
    assert np.abs(torch_logits(src, tokens) - torch_logits(unscaled, tokens)).max() > 1e-2
