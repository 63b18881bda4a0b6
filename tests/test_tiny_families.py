"""Converted tiny random llama / qwen2 / gemma3_text models compute what transformers does."""

import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from tests.helpers import make_tiny_hf, mlx_greedy, mlx_logits, torch_greedy, torch_logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_tiny_family_parity(family, tmp_path):
    src = make_tiny_hf(family, tmp_path / "hf")
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
