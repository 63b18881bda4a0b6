"""Per-prompt selection and materialization on tiny random models (float and 4-bit)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.budget import budget_units
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError
from ifp_mlx.model import UnitLinear, dequantize, find_ffns, tap_ffns
from ifp_mlx.predictors.activation import ActivationPredictor
from ifp_mlx.selection import Selection, top_units
from tests.helpers import griffin_scores, make_tiny_hf, torch_unit_activations

TOKENS = [5, 17, 40, 9, 33, 70, 12, 88, 41, 6, 23, 54]


@pytest.fixture(scope="module", params=["float32", "q4", "q4-down8"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    src = make_tiny_hf("llama", root / "hf", seed=7)
    q = request.param != "float32"
    down = 8 if request.param == "q4-down8" else None
    convert(
        src, root / "m", quantize=q, q_bits=4, q_group_size=32, q_down_bits=down, progress=False
    )
    model, tok = ifp_mlx.load(root / "m")
    if down:  # 8-bit down projections beside 4-bit gate/up, in the unit file and the model
        mlp = find_ffns(model)[0][1]
        assert (mlp.gate_proj.bits, mlp.down_proj.bits) == (4, 8)
    return model, tok


def logits(model, tokens=TOKENS):
    return model(mx.array(tokens)[None])[0]


def masks_for(sel: Selection):
    out = []
    for idx, n in zip(sel.indices, sel.units):
        m = np.zeros(n, np.float32)
        m[idx] = 1.0
        out.append(mx.array(m))
    return out


def masked_logits(model, sel: Selection) -> mx.array:
    """The dense model with the dropped units' activations zeroed (leaves the model dense)."""
    model.dense()
    with tap_ffns(model, record=False, masks=masks_for(sel)):
        return logits(model)


def test_keep_one_is_dense_bit_for_bit(tiny):
    model, _ = tiny
    model.dense()
    dense = logits(model)
    sel = model.select(TOKENS, keep=1.0)
    assert sel.keep == 1.0
    assert mx.array_equal(logits(model), dense).item()
    model.select(TOKENS, keep=0.5)
    model.dense()
    assert mx.array_equal(logits(model), dense).item()


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25])
def test_sliced_equals_masked_dense(tiny, keep):
    model, _ = tiny
    sel = model.select(TOKENS, keep=keep)
    assert not sel.compensated
    sliced = logits(model)
    masked = masked_logits(model, sel)
    assert mx.abs(sliced - masked).max().item() <= 1e-4
    assert not mx.allclose(masked, logits(model), atol=1e-3).item()  # pruning did something


def test_compensation_bias_is_the_dropped_units_mean_output(tiny):
    """bias_l = mean over the prompt (all but its last token: the scoring prefill) of
    Σ_dropped h_i · down_i, computed here from a plain dense pass with taps."""
    model, _ = tiny
    model.dense()
    dense = logits(model)
    with tap_ffns(model) as records:
        model(mx.array(TOKENS[:-1])[None])
    downs = [full_down(m.down_proj) for _, m in find_ffns(model)]
    sel = model.select(TOKENS, keep=0.5, predictor=ActivationPredictor(compensate=True))
    assert sel.compensated
    compensated = logits(model)
    for i, mlp in enumerate(model._ifp_mlps):
        h = records[i][0][0].astype(mx.float32)  # (T, units)
        drop = mx.array(np.setdiff1d(np.arange(sel.units[i]), sel.indices[i]))
        want = h[:, drop].mean(0) @ downs[i][drop]
        assert mx.allclose(mlp.down_proj.bias, want, atol=1e-4 * (1 + mx.abs(want).max().item()))
    plain = model.select(TOKENS, keep=0.5)  # off by default
    assert not mx.allclose(logits(model), compensated, atol=1e-4).item()
    assert all("bias" not in m.down_proj for m in model._ifp_mlps) and not plain.compensated
    model.dense()
    assert mx.array_equal(logits(model), dense).item()  # the resident units never changed


def full_down(down) -> mx.array:
    """A full unit-major down projection's weights (dequantized)."""
    return (down.dequantized() if hasattr(down, "dequantized") else down).weight


def test_selection_is_deterministic(tiny):
    model, _ = tiny
    a = model.select(TOKENS, keep=0.5)
    b = model.select(TOKENS, keep=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    c = model.select(TOKENS[::-1], keep=0.5)  # another prompt, another selection
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices))


def test_per_layer_budget_honoured_exactly(tiny):
    model, _ = tiny
    units = model.ffn_units
    sel = model.select(TOKENS, keep=[0.25, 0.75])
    assert sel.kept == [round(0.25 * units[0]), round(0.75 * units[1])]
    for idx in sel.indices:
        assert np.all(np.diff(idx) > 0)
    assert model.layers[0].mlp.gate_proj.weight.shape[0] == sel.kept[0]
    assert model.layers[1].mlp.down_proj.weight.shape[0] == sel.kept[1]
    model.dense()


def test_cache_reuse_matches_plain_prefill(tiny):
    """The activation predictor's dense prefill fills the cache; decoding continues from it."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = tiny
    cache = make_prompt_cache(model)
    sel = model.select(TOKENS, keep=0.5, cache=cache)
    assert sel.prefilled == len(TOKENS) - 1 and cache[0].offset == len(TOKENS) - 1
    step = model(mx.array(TOKENS[-1:])[None], cache=cache)[0, -1]
    # reference: dense prefill of the same tokens, then the pruned model for the last one
    model.dense()
    ref_cache = make_prompt_cache(model)
    model(mx.array(TOKENS[:-1])[None], cache=ref_cache)
    model.apply_selection(sel)
    ref = model(mx.array(TOKENS[-1:])[None], cache=ref_cache)[0, -1]
    assert mx.array_equal(step, ref).item()
    model.dense()


def test_budgets_and_bad_input():
    assert budget_units(0.5, [96, 96]) == [48, 48]
    assert budget_units(0.001, [96]) == [1]
    assert budget_units(0.5, [96], block=16) == [48]
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(IFPError, match="keep"):
            budget_units(bad, [96])
    with pytest.raises(IFPError, match="per-layer budget has 3"):
        budget_units([0.5, 0.5, 0.5], [96, 96])
    idx = top_units(mx.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.3]), 3)
    assert idx.tolist() == [1, 2, 3]
    blocks = top_units(mx.array([0.1, 0.2, 0.9, 0.9, 0.0, 0.0]), 2, block=2)
    assert blocks.tolist() == [2, 3]


def test_unknown_predictor_and_empty_prompt(tiny):
    model, _ = tiny
    with pytest.raises(IFPError, match="unknown predictor 'nope'"):
        model.select(TOKENS, keep=0.5, predictor="nope")
    with pytest.raises(IFPError, match="empty prompt"):
        model.select([], keep=0.5)


def test_generate_api_and_stats(tiny):
    model, tok = tiny
    text = ifp_mlx.generate(model, tok, "w5 w6 w7", keep=0.5, max_tokens=6)
    assert isinstance(text, str)
    last = None
    for last in ifp_mlx.stream_generate(model, tok, "w5 w6 w7", keep=0.5, max_tokens=6):
        pass
    assert last.ifp.keep == pytest.approx(0.5, abs=0.02)
    assert last.ifp.predictor == "activation" and last.ifp.generation_tokens == 6
    assert last.ifp.materialize_ms > 0 and "kept 50%" in last.ifp.line()
    with pytest.raises(IFPError, match="empty prompt"):
        ifp_mlx.generate(model, tok, "   ")
    with pytest.raises(IFPError, match="context"):
        ifp_mlx.generate(model, tok, list(range(3, 90)) * 3)


def test_one_token_prompt_leaves_cache_empty(tiny):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = tiny
    cache = make_prompt_cache(model)
    sel = model.select([7], keep=0.5, cache=cache)
    assert sel.prefilled == 0 and cache[0].offset == 0
    model.dense()


def test_dequantize_after_a_selection_really_swaps_in_float_layers(tmp_path):
    src = make_tiny_hf("llama", tmp_path / "hf", seed=7)
    convert(src, tmp_path / "m", quantize=True, q_bits=4, q_group_size=32, progress=False)
    model, _ = ifp_mlx.load(tmp_path / "m")
    model.select(TOKENS, keep=0.5)
    dequantize(model)
    model.dense()
    model.select(TOKENS, keep=0.5)
    mlp = find_ffns(model)[0][1]
    assert all(
        isinstance(p, (nn.Linear, UnitLinear)) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    )


@pytest.mark.parametrize("bad", [[10**9], [-1], [96], [5, 2**40], ["w5"], [True]])
def test_token_ids_outside_the_vocabulary_are_refused(tiny, bad):
    """Ids past the embedding table would read out of bounds (garbage or a segfault)."""
    model, tok = tiny
    with pytest.raises(IFPError, match="not in this model's vocabulary"):
        model.select(bad, keep=0.5)
    with pytest.raises(IFPError, match="not in this model's vocabulary"):
        ifp_mlx.generate(model, tok, bad, keep=1.0, max_tokens=2)
    assert model.check_tokens([0, 95, np.int64(7)]) == [0, 95, 7]


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    root = tmp_path_factory.mktemp("griffin")
    src = make_tiny_hf("llama", root / "hf", seed=3)
    convert(src, root / "m", progress=False)
    return src, root / "m"


@pytest.mark.parametrize("n", [12, 600])
def test_activation_scores_are_griffins_over_the_prompt(tiny_f32, n):
    """Scores == GRIFFIN computed in numpy from transformers' activations over the prompt but
    its last token, also past the 512-token prefill chunk, with and without a cache."""
    from mlx_lm.models.cache import make_prompt_cache

    src, folder = tiny_f32
    tokens = [int(t) for t in np.random.default_rng(n).integers(3, 96, n)]
    want = [griffin_scores(a) for a in torch_unit_activations(src, tokens[:-1])]
    model, _ = ifp_mlx.load(folder)
    for cache in (None, make_prompt_cache(model)):
        res = ActivationPredictor().score(model, tokens, cache)
        assert res.prefilled == (0 if cache is None else n - 1)
        for got, ref in zip(res.scores, want):
            np.testing.assert_allclose(np.array(got), ref, rtol=2e-3, atol=1e-4)
    sel = model.select(tokens, keep=0.25)  # the units kept are GRIFFIN's top quarter
    for idx, ref in zip(sel.indices, want):
        assert set(idx) == set(np.argsort(-ref)[: len(idx)])


def test_top_units_and_blocks():
    """The k highest scores, ascending indices, ties by index; blocks of units by block sum."""
    s = mx.array([0.1, 0.9, 0.3, 0.9, 0.5, 0.0, 0.7, 0.2])
    assert top_units(s, 3).tolist() == [1, 3, 6]
    assert top_units(s, 1).tolist() == [1]  # a tie goes to the lower index
    # blocks of 2: sums 1.0, 1.2, 0.5, 0.9 -> the best two blocks are 1 and 0
    assert top_units(s, 4, block=2).tolist() == [0, 1, 2, 3]
    assert top_units(s, 4, block=4).tolist() == [0, 1, 2, 3]  # 2.2 vs 1.4
    assert budget_units(0.5, [96, 100], block=8) == [48, 48]  # whole blocks, ≥ one block
    assert budget_units(0.01, [96], block=8) == [8]


def test_block_selection_materializes_whole_blocks(tiny):
    model, _ = tiny
    sel = model.select(TOKENS, keep=0.5, block=8)
    for idx in sel.indices:
        assert len(idx) % 8 == 0 and (idx.reshape(-1, 8) % 8 == np.arange(8)).all()
    sliced = logits(model)
    np.testing.assert_allclose(np.array(sliced), np.array(masked_logits(model, sel)), atol=1e-4)
