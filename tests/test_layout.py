"""Unit-major FFN layout: lossless row slicing (float and quantized) and output-preserving permutation."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.model import QuantizedUnitLinear, UnitLinear, dequantize, find_ffns
from tests.helpers import make_tiny_hf, mlx_logits, read_config


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (4, 64), (5, 32),
                                             (6, 128), (8, 64), (8, 128)])  # fmt: skip
def test_quantized_unit_slice_equals_dequantized_slice(bits, group_size):
    mx.random.seed(0)
    units, hidden = 48, 256
    dense = nn.Linear(units, hidden)  # standard down_proj: (hidden, units)
    down = UnitLinear.from_linear(dense).to_quantized(group_size, bits)
    gate = nn.Linear(hidden, units).to_quantized(group_size=group_size, bits=bits)
    idx = mx.array([0, 3, 7, 8, 20, 47])
    for layer in (down, gate):
        full = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size, bits)
        part = mx.dequantize(
            layer.weight[idx], layer.scales[idx], layer.biases[idx], group_size, bits
        )
        assert mx.array_equal(part, full[idx]).item()


def test_quantized_unit_linear_computes_dequantized_product():
    mx.random.seed(1)
    layer = UnitLinear.from_linear(nn.Linear(64, 128, bias=True)).to_quantized(64, 4)
    assert isinstance(layer, QuantizedUnitLinear)
    x = mx.random.normal((3, 64))
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
    assert mx.allclose(layer(x), x @ w + layer.bias, atol=1e-5).item()


def test_float_unit_linear_equals_linear():
    mx.random.seed(2)
    lin = nn.Linear(96, 64, bias=True)
    x = mx.random.normal((5, 96))
    assert mx.allclose(UnitLinear.from_linear(lin)(x), lin(x), atol=1e-5).item()


def test_quantized_folder_roundtrip(tmp_path):
    src = make_tiny_hf("llama", tmp_path / "hf")
    convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, progress=False)
    cfg = read_config(tmp_path / "q4")
    assert cfg["ifp"]["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert cfg["ifp"]["ffn_layout"] == "unit-major"
    model, _ = ifp_mlx.load(tmp_path / "q4")
    ffns = find_ffns(model)
    assert len(ffns) == 2 and all(isinstance(m.down_proj, QuantizedUnitLinear) for _, m in ffns)
    tokens = list(range(3, 40))
    q = mlx_logits(model, tokens)
    ref, _ = ifp_mlx.load(tmp_path / "q4")
    f = mlx_logits(dequantize(ref), tokens)  # the same weights, dequantized to float
    assert np.abs(q - f).max() <= 1e-4


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("llama", {"mlp_bias": True})],
                         ids=["qwen2", "llama-ffn-biases"])  # fmt: skip
def test_permute_units_keeps_outputs(tmp_path, family, extra):
    src = make_tiny_hf(family, tmp_path / "hf", seed=5, **extra)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 90 + 3}" for i in range(200)))
    convert(src, tmp_path / "plain", progress=False)
    convert(src, tmp_path / "perm", permute_units_text=calib, progress=False)
    assert read_config(tmp_path / "perm")["ifp"]["permuted_units"] is True
    a, _ = ifp_mlx.load(tmp_path / "plain")
    b, _ = ifp_mlx.load(tmp_path / "perm")
    ga = find_ffns(a)[0][1].gate_proj.weight
    gb = find_ffns(b)[0][1].gate_proj.weight
    assert not mx.array_equal(ga, gb).item()  # units really moved
    tokens = list(range(3, 60))
    assert np.abs(mlx_logits(a, tokens) - mlx_logits(b, tokens)).max() <= 1e-5
