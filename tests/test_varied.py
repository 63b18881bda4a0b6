"""Configurations other than the one each feature was built with: FFN layers of different
sizes, biases on gate/up/down, a learned predictor on the flash store, a folder's ``compensate``
and ``protect`` together, budgets that do not divide evenly. The references are independent of
the code under test: the dense model with the dropped units masked out, hand-computed counts,
the dense model's own logits."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.budget import budget_units
from ifp_mlx.convert import convert
from ifp_mlx.predictors.learned import PredictorConfig, PredictorHead, save
from tests.helpers import make_tiny_hf, make_tiny_nas, masked_logits

TOKENS = [5, 17, 40, 9, 33, 70, 12, 88, 41, 6, 23, 54]


def logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))


def masked(model, keeps, tokens=TOKENS) -> np.ndarray:
    """The dense model with every unit not in ``keeps[l]`` switched off (activation × 0)."""
    return masked_logits(model, keeps, tokens)


def _edit_config(folder, **ifp):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["ifp"].update(ifp)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """Tiny llama with random biases on gate/up/down (96 units a layer), float32."""
    root = tmp_path_factory.mktemp("varied")
    src = make_tiny_hf("llama", root / "hf", seed=21, mlp_bias=True)
    convert(src, root / "even", progress=False)
    return root


@pytest.fixture(scope="module", params=["float32", "q8g32"])
def uneven(request, tmp_path_factory):
    """A tiny nemotron-nas model: FFN layers of 256 and 512 units, biases on gate/up/down."""
    root = tmp_path_factory.mktemp("uneven")
    src = make_tiny_nas(root / "hf", seed=22)
    q = request.param == "q8g32"
    convert(src, root / "m", quantize=q, q_bits=8, q_group_size=32, progress=False)
    return root / "m"


def test_uneven_layers_slice_like_the_masked_dense_model(uneven):
    reference, _ = ifp_mlx.load(uneven)
    for store in ("memory", "flash"):
        model, _ = ifp_mlx.load(uneven, ffn_store=store)
        assert model.ffn_units == [256, 512]
        assert np.array_equal(logits(model), logits(reference))
        # layer 1 keeps as many units as layer 0 has: it must still be sliced, not kept whole
        sel = model.select(TOKENS, keep=0.5, predictor="activation")
        assert sel.kept == [128, 256] and sel.units == [256, 512]
        assert np.allclose(logits(model), masked(reference, sel.indices), atol=1e-4), store
        sel = model.select(TOKENS, keep=[1.0, 0.25], predictor="activation")
        assert sel.kept == [256, 128]
        assert np.allclose(logits(model), masked(reference, sel.indices), atol=1e-4), store


def test_budgets_round_to_the_nearest_unit_and_block():
    assert budget_units(0.6, [96, 45]) == [58, 27]  # 57.6 → 58, 27.0
    assert budget_units([0.01, 1.0], [96, 45]) == [1, 45]  # at least one unit
    assert budget_units(0.5, [96, 45], block=32) == [64, 32]  # 1.5 → 2 blocks, 0.7 → 1
    assert budget_units(1.0, [50], block=32) == [50]  # 2 blocks would pass the layer's 50
    assert budget_units(0.97, [50], block=32) == [50]  # 1.52 → 2 blocks, capped
    assert budget_units(0.9, [50], block=32) == [32]  # 1.41 → 1 block


@pytest.mark.parametrize("store", ["memory", "flash"])
def test_compensation_with_biases_reproduces_the_dense_output_it_folded(biased, store):
    """Compensation folds, per layer, dense output − compact output (both with down_proj's
    bias) of the prompt's mean activations into a bias. With a one-token prompt that mean is
    the token's own activation, so the compensated model's logits there are the dense ones."""
    from ifp_mlx.predictors.activation import ActivationPredictor

    model, _ = ifp_mlx.load(biased / "even", ffn_store=store)
    model.dense()
    token = [TOKENS[0]]
    dense = logits(model, token)
    model.select(token, keep=0.3, predictor=ActivationPredictor(compensate=True))
    folded = np.abs(logits(model, token) - dense).max()
    model.select(token, keep=0.3, predictor="activation")  # without: not the dense output
    plain = np.abs(logits(model, token) - dense).max()
    assert folded <= 1e-5 and plain >= 1e-3, (folded, plain)


def test_a_folders_compensate_and_protect_together_then_dense(biased, tmp_path):
    """``ifp.compensate`` + ``ifp.protect`` [1, 0]: the default selection is compensated,
    the protected layer is kept whole and untouched, and ``dense()`` is the dense model bit for
    bit afterwards (a whole layer is the resident module itself: folding into it would change
    the dense model)."""
    folder = tmp_path / "m"
    shutil.copytree(biased / "even", folder)
    _edit_config(folder, compensate=True, protect=[1, 0])
    model, _ = ifp_mlx.load(folder)
    model.dense()
    dense = logits(model)
    sel = model.select(TOKENS, keep=0.75)
    assert sel.compensated and sel.kept == [96, 48]  # layer 0 whole, layer 1: 2×0.75 − 1
    assert not np.allclose(logits(model), dense, atol=1e-3)
    model.dense()
    assert np.array_equal(logits(model), dense)
    plain, _ = ifp_mlx.load(biased / "even")
    assert not plain.select(TOKENS, keep=0.75).compensated  # the folder's setting, not a default


@pytest.fixture(scope="module")
def learned(biased):
    """The biased folder with a random learned head (1 encoder layer: resident on flash)."""
    folder = biased / "learned"
    if not folder.exists():
        shutil.copytree(biased / "even", folder)
        mx.random.seed(8)
        head = PredictorHead(PredictorConfig([96, 96], 64, 1, 16))
        _edit_config(folder, predictor=save(head, folder))
    return folder


def test_learned_predictor_prunes_its_encoder_layers_on_flash_too(learned):
    """The flash store keeps the encoder's layers resident for the predictor; a selection
    still prunes them, exactly as the memory store does."""
    memory, _ = ifp_mlx.load(learned)
    flash, _ = ifp_mlx.load(learned, ffn_store="flash")
    a = memory.select(TOKENS, keep=0.4, predictor="learned")
    b = flash.select(TOKENS, keep=0.4, predictor="learned")
    assert a.kept == b.kept == [38, 38]
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert np.array_equal(logits(flash), logits(memory))
    assert np.allclose(logits(memory), masked(memory, a.indices), atol=1e-4)


def test_a_selections_mask_marks_its_kept_units_layer_by_layer(uneven):
    model, _ = ifp_mlx.load(uneven)
    sel = model.select(TOKENS, keep=[0.3, 0.6], predictor="activation")
    mask = sel.mask()
    assert mask.shape == (256 + 512,) and mask.sum() == sum(sel.kept) == 77 + 307
    assert np.array_equal(np.flatnonzero(mask[:256]), sel.indices[0])
    assert np.array_equal(np.flatnonzero(mask[256:]), sel.indices[1])


@pytest.mark.parametrize("bits", [3, 6])
def test_other_bit_widths_convert_load_and_slice(biased, bits, tmp_path):
    """MLX packs 2-8 bits; a unit is still one row of each projection, whatever the width."""
    from ifp_mlx.model import dequantize

    convert(biased / "hf", tmp_path / "q", quantize=True, q_bits=bits, q_group_size=32,
            progress=False)  # fmt: skip
    memory, _ = ifp_mlx.load(tmp_path / "q")
    flash, _ = ifp_mlx.load(tmp_path / "q", ffn_store="flash")
    assert memory._ifp_config["quantization"]["bits"] == bits
    floats = dequantize(ifp_mlx.load(tmp_path / "q")[0])
    assert np.allclose(logits(memory), logits(floats), atol=1e-4)
    a = memory.select(TOKENS, keep=0.5, predictor="activation")
    b = flash.select(TOKENS, keep=0.5, predictor="activation")
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert np.array_equal(logits(flash), logits(memory))
    assert np.allclose(logits(memory), masked(floats, a.indices), atol=1e-4)
