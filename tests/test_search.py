"""ifp-search: exact budgets, resumable cache, GBDT guard, written budget honoured."""

import json
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr

import ifp_mlx
from ifp_mlx.apps import search as search_app
from ifp_mlx.budget import budget_units
from ifp_mlx.errors import IFPError
from ifp_mlx.eval.methods import method_names
from ifp_mlx.search import (
    MIN_FIT,
    Objective,
    SearchConfig,
    fit,
    fractions,
    sample,
    target_units,
)
from tests.helpers import cli_error

FAST = ["--samples", "20", "--rank", "300", "--top", "3", "--n-calib", "2"]


@pytest.mark.parametrize("units", [[96, 96], [64, 96, 128, 80, 200]])
@pytest.mark.parametrize("keep, low, high", [(0.5, 0.2, 0.9), (0.33, 0.1, 0.6), (0.77, 0.5, 1.0)])
def test_budgets_meet_the_average_exactly(units, keep, low, high):
    cfg = SearchConfig(keep=keep, low=low, high=high)
    ks = sample(np.random.default_rng(0), units, cfg, 200)
    n = np.asarray(units)
    assert (ks.sum(1) == target_units(units, keep)).all()
    assert (ks >= np.ceil(low * n - 1e-9)).all() and (ks <= np.floor(high * n + 1e-9)).all()
    assert len({tuple(k) for k in ks}) > 1  # the sampler explores
    for k in ks[:20]:  # the runtime turns the written fractions back into the same units
        assert budget_units(fractions(k, units), units) == list(k)


def test_fit_rejects_too_few_samples():
    X = np.random.default_rng(0).uniform(size=(MIN_FIT - 1, 4))
    with pytest.raises(IFPError, match=f"at least {MIN_FIT} measured budgets"):
        fit(X, X.sum(1))


def test_fit_learns_a_learnable_target():
    """Budgets → a smooth loss the trees can learn: held-out rank correlation above 0.9, and
    the refit model ranks fresh budgets the same way."""
    rng = np.random.default_rng(0)
    X = rng.uniform(0.2, 1.0, size=(160, 6))
    y = np.exp(-2 * X).sum(1) + 0.3 * X[:, 0] ** 2  # a loss falling with every layer's keep
    model, report = fit(X, y)
    assert report["spearman"] > 0.9 and report["r2"] > 0.8 and len(report["held_out"]) == 32
    fresh = rng.uniform(0.2, 1.0, size=(200, 6))
    truth = np.exp(-2 * fresh).sum(1) + 0.3 * fresh[:, 0] ** 2
    assert spearmanr(model.predict(fresh), truth).statistic > 0.9


@pytest.fixture()
def folder(tiny_q4, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_q4, dst)
    return dst


def _count_calls(monkeypatch):
    calls = []
    real = Objective.__call__

    def counted(self, budget):
        calls.append(list(budget))
        return real(self, budget)

    monkeypatch.setattr(Objective, "__call__", counted)
    return calls


def test_search_writes_a_budget_the_runtime_honours(folder, tmp_path, monkeypatch, capsys):
    calls = _count_calls(monkeypatch)
    search_app.main(["--model", str(folder), "--out", str(tmp_path / "out")] + FAST)
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    # uniform + 20 samples + top 3, each measured once (a 2-layer model repeats some budgets)
    assert report["evaluations"] == len(calls) == len({tuple(c) for c in calls}) <= 24
    assert (tmp_path / "out" / "search.png").is_file()
    win, base = report["winner"], report["uniform"]
    assert win["loss"] < base["loss"]
    assert "wrote the searched budget" in capsys.readouterr().out

    model, tok = ifp_mlx.load(folder)
    ifp = json.loads((folder / "config.json").read_text())["ifp"]
    assert ifp["budget_search"]["method"] == "ifp-activation"
    assert model.default_keep == ifp["budget"] == fractions(win["units"], model.ffn_units)
    sel = model.select([5, 6, 7, 8, 9])  # no keep: the folder's searched budget
    assert sel.kept == win["units"] and sel.kept != base["units"]
    assert "ifp-searched" in method_names(model)
    assert model.select([5, 6, 7, 8, 9], keep=0.5).kept == base["units"]  # uniform still there


def test_interrupted_search_resumes_from_its_cache(folder, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    argv = ["--model", str(folder), "--dry-run", "--cache", str(tmp_path / "c.jsonl")] + FAST
    search_app.main(argv)
    first = len(calls)
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 1 + first  # settings line + one line per measured budget
    search_app.main(argv)  # everything cached: nothing measured again
    assert len(calls) == first
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:6]) + "\n")  # killed after 5 budgets
    search_app.main(argv)
    assert len(calls) == first + (first - 5)
    assert json.loads((folder / "config.json").read_text()).get("ifp", {}).get("budget") is None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--keep", "1.5"], "keep must be in (0, 1]"),
        (["--keep", "0.5", "--low", "0.6"], "need 0 < low ≤ keep ≤ high ≤ 1"),
        (["--samples", "5"], f"--samples must be ≥ {MIN_FIT}"),
        (["--method", "oracle"], "cannot search with method 'oracle'"),
        (["--method", "ifp-magic"], "unknown method 'ifp-magic'"),
    ],
)
def test_bad_input(folder, argv, needle, capsys):
    before = (folder / "config.json").read_text()
    assert needle in cli_error(
        search_app.main, ["--model", str(folder)] + argv, capsys, "ifp-search"
    )
    assert (folder / "config.json").read_text() == before
    assert not (folder / ".ifp-search").exists()


def test_cache_from_other_settings_is_refused(folder, tmp_path, capsys):
    cache = tmp_path / "c.jsonl"
    cache.write_text(json.dumps({"settings": {"keep": 0.3}}) + "\n")
    with pytest.raises(SystemExit):
        search_app.main(["--model", str(folder), "--cache", str(cache)] + FAST)
    assert "other settings" in capsys.readouterr().err
