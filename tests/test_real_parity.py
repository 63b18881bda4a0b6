"""The bundled SmolLM2-135M-Instruct, converted from real torch checkpoints, matches transformers."""

import mlx.core as mx
import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.generate import prompt_tokens
from tests.helpers import mlx_greedy, torch_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]


@pytest.fixture(scope="module")
def torch_model(smol_hf):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol_hf / "bin"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mlx_model(smol_f32):
    return ifp_mlx.load(smol_f32)


def test_logits_match_transformers(torch_model, mlx_model):
    import torch

    model, tok = mlx_model
    for prompt in PROMPTS:
        ids = prompt_tokens(tok, prompt)
        with torch.no_grad():
            ref = torch_model(torch.tensor([ids])).logits[0, -1].numpy()
        got = np.array(model(mx.array(ids)[None])[0, -1])
        assert np.abs(ref - got).max() <= 1e-3, prompt
        assert ref.argmax() == got.argmax(), prompt


def test_greedy_continuations_identical(torch_model, mlx_model):
    model, tok = mlx_model
    for prompt in PROMPTS:
        ids = prompt_tokens(tok, prompt)
        assert mlx_greedy(model, ids, 16) == torch_greedy(torch_model, ids, 16), prompt


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_input_formats_give_bit_identical_weights(smol_hf, smol_f32, tmp_path):
    ref = _weights(smol_f32)  # converted from pytorch_model.bin
    for kind in ("safetensors", "sharded", "sharded-bin"):
        out = tmp_path / kind
        convert(smol_hf / kind, out, progress=False)
        got = _weights(out)
        assert got.keys() == ref.keys()
        for k in ref:
            assert mx.array_equal(got[k], ref[k]).item(), (kind, k)


def test_gguf_matches_torch_folder_made_from_it(smol_gguf, smol_f32, tmp_path):
    convert(smol_gguf, tmp_path / "gguf", progress=False)
    ref, got = _weights(smol_f32), _weights(tmp_path / "gguf")
    assert got.keys() == ref.keys()
    worst = max(mx.abs(got[k] - ref[k]).max().item() for k in ref)
    assert worst <= 1e-5


def test_gguf_conversion_needs_no_torch(smol_gguf, smol_f32, tmp_path):
    """With torch made unimportable, GGUF still converts, to the same weights."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ifp_mlx.convert import convert\n"
        f"convert({str(smol_gguf)!r}, {str(tmp_path / 'nt')!r}, progress=False)\n"
        "assert sys.modules['torch'] is None\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ref, got = _weights(smol_f32), _weights(tmp_path / "nt")
    assert max(mx.abs(got[k] - ref[k]).max().item() for k in ref) <= 1e-5
