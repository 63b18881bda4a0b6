"""Joint (two-stage) training on a tiny model: both stages learn, fusing is exact, the output
folder loads and converts, bad input is one line."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

import ifp_mlx
from ifp_mlx.apps import train as train_app
from ifp_mlx.convert import convert
from ifp_mlx.joint import JointConfig, JointTrainer
from tests.helpers import cli_error, make_tiny_hf

PROMPT = [3, 9, 12, 40, 7, 5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    src = make_tiny_hf("llama", root / "hf", seed=7)
    convert(src, root / "m", quantize=True, q_bits=4, q_group_size=32, progress=False)
    return root / "m"


def _cfg(stage, **kw):
    base = dict(
        encoder_layers=1, steps=10, batch=2, n_train=6, n_val=3, lr=2e-2, lora_lr=2e-2, val_every=5
    )
    return JointConfig.preset("quick", stage=stage, **{**base, **kw})


def _train(folder, out, stage, **kw):
    model, tok = ifp_mlx.load(folder)
    trainer = JointTrainer(model, tok, _cfg(stage, **kw), folder, progress=False)
    trainer.prepare()
    report = trainer.run()
    first, last = report["history"][0], report["history"][-1]
    assert last["val_loss"] < first["val_loss"], report["history"]
    assert last["val_loss_dense"] < first["val_loss_dense"], report["history"]
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert lora and all(float(mx.abs(m.lora_b).max()) > 0 for m in lora)  # adapters learned
    expected = [
        np.array(m.linear.weight + (m.scale * m.lora_b.T) @ m.lora_a.T) for m in lora
    ]  # base + adapters
    pruned_logits = _logits_under(model, trainer)
    trainer.write(out)
    return model, trainer, expected, pruned_logits


def _logits_under(model, trainer):
    """Logits of the adapted (unfused) model, its FFN units masked by its own predictor at
    keep 0.5 (the sliced model equals the masked one: tested in test_selection)."""
    from ifp_mlx.budget import budget_units
    from ifp_mlx.model import tap_ffns
    from ifp_mlx.predictors.learned import LearnedPredictor
    from ifp_mlx.selection import top_units

    scores = LearnedPredictor(trainer.head).score(model, PROMPT, None).scores
    kept, masks = [], []
    for s, k in zip(scores, budget_units(0.5, model.ffn_units)):
        idx = top_units(s, k)
        kept.append(len(idx))
        masks.append(mx.zeros(s.shape).at[mx.array(idx)].add(1.0))
    with tap_ffns(model, record=False, masks=masks):
        out = model(mx.array(PROMPT)[None])
    return np.array(out), kept


def test_two_stages_learn_fuse_exactly_and_round_trip(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    # Stage 2 needs a predictor: there is none yet.
    with pytest.raises(ifp_mlx.IFPError, match="stage 2 starts from a predictor"):
        JointTrainer(*ifp_mlx.load(base), _cfg(2), base, progress=False)

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _train(base, s1, stage=1)
    model, trainer, expected, (pruned, kept) = _train(s1, s2, stage=2)

    # Fused weights are the base weights plus the adapters.
    out, _ = ifp_mlx.load(s2)
    fused = [
        np.array(m.weight)
        for p, m in out.named_modules()
        if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))
        and int(p.split(".")[2]) >= 1  # adapters only after the encoder layer
    ]
    assert len(fused) == len(expected)
    for a, b in zip(fused, expected):
        assert np.allclose(a, b, atol=1e-6)
    # The folder runs the same pruned model the trainer ended with.
    sel = out.select(PROMPT, keep=0.5, predictor="learned")
    assert sel.kept == kept
    assert np.abs(np.array(out(mx.array(PROMPT)[None])) - pruned).max() < 1e-4
    ifp = json.loads((s2 / "config.json").read_text())["ifp"]
    assert ifp["training"]["stage"] == 2 and ifp["training"]["keep_max"] == 0.75
    assert ifp["quantization"] is None and "quantization" not in json.loads(
        (s2 / "config.json").read_text()
    )

    # It converts again: float → float is exact (its predictor fits: the same weights), and
    # 4-bit keeps the predictor, trained on the float weights: used only when asked.
    convert(s2, tmp_path / "again", progress=False)
    again, _ = ifp_mlx.load(tmp_path / "again")
    x = mx.array(PROMPT)[None]
    out.dense()
    assert np.abs(np.array(again(x)) - np.array(out(x))).max() < 1e-5
    convert(s2, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, progress=False)
    with pytest.raises(ifp_mlx.IFPError, match="trained on float32 .* this folder holds 4-bit g32"):
        ifp_mlx.load(tmp_path / "q4")
    q4, tok = ifp_mlx.load(tmp_path / "q4", predictor_any=True)
    assert q4.select(PROMPT, keep=0.5, predictor="learned").kept == kept
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["ifp"]["training"]


def test_bad_input(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)

    def fails(argv, needle):
        argv = ["--model", str(folder), "--preset", "quick", "--encoder-layers", "1"] + argv
        assert needle in cli_error(train_app.main, argv, capsys, "ifp-train")
        assert not (tmp_path / "out").exists()

    out = ["--out", str(tmp_path / "out")]
    fails(["--stage", "2"] + out, "stage 2 starts from a predictor")
    fails(["--stage", "1"], "pass --out")
    fails(["--stage", "1", "--keep", "0"] + out, "keep must be in (0, 1]")
    fails(["--stage", "1", "--keep", "0.5", "--keep-max", "1.2"] + out, "keep must be in (0, 1]")
    fails(["--stage", "3"] + out, "--stage must be 0, 1 or 2")
    fails(["--lora-rank", "4"], "need --stage 1 or 2")
    from ifp_mlx.eval import data

    monkeypatch.setattr(data, "sharegpt", lambda split: [])
    fails(["--stage", "1"] + out, "no usable training text")


def test_cli_writes_the_new_folder_and_leaves_the_base_alone(tiny, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    before = (folder / "config.json").read_text()
    out = tmp_path / "s1"
    train_app.main(["--model", str(folder), "--preset", "quick", "--encoder-layers", "1",
                    "--stage", "1", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "val loss dense" in printed and f"wrote the jointly trained model folder {out}" in printed
    )
    assert (folder / "config.json").read_text() == before
    model, _ = ifp_mlx.load(out)
    assert model.default_predictor == "learned"
    assert json.loads((out / "config.json").read_text())["ifp"]["training"]["stage"] == 1


def test_joint_resume_continues_where_it_stopped(tiny, tmp_path):
    from mlx.utils import tree_flatten

    def trainer(steps):
        model, tok = ifp_mlx.load(tiny)
        return JointTrainer(model, tok, _cfg(1, steps=steps), tiny, progress=False)

    full = trainer(6)
    full.prepare()
    full.run()
    part = trainer(3)
    part.prepare()
    part.run(tmp_path / "ckpt")
    resumed = trainer(6)
    resumed.resume(tmp_path / "ckpt")
    resumed.prepare()
    resumed.run()
    a = dict(tree_flatten(full.trainable.trainable_parameters()))
    b = dict(tree_flatten(resumed.trainable.trainable_parameters()))
    assert a.keys() == b.keys() and any(k.startswith("model.") for k in a)
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
