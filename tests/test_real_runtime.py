"""The bundled SmolLM2-135M-Instruct at 4-bit, pruned per prompt."""

import mlx.core as mx
import numpy as np
import pytest

import ifp_mlx
from tests.helpers import masked_logits, mlx_logits

PROMPT = "What color is the sky on a clear day?"
# Greedy tokens at keep 0.5 (activation predictor), recorded from this runtime. The text is
# "The sky on a clear day is a typical, the sky is the color of": on-topic but
# degraded, which is what training-free pruning does to a 135M model at half its FFN.
RECORDED_HALF = [504, 6376, 335, 253, 2437, 1194, 314, 253, 5923, 28, 260, 6376, 314, 260, 2380, 282]  # fmt: skip


def test_default_model_is_converted_4bit(smol_q4):
    from tests.helpers import read_config

    assert read_config(smol_q4)["ifp"]["quantization"]["bits"] == 4


def test_keep_half_recorded_answer_and_dense_answer(smol_q4):
    model, tok = ifp_mlx.load(smol_q4)
    gen = ifp_mlx.stream_generate(
        model, tok, PROMPT, keep=0.5, predictor="activation", max_tokens=16
    )
    tokens = [r.token for r in gen]
    print(tokens, tok.decode(tokens))
    assert tokens == RECORDED_HALF
    dense = ifp_mlx.generate(
        model,
        tok,
        "What is the capital of France? Answer in one sentence.",
        keep=1.0,
        max_tokens=12,
    )
    assert "Paris" in dense


# The same at keep 0.5 with the shipped learned predictor (the bundled model's default):
# "The color on a clear day is a type of light, a light that is" — fluent, on-topic, vague.
RECORDED_LEARNED = [504, 2380, 335, 253, 2437, 1194, 314, 253, 1502, 282, 1420, 28, 253, 1420, 338, 314]  # fmt: skip


def test_bundled_model_ships_its_learned_predictor(smol_q4, tmp_path):
    import shutil

    from ifp_mlx.bundled import attach_predictor
    from tests.helpers import read_config

    model, tok = ifp_mlx.load(smol_q4)
    assert model.default_predictor == "learned"
    assert read_config(smol_q4)["ifp"]["predictor"]["units"] == model.ffn_units
    gen = ifp_mlx.stream_generate(model, tok, PROMPT, keep=0.5, max_tokens=16)
    responses = list(gen)
    assert responses[-1].ifp.predictor == "learned"
    assert [r.token for r in responses] == RECORDED_LEARNED
    # A folder's own predictor is never replaced by the shipped one.
    own = tmp_path / "own"
    shutil.copytree(smol_q4, own)
    (own / "predictor.safetensors").write_bytes(b"mine")
    attach_predictor(own)
    assert (own / "predictor.safetensors").read_bytes() == b"mine"


def test_the_default_ships_a_head_trained_on_its_own_weights(smol_default, tmp_path):
    """The 8-bit default carries the head trained on the 8-bit weights (usable without
    --predictor-any); a cache where an older ifp-mlx attached the 4-bit head gets it too."""
    import shutil

    from ifp_mlx.bundled import PREDICTOR_NAME, SHIPPED, attach_predictor
    from ifp_mlx.errors import read_json, set_ifp_entries
    from tests.helpers import read_config

    assert read_config(smol_default)["ifp"]["predictor"]["trained_on"]["quantization"]["bits"] == 8
    model, tok = ifp_mlx.load(smol_default)
    assert model.default_predictor == "activation"
    sel = model.select(tok.encode("Name three primary colors."), keep=0.5, predictor="learned")
    assert sel.predictor == "learned" and sel.prefilled == 0
    old = tmp_path / "old"
    shutil.copytree(smol_default, old)
    first = read_json(SHIPPED / f"{PREDICTOR_NAME}.predictor.json")
    set_ifp_entries(old, predictor={k: v for k, v in first.items() if k != "trained_on"})
    shutil.copy(SHIPPED / f"{PREDICTOR_NAME}.predictor.safetensors", old / "predictor.safetensors")
    attach_predictor(old, 8)
    assert read_config(old)["ifp"]["predictor"]["trained_on"]["quantization"]["bits"] == 8
    ours = (SHIPPED / "SmolLM2-135M-Instruct-8bit.predictor.safetensors").read_bytes()
    assert (old / "predictor.safetensors").read_bytes() == ours


def test_real_sliced_equals_masked_dense(smol_q4):
    model, tok = ifp_mlx.load(smol_q4)
    ids = tok.encode("Plants need sunlight, water and air to grow.")
    sel = model.select(ids, keep=0.5)
    sliced = mlx_logits(model, ids)
    assert np.abs(sliced - masked_logits(model, sel.indices, ids)).max() <= 1e-3


@pytest.mark.real
@pytest.mark.parametrize("kind", ["f32", "q4"])
def test_real_flash_store_is_bit_identical(kind, smol_f32, smol_q4):
    """The real SmolLM2 (fp32 and the bundled 4-bit): with the same selection the flash store
    gives the memory store's logits bit for bit, and one-shot answers are the same tokens."""
    from ifp_mlx.store import read_spans

    folder = smol_f32 if kind == "f32" else smol_q4
    memory, tok = ifp_mlx.load(folder)
    flash, _ = ifp_mlx.load(folder, ffn_store="flash")
    ids = tok.encode("Plants need sunlight, water and air to grow.")
    sel = memory.select(ids, keep=0.5)
    got = flash.select(ids, keep=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(sel.indices, got.indices))
    assert mx.array_equal(memory(mx.array(ids)[None]), flash(mx.array(ids)[None])).item()
    store = flash._ifp_store()  # a learned predictor's encoder layers stay resident
    assert set(store.resident) == (set(range(2)) if kind == "q4" else set())
    read = [(i, l) for n, (i, l) in enumerate(zip(got.indices, store.file.spec.layers))
            if n not in store.resident]  # fmt: skip
    assert got.bytes_read == sum(len(i) * l.record for i, l in read)  # the kept units, once
    spans = [read_spans(i, store.file.max_gap_bytes // l.record) for i, l in read]
    assert got.read_calls == sum(len(s) for s in spans) < sum(len(i) for i, _ in read) / 2
    answers = [
        [r.token for r in ifp_mlx.stream_generate(m, tok, PROMPT, keep=0.5, max_tokens=8)]
        for m in (memory, flash)
    ]
    assert answers[0] == answers[1]


@pytest.mark.real
def test_bundled_cache_from_an_older_format_is_reconverted(smol_q4, tmp_path, monkeypatch):
    """A cached bundled model converted before the unit file: reconverted on first use, keeping
    what the user added (a searched budget, the predictor)."""
    import json
    import shutil

    from ifp_mlx import bundled

    old = tmp_path / "home" / "models" / bundled.folder_name(4)
    shutil.copytree(smol_q4, old)
    config = json.loads((old / "config.json").read_text())
    config["ifp"].update(format_version=1, budget=[0.4] * 30)
    (old / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("IFP_MLX_HOME", str(tmp_path / "home"))
    assert bundled.default_model(4) == old
    ifp = json.loads((old / "config.json").read_text())["ifp"]
    assert ifp["format_version"] == 2 and ifp["budget"] == [0.4] * 30 and ifp["predictor"]
    model, _ = ifp_mlx.load(old, ffn_store="flash")
    assert model.default_keep == [0.4] * 30 and model.default_predictor == "learned"


@pytest.mark.real
@pytest.mark.parametrize(
    "question, need",
    [("What is the capital of France?", [["Paris"]]),
     ("Name three primary colors.", [["red"], ["blue"], ["yellow"]])],
)  # fmt: skip
def test_the_default_answers_and_ends_like_dense(smol_default, question, need, capsys):
    """No flags, as a user runs it: ``ifp-generate --prompt ...`` on the bundled default (8-bit,
    the flash store, the shipped settings: README, "Answers as a user reads them"). It prunes,
    gets the answer right and ends on its own within 2x the dense answer's tokens. (An answer of
    at most 8 tokens is the shipped dense head's: written by the dense model.)"""
    from ifp_mlx.apps import generate
    from ifp_mlx.eval.answers import is_right

    model, tok = ifp_mlx.load(smol_default)
    dense = list(ifp_mlx.stream_generate(model, tok, question, keep=1.0, max_tokens=128))
    assert dense[-1].finish_reason == "stop" and is_right("".join(r.text for r in dense), need)
    generate.main(["--model", str(smol_default), "--prompt", question, "--max-tokens", "128"])
    out = capsys.readouterr()
    assert is_right(out.out, need), out.out
    stats = out.err.strip().splitlines()[-1]
    assert "store flash" in stats, stats
    model, tok = ifp_mlx.load(smol_default, ffn_store="auto")  # the same, with the token count
    rs = list(ifp_mlx.stream_generate(model, tok, question, max_tokens=128))
    assert "".join(r.text for r in rs).strip() == out.out.strip()
    assert rs[-1].finish_reason == "stop", out.out
    assert rs[-1].generation_tokens <= 2 * dense[-1].generation_tokens
    assert rs[-1].ifp.store == "flash"
    if rs[-1].generation_tokens > 8:  # past the shipped dense head: pruned, reselected
        assert rs[-1].ifp.keep < 0.95 and rs[-1].ifp.rescores >= 1 and "activation" in stats
