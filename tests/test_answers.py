"""Answer-level metrics (free-running answers vs dense) and selection that follows the answer."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError
from ifp_mlx.eval import answers as A
from ifp_mlx.generate import prompt_tokens
from ifp_mlx.predictors.activation import ActivationPredictor
from tests.helpers import make_tiny_hf

LOOPING = (
    "Paris, the capital city is a vibrant metropolis. It's a French capital, but it's not a "
    "French capital. You're looking for a French capital, but it's not a French capital. "
    "You're looking for a French capital, but it's not a French language."
)


def test_loops_on_made_up_text():
    assert A.loops(LOOPING)
    assert A.max_repeats(LOOPING) >= 3
    assert not A.loops("The capital of France is Paris.")
    # A list whose items share words is not a loop; the same sentence three times is.
    assert not A.loops("1. Red is a primary color. 2. Blue is one too. 3. Yellow completes them.")
    assert A.loops("I am here. " * 4)
    assert not A.loops("I am here. " * 2)
    assert not A.loops("")


def test_right_answers_need_every_group_as_a_whole_word():
    assert A.is_right("The capital of France is Paris.", [["Paris"]])
    assert not A.is_right("Parisian food is great.", [["Paris"]])
    assert A.is_right("Red, Blue and Yellow.", [["red"], ["blue"], ["yellow"]])
    assert not A.is_right("Red and blue.", [["red"], ["blue"], ["yellow"]])
    assert A.is_right("It has eight legs.", [["8", "eight"]])
    assert A.is_right("Humans breathe with their lungs.", [["lung"]])  # a plural is fine
    assert not A.is_right("It is 56.", [["5"]])


def test_sentence_and_f1_by_hand():
    assert A.first_sentence("Paris is big. It is old.") == "Paris is big."
    assert A.first_sentence("  no end ") == "no end"
    assert A.first_sentence("Line one\nline two") == "Line one"
    # words a = {the, cat, sat}, b = {the, cat, ran, off}: 2 common, p = 2/3, r = 2/4
    assert A.token_f1("The cat sat", "the cat ran off") == pytest.approx(
        2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    )
    assert A.token_f1("", "") == 1.0 and A.token_f1("a", "b") == 0.0


def test_short_answer_set_and_split():
    test, calib = A.short_answers("test"), A.short_answers("calib")
    assert len(test) + len(calib) >= 150 and len(test) >= 60 and len(calib) >= 60
    assert not {q.q for q in test} & {q.q for q in calib}
    assert all(A.split_of(q.q) == "test" for q in test)
    assert all(q.need and all(q.need) for q in test + calib)
    with pytest.raises(IFPError):
        A.short_answers("train")


def test_compare_by_hand():
    d = [
        A.Answer("Paris.", 2, True, 1.0),
        A.Answer("Four.", 2, True, 1.0),
        A.Answer(LOOPING, 9, False, 2.0),
    ]
    p = [
        A.Answer("Paris, yes.", 3, True, 1.0),
        A.Answer(LOOPING, 10, False, 3.0),
        A.Answer("x", 1, True, 0.5),
    ]
    m = A.compare(d, p, [[["Paris"]], [["four", "4"]], [["nothing"]]])
    assert m.ends == 0.5  # dense ended two; pruned ended one of those
    assert (
        m.right == 0.5
        and m.accuracy == pytest.approx(1 / 3)
        and m.dense_accuracy == pytest.approx(2 / 3)
    )
    assert m.loops == pytest.approx(1 / 3) and m.dense_loops == pytest.approx(1 / 3)
    assert m.length_ratio == pytest.approx(14 / 13) and m.time_ratio == pytest.approx(4.5 / 4.0)
    assert m.first_sentence == 0.0
    same = A.compare(d, d, [[["Paris"]], [["four"]], [["x"]]])
    assert (same.ends, same.right, same.length_ratio, same.first_sentence, same.f1) == (
        1,
        1,
        1,
        1,
        1,
    )
    with pytest.raises(IFPError):
        A.compare(d, p[:2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    convert(make_tiny_hf("llama", root / "hf", seed=5), root / "m", progress=False)
    return ifp_mlx.load(root / "m")


def test_a_pruned_model_equal_to_dense_scores_full_marks(tiny):
    model, tok = tiny
    prompts = ["w7 w8 w9", "w20 w21", "w30 w31 w32 w33"]
    whole = [1.0] * len(model.ffn_units)  # a per-layer budget that keeps everything
    res = A.run_settings(model, tok, prompts, {"dense": {"keep": 1.0}, "all": {"keep": whole}}, 12)
    m = A.compare(
        res["dense"],
        res["all"],
        [[[a.text.split()[0]]] if a.text else [["w3"]] for a in res["dense"]],
    )
    assert [a.text for a in res["all"]] == [a.text for a in res["dense"]]
    assert (m.ends, m.right, m.length_ratio, m.first_sentence, m.f1, m.keep) == (1, 1, 1, 1, 1, 1)


def test_a_model_whose_answers_loop_is_counted_as_looping(tmp_path):
    """A made-up model: huge embeddings carry the residual stream, and the output head maps
    w5 → w11 → w12 → w10 → w11 ...: every answer cycles through three words."""
    convert(make_tiny_hf("llama", tmp_path / "hf", seed=1), tmp_path / "m", progress=False)
    model, tok = ifp_mlx.load(tmp_path / "m")
    emb = np.zeros(model.model.embed_tokens.weight.shape, np.float32)
    head = np.zeros(model.lm_head.weight.shape, np.float32)
    for src, axis in ((5, 0), (10, 0), (11, 1), (12, 2)):
        emb[src, axis] = 1000.0
    for axis, nxt in ((0, 11), (1, 12), (2, 10)):
        head[nxt, axis] = 1.0
    model.model.embed_tokens.weight = mx.array(emb)
    model.lm_head.weight = mx.array(head)
    res = A.run_settings(
        model, tok, ["w7 w8", "w40"], {"dense": {"keep": 1.0}, "half": {"keep": 0.5}}, 16
    )
    assert res["dense"][0].text.split()[:4] == ["w11", "w12", "w10", "w11"]
    m = A.compare(res["dense"], res["half"])
    assert m.loops == 1.0 and m.dense_loops == 1.0 and m.ends == 1.0  # dense ended none
    assert not any(a.ended for a in res["half"])


def test_rescoring_equals_a_selection_over_prompt_and_answer(tiny):
    """rescore=N: after N tokens the units are those of prompt + the first N - 1 answer tokens,
    scored densely, and those tokens' KV entries are the dense model's: the next tokens equal
    a fresh selection over that text, continued greedily."""
    model, tok = tiny
    prompt = prompt_tokens(tok, "w7 w8 w9 w10 w11")
    n, keep = 4, 0.5
    rs = list(
        ifp_mlx.stream_generate(
            model, tok, prompt, keep=keep, predictor="activation", max_tokens=2 * n, rescore=n
        )
    )
    got = [r.token for r in rs]
    plain = [
        r.token
        for r in ifp_mlx.stream_generate(
            model, tok, prompt, keep=keep, predictor="activation", max_tokens=2 * n
        )
    ]
    assert got[:n] == plain[:n]
    cache = make_prompt_cache(model)
    sel = model.select(prompt + got[:n], keep, ActivationPredictor(), cache=cache)
    assert sel.prefilled == len(prompt) + n - 1
    ref = list(zip(generate_step(mx.array(got[n - 1 : n]), model, prompt_cache=cache), range(n)))
    assert got[n:] == [int(t) for (t, _), _ in ref]
    for r, ((_, logprobs), _) in zip(rs[n:], ref):
        np.testing.assert_allclose(np.array(r.logprobs), np.array(logprobs), atol=1e-4)
    # ... and not what the prompt's selection alone, or pruned KV entries, would give
    model.select(prompt, keep, ActivationPredictor(), cache=make_prompt_cache(model))
    stale = list(
        ifp_mlx.stream_generate(
            model, tok, prompt, keep=keep, predictor="activation", max_tokens=2 * n
        )
    )
    assert (
        max(float(mx.abs(a.logprobs - b.logprobs).max()) for a, b in zip(stale[n:], rs[n:])) > 1e-2
    )
    last = [
        r
        for r in ifp_mlx.stream_generate(
            model, tok, prompt, keep=keep, predictor="activation", max_tokens=2 * n + 1, rescore=n
        )
    ][-1]
    assert last.ifp.rescores == 2 and last.generation_tokens == 2 * n + 1
    with pytest.raises(IFPError):
        next(ifp_mlx.stream_generate(model, tok, prompt, keep=keep, rescore=-1))


def test_rescoring_text_matches_its_tokens(tiny):
    model, tok = tiny
    rs = list(
        ifp_mlx.stream_generate(
            model, tok, "w7 w8", keep=0.5, predictor="activation", max_tokens=9, rescore=3
        )
    )
    assert "".join(r.text for r in rs) == tok.decode([r.token for r in rs])
    assert rs[-1].finish_reason == "length" and all(r.finish_reason is None for r in rs[:-1])


def test_bench_answers_cli(tiny_q4, tmp_path, capsys):
    import json

    from ifp_mlx.apps import bench

    out = tmp_path / "a.json"
    argv = ["answers", "--model", str(tiny_q4), "--keep", "1", "0.5", "default", "--rescore", "0", "3",
            "--n", "3", "--max-tokens", "6", "--json", str(out)]  # fmt: skip
    bench.main(argv)
    r = json.loads(out.read_text())
    assert set(r["rows"]) == {"keep 1.0, rescore 0", "keep 1.0, rescore 3", "keep 0.5, rescore 0",
                              "keep 0.5, rescore 3", "default, rescore 0", "default, rescore 3"}  # fmt: skip
    same = r["rows"]["keep 1.0, rescore 0"]  # dense against itself: full marks
    assert (same["right"], same["ends"], same["length_ratio"], same["f1"]) == (1, 1, 1, 1)
    assert r["questions"] == 3 and str(tmp_path) not in out.read_text()
    assert r["rows"]["keep 0.5, rescore 3"]["keep"] == pytest.approx(0.5, abs=0.02)
    printed = capsys.readouterr().out
    assert "time" in printed and "keep 0.5, rescore 3" in printed
    for bad in (["--rescore", "-1"], ["--n", "0"], ["--keep", "2"]):
        with pytest.raises(SystemExit):
            bench.main(["answers", "--model", str(tiny_q4), *bad, "--json", str(out)])


def test_folder_rescore_setting_and_auto_store(tmp_path, capsys):
    from ifp_mlx.apps import generate
    from ifp_mlx.errors import set_ifp_entries

    convert(make_tiny_hf("llama", tmp_path / "hf", seed=3), tmp_path / "m", progress=False)
    folder = tmp_path / "m"
    set_ifp_entries(folder, rescore=3)
    flash, tok = ifp_mlx.load(folder, ffn_store="auto")
    memory, _ = ifp_mlx.load(folder)
    assert (flash.ffn_store, memory.ffn_store) == ("flash", "memory")
    runs = {}
    for name, model in (("flash", flash), ("memory", memory)):
        rs = list(
            ifp_mlx.stream_generate(
                model, tok, "w7 w8 w9", keep=0.5, predictor="activation", max_tokens=7
            )
        )
        assert rs[-1].ifp.rescores == 2  # the folder's default: after tokens 3 and 6
        runs[name] = [r.token for r in rs]
    assert runs["flash"] == runs["memory"]  # the same units read from the file
    off = list(
        ifp_mlx.stream_generate(
            memory, tok, "w7 w8 w9", keep=0.5, predictor="activation", max_tokens=7, rescore=0
        )
    )
    assert off[-1].ifp.rescores == 0
    generate.main(
        ["--model", str(folder), "--prompt", "w7 w8", "--keep", "0.5", "--max-tokens", "3"]
    )
    assert "store flash" in capsys.readouterr().err  # the CLIs' default store (stats on stderr)
    argv = ["--model", str(folder), "--prompt", "w7 w8", "--keep", "0.5", "--max-tokens", "5"]
    generate.main(argv + ["--rescore", "2", "--dense-head", "1"])
    assert "reselected 2x" in capsys.readouterr().err  # after tokens 1 and 3 (5 is the end)
    with pytest.raises(SystemExit):
        generate.main(argv + ["--rescore", "-2"])
    set_ifp_entries(folder, rescore=-1)
    with pytest.raises(IFPError, match="rescore"):
        ifp_mlx.load(folder)


def test_end_probability_is_read_where_dense_ends(tiny):
    """Dense cases keep their end-of-turn token; P(end) is read at that position, by hand."""
    from ifp_mlx.eval.methods import Method
    from ifp_mlx.eval.metrics import FidelityCase, answer_logits, end_probability, fidelity_cases

    model, tok = tiny
    dense = Method("dense", model, lambda: [])
    prompt = prompt_tokens(tok, "w7 w8 w9")
    free = fidelity_cases(dense, [prompt], 5, eos=set())
    assert len(free) == 1 and not free[0].ended and len(free[0].answer) == 5
    first = free[0].answer[2]  # pretend that token ends the turn: the case stops there
    ended = fidelity_cases(dense, [prompt], 5, eos={first})[0]
    assert ended.ended and ended.answer == free[0].answer[:3]
    logits = answer_logits(dense, prompt, ended.answer, 1.0)[-1]
    p = float(mx.softmax(logits)[first])
    assert end_probability(dense, [ended, free[0]], 1.0) == pytest.approx(p, rel=1e-5)
    pruned = Method("ifp-activation", model, lambda: [])
    q = float(mx.softmax(answer_logits(pruned, prompt, ended.answer, 0.3)[-1])[first])
    assert end_probability(pruned, [ended], 0.3) == pytest.approx(
        q, rel=1e-5
    ) and q != pytest.approx(p)
    assert end_probability(dense, [free[0]], 1.0) is None
    assert isinstance(ended, FidelityCase)


@pytest.mark.parametrize("store", ["memory", "flash"])
def test_dense_head_then_a_selection_over_prompt_and_head(tiny, tmp_path, store):
    """dense_head=H: the first H answer tokens are dense greedy's; the units are then those of
    prompt + head (scored densely), and decoding continues from there."""
    model, tok = tiny
    if store == "flash":
        convert(make_tiny_hf("llama", tmp_path / "hf", seed=5), tmp_path / "m", progress=False)
        model, tok = ifp_mlx.load(tmp_path / "m", ffn_store="flash")
    prompt = prompt_tokens(tok, "w7 w8 w9 w10 w11")
    h, keep = 3, 0.5
    rs = list(
        ifp_mlx.stream_generate(
            model,
            tok,
            prompt,
            keep=keep,
            predictor="activation",
            max_tokens=2 * h,
            dense_head=h,
            rescore=0,
        )
    )
    got = [r.token for r in rs]
    dense = [r.token for r in ifp_mlx.stream_generate(model, tok, prompt, keep=1.0, max_tokens=h)]
    assert got[:h] == dense
    assert rs[-1].ifp.rescores == 1 and rs[-1].ifp.keep == pytest.approx(0.5, abs=0.02)
    cache = make_prompt_cache(model)
    model.select(prompt + got[:h], keep, ActivationPredictor(), cache=cache)
    ref = list(zip(generate_step(mx.array(got[h - 1 : h]), model, prompt_cache=cache), range(h)))
    assert got[h:] == [int(t) for (t, _), _ in ref]
    for r, ((_, logprobs), _) in zip(rs[h:], ref):
        np.testing.assert_allclose(np.array(r.logprobs), np.array(logprobs), atol=1e-4)
