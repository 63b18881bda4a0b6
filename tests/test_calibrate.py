"""Calibration curves and keep="auto": the math, the resolution rules, the API and the CLIs."""

import pytest

import ifp_mlx
from ifp_mlx.budget import Curve, resolve
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError, set_ifp_entries
from ifp_mlx.eval.data import sharegpt
from tests.helpers import make_tiny_hf

CURVE = {"keeps": [0.2, 0.5, 0.75, 1.0], "kl": [2.0, 1.0, 0.4, 0.0], "agree": [0.3, 0.5, 0.7, 1.0]}


def test_keep_for_interpolates_between_measured_keeps():
    c = Curve.from_dict(CURVE)
    assert c.keep_for(1.0) == pytest.approx(0.5)
    assert c.keep_for(0.7) == pytest.approx(0.625)  # halfway from 1.0 down to 0.4
    assert c.keep_for(0.2) == pytest.approx(0.875)
    assert c.keep_for(5.0) == pytest.approx(0.2)  # never below the smallest measured keep
    assert c.keep_for(1e-9) == pytest.approx(1.0, abs=1e-6)
    for t in (0.1, 0.4, 0.7, 1.5):  # the chosen keep's expected KL is the target
        assert c.expected_kl(c.keep_for(t)) == pytest.approx(t)


def test_a_lucky_dip_never_makes_a_too_small_keep_look_good_enough():
    c = Curve.from_dict({**CURVE, "kl": [2.0, 0.9, 1.1, 0.0]})
    assert list(c.envelope()) == [2.0, 1.1, 1.1, 0.0]
    assert c.keep_for(1.0) == pytest.approx(0.75 + 0.25 * 0.1 / 1.1)


@pytest.mark.parametrize(
    "bad",
    [{"keeps": [0.5, 1.0]}, {**CURVE, "keeps": [0.5, 0.2, 0.75, 1.0]}, {**CURVE, "kl": ["x"] * 4},
     {**CURVE, "keeps": [0.2, 0.5, 0.75, 0.9]}, {**CURVE, "kl": [1.0]}],
)  # fmt: skip
def test_a_damaged_curve_is_a_one_line_error(bad):
    with pytest.raises(IFPError, match="ifp.calibration entry is damaged"):
        Curve.from_dict(bad)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    convert(make_tiny_hf("llama", root / "hf", seed=3), root / "m", progress=False)
    return root / "m"


@pytest.fixture
def calibrated(folder):
    set_ifp_entries(folder, calibration={"activation": CURVE})
    yield folder
    set_ifp_entries(folder, calibration=None, default_max_kl=None)


def test_resolution_rules(calibrated):
    folder = calibrated
    set_ifp_entries(folder, calibration=None)
    plain, _ = ifp_mlx.load(folder)
    assert resolve(plain).keep == 0.5 and resolve(plain).expected_kl is None
    with pytest.raises(IFPError, match="no calibration for the activation predictor"):
        resolve(plain, "auto")
    set_ifp_entries(folder, calibration={"activation": CURVE})
    model, _ = ifp_mlx.load(folder)
    default = resolve(model)  # a calibrated folder defaults to auto at DEFAULT_MAX_KL (0.5)
    assert default.keep == pytest.approx(0.5 + 0.25 * 5 / 6) and default.max_kl == 0.5
    assert resolve(model, max_kl=1.0).keep == pytest.approx(0.5)
    assert resolve(model, "auto", max_kl=1.0).keep == pytest.approx(0.5)
    fixed = resolve(model, 0.75)
    assert fixed.keep == 0.75 and fixed.expected_kl == pytest.approx(0.4) and fixed.max_kl is None
    with pytest.raises(IFPError, match="max_kl chooses the keep"):
        resolve(model, 0.5, max_kl=1.0)
    for bad in (-1, 0, "x", float("nan")):
        with pytest.raises(IFPError, match="max_kl must be a positive number"):
            resolve(model, max_kl=bad)
    with pytest.raises(IFPError, match="or 'auto'"):
        resolve(model, "most")
    set_ifp_entries(folder, default_max_kl=1.0)
    model, _ = ifp_mlx.load(folder)
    assert resolve(model).keep == pytest.approx(0.5)  # the folder's own default target
    set_ifp_entries(folder, budget=[0.3, 0.4])
    model, _ = ifp_mlx.load(folder)
    assert resolve(model).keep == [0.3, 0.4]  # a searched budget wins over auto
    set_ifp_entries(folder, budget=None)


def test_auto_selects_and_reports_the_expected_kl(calibrated):
    model, tok = ifp_mlx.load(calibrated)
    last = None
    for last in ifp_mlx.stream_generate(model, tok, "w5 w6 w7", max_kl=1.0, max_tokens=3):
        pass
    sel = model.selection
    assert sel.keep == pytest.approx(0.5, abs=0.02) and sel.max_kl == 1.0
    assert sel.expected_kl == pytest.approx(1.0)
    assert "auto for KL ≤ 1" in last.ifp.line() and "expected KL 1.00" in last.ifp.line()
    sel = model.select([5, 6, 7], keep="auto", max_kl=0.4)
    assert sel.keep == pytest.approx(0.75, abs=0.02) and sel.expected_kl == pytest.approx(0.4)
    for last in ifp_mlx.stream_generate(model, tok, "w5 w6 w7", keep=0.75, max_tokens=2):
        pass
    assert "expected KL 0.40" in last.ifp.line() and "auto" not in last.ifp.line()


def test_cli_keep_auto_and_max_kl(calibrated, capsys):
    from ifp_mlx.apps import generate

    generate.main(["--model", str(calibrated), "--prompt", "w5 w6", "--max-kl", "1",
                   "--max-tokens", "2"])  # fmt: skip
    assert "kept 50% (activation, auto for KL ≤ 1, expected KL 1.00)" in capsys.readouterr().err
    generate.main(["--model", str(calibrated), "--prompt", "w5 w6", "--keep", "auto",
                   "--max-tokens", "2"])  # fmt: skip
    assert "auto for KL ≤ 0.5" in capsys.readouterr().err
    for flags, msg in (
        (["--keep", "0.5", "--max-kl", "1"], "--max-kl chooses the keep itself"),
        (["--max-kl", "-2"], "max_kl must be a positive number"),
        (["--keep", "often"], "or 'auto'"),
    ):
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", str(calibrated), "--prompt", "w5"] + flags)
        assert e.value.code != 0
        assert msg in capsys.readouterr().err


def test_chat_banner_and_commands(calibrated):
    from ifp_mlx.apps.chat import command
    from ifp_mlx.chat import Conversation

    model, tok = ifp_mlx.load(calibrated)
    conv = Conversation(model, tok)
    assert conv.describe() == "keep 0.71 (auto for KL ≤ 0.5, expected KL 0.50)"
    command(conv, "/max-kl 1", None)
    assert conv.describe() == "keep 0.50 (auto for KL ≤ 1, expected KL 1.00)"
    command(conv, "/keep 0.75", None)
    assert conv.describe() == "keep 0.75 (expected KL 0.40)"
    with pytest.raises(IFPError, match="max_kl must be a positive number"):
        command(conv, "/max-kl zero", None)
    resp = list(conv.ask("w6 w7", max_tokens=2))[-1]
    assert resp.ifp.keep == pytest.approx(0.75, abs=0.02)


def test_protected_layers_turn_a_mean_keep_into_a_budget():
    from ifp_mlx.budget import protected_budget

    assert protected_budget(0.6, [2, 2], 30) == [1.0] * 2 + [(18 - 4) / 26] * 26 + [1.0] * 2
    assert protected_budget(0.05, [2, 2], 30)[5] == 0.01  # the rest never drops below 1 %
    assert protected_budget(1.0, [2, 2], 30) == 1.0 and protected_budget(0.5, None, 30) == 0.5
    for bad in ([30, 0], [-1, 2], ["a", 1], 3):
        with pytest.raises(IFPError, match="protect"):
            protected_budget(0.5, bad, 30)


def test_a_protected_folder_keeps_those_layers_whole(calibrated):
    set_ifp_entries(calibrated, protect=[1, 0])
    try:
        model, tok = ifp_mlx.load(calibrated)
        sel = model.select([5, 6, 7, 8], keep=0.75)
        assert sel.kept[0] == sel.units[0] and sel.keep == pytest.approx(0.75, abs=0.02)
        assert sel.expected_kl == pytest.approx(0.4)  # the curve is over mean keeps
        sel = model.select([5, 6, 7, 8], max_kl=1.0)
        assert sel.kept[0] == sel.units[0] and sel.keep == pytest.approx(0.5, abs=0.02)
        with pytest.raises(IFPError, match="keep must be in"):
            model.select([5, 6], keep=1.5)
        from ifp_mlx.chat import Conversation

        assert "first 1 + last 0 layers whole" in Conversation(model, tok, 0.75).describe()
    finally:
        set_ifp_entries(calibrated, protect=None)


def test_ifp_calibrate_measures_and_stores_the_curve(folder, capsys):
    """End to end on the tiny model and the real calibration split: the stored curve is what
    ``calibrate`` measures (KL 0 and agreement 1 at keep 1, pruned keeps differ from dense)."""
    from ifp_mlx.apps import calibrate as cli
    from ifp_mlx.errors import read_json

    try:
        cli.main(["--model", str(folder), "--keeps", "0.25,0.5", "--n-prompts", "3",
                  "--tokens", "6", "--protect", "1,0", "--default-max-kl", "0.3",
                  "--answers", "0.5,1", "--n-answers", "2"])  # fmt: skip
        ifp = read_json(folder / "config.json")["ifp"]
        curve = Curve.from_dict(ifp["calibration"]["activation"])
        a = curve.answers  # free-running answers at the keeps asked (keep 1 is dense: skipped)
        assert a["keeps"] == [0.5] and a["questions"] == 2 and 0 <= a["right"][0] <= 1
        assert len(a["ends"]) == len(a["loops"]) == len(a["length"]) == 1
        assert curve.keeps == [0.25, 0.5, 1.0] and curve.split == "calib"
        assert curve.kl[-1] == 0.0 and curve.agree[-1] == 1.0
        assert min(curve.kl[:2]) > 0 and curve.agree[0] < 1  # a random tiny model: no trend
        assert curve.prompts == 3 and len(curve.ids) == 3
        test_ids = {ex.id for ex in sharegpt("test")}  # quality is reported there: never here
        assert test_ids and set(curve.ids).isdisjoint(test_ids)
        assert ifp["protect"] == [1, 0] and ifp["default_max_kl"] == 0.3
        out = capsys.readouterr().out
        assert "--max-kl 0.5: keep" in out and str(folder.parent) not in out
        assert "free-running answers, 2 calib questions" in out
        for flags, msg in ((["--keeps", "0.5"], "at least two keeps"),
                           (["--protect", "2,0"], "must leave some"),
                           (["--n-prompts", "0"], "must be positive")):  # fmt: skip
            with pytest.raises(SystemExit):
                cli.main(["--model", str(folder)] + flags)
            assert msg in capsys.readouterr().err
    finally:
        set_ifp_entries(folder, calibration=None, protect=None, default_max_kl=None)


def test_eval_rows_at_keep_auto(calibrated, tmp_path):
    """``ifp-eval --max-kls``: one row per target at the keep the calibration picks."""
    import json

    from ifp_mlx.apps import eval as eval_app

    eval_app.main(["--model", str(calibrated), "--quick", "--methods", "dense,ifp-activation",
                   "--metrics", "fidelity", "--keeps", "1,0.5", "--max-kls", "0.4,1",
                   "--out", str(tmp_path), "--no-plots"])  # fmt: skip
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    auto = {r["max_kl"]: r for r in rows if "max_kl" in r}
    assert set(auto) == {0.4, 1.0} and auto[1.0]["keep"] == pytest.approx(0.5)
    assert auto[0.4]["keep"] == pytest.approx(0.75) and auto[0.4]["expected_kl"] == 0.4
    assert all("fidelity_kl" in r for r in auto.values())
    with pytest.raises(SystemExit):  # a folder without calibration
        set_ifp_entries(calibrated, calibration=None)
        eval_app.main(["--model", str(calibrated), "--quick", "--max-kls", "1",
                       "--out", str(tmp_path)])  # fmt: skip


def test_calibrating_leaves_the_dense_model(folder):
    """``calibrate`` prunes at every keep it measures; the model it hands back is dense."""
    import mlx.core as mx

    from ifp_mlx.calibrate import CalibrationConfig, calibrate

    model, tok = ifp_mlx.load(folder)
    x = mx.array([[5, 17, 40, 9, 33]])
    dense = model(x)
    cfg = CalibrationConfig(keeps=[0.3, 0.6], n_prompts=2, tokens=4, dequantize=False)
    curve = calibrate(model, tok, "activation", cfg, progress=False)
    assert curve.keeps == [0.3, 0.6, 1.0] and model.selection is None
    assert mx.array_equal(model(x), dense).item()
