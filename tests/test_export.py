"""``ifp-convert FOLDER --to-mlx-lm OUT``: mlx-lm loads and runs the export, and its logits are
our dense model's."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from tests.helpers import make_tiny_hf, mlx_logits

TOKENS = [5, 17, 40, 9, 33, 70, 12]


def _compare(folder, out, tokens, tol):
    from mlx_lm import load as mlx_load

    ours, _ = ifp_mlx.load(folder)
    theirs, _ = mlx_load(str(out))
    a = mlx_logits(ours, tokens)
    b = np.array(theirs(mx.array(tokens)[None])[0].astype(mx.float32))
    assert np.abs(a - b).max() <= tol * np.abs(a).max(), np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("quant", [None, (4, 32), (8, 64)])
def test_an_export_runs_under_mlx_lm_as_our_dense_model(tmp_path, quant):
    from ifp_mlx.convert.export import to_mlx_lm

    src = make_tiny_hf("llama", tmp_path / "hf", seed=12, mlp_bias=True)
    kw = dict(quantize=True, q_bits=quant[0], q_group_size=quant[1]) if quant else {}
    convert(src, tmp_path / "m", progress=False, **kw)
    to_mlx_lm(tmp_path / "m", tmp_path / "x")
    _compare(tmp_path / "m", tmp_path / "x", TOKENS, 1e-5)
    with pytest.raises(ifp_mlx.IFPError, match="exists \\(use --force"):
        to_mlx_lm(tmp_path / "m", tmp_path / "x")
    with pytest.raises(ifp_mlx.IFPError, match="not an ifp-mlx model folder"):
        to_mlx_lm(tmp_path / "hf", tmp_path / "y")


def test_the_bundled_model_exported_runs_under_mlx_lm_generate(smol_default, tmp_path):
    out = tmp_path / "smol-mlx"
    res = subprocess.run([sys.executable, "-m", "ifp_mlx.convert", str(smol_default),
                          "--to-mlx-lm", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    model, tok = ifp_mlx.load(smol_default)
    _compare(smol_default, out, tok.encode("The capital of France is"), 1e-4)
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(out),
                          "--prompt", "What is the capital of France?", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    want = ifp_mlx.generate(model, tok, "What is the capital of France?", keep=1.0, max_tokens=12)
    assert want.strip() and want.strip() in res.stdout
