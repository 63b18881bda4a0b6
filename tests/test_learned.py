"""Learned predictor: SoftTopK, training on a tiny model, save/load, torch import, bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ifp_mlx
from ifp_mlx.apps import train as train_app
from ifp_mlx.convert import convert
from ifp_mlx.eval import EvalConfig, evaluate
from ifp_mlx.predictors.learned import (
    LearnedPredictor,
    PredictorConfig,
    PredictorHead,
    load_head,
    save,
)
from ifp_mlx.predictors.softtopk import hard_topk, soft_topk
from ifp_mlx.selection import mask_diversity
from ifp_mlx.train import TrainConfig, Trainer
from tests.helpers import cli_error, griffin_scores, make_tiny_hf, torch_unit_activations


@pytest.mark.parametrize("k", [1, 7, 30, 99])
def test_softtopk_sums_to_budget(k):
    mx.random.seed(k)
    s = mx.random.normal((3, 100)) * 3
    for tau in (2.0, 0.5, 0.05):
        m = soft_topk(s, k, tau)
        assert np.allclose(np.array(m.sum(-1)), k, atol=1e-3)
        assert float(m.min()) >= 0 and float(m.max()) <= 1


def test_softtopk_approaches_hard_topk_as_tau_falls():
    mx.random.seed(1)
    s = mx.random.normal((2, 64))
    hard = hard_topk(s, 16)
    errs = [mx.abs(soft_topk(s, 16, t) - hard).max().item() for t in (1.0, 0.1, 1e-3, 1e-5)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 and errs[0] > 0.1


def test_softtopk_gradients_are_finite_and_keep_the_sum():
    mx.random.seed(2)
    s = mx.random.normal((4, 50))
    w = mx.random.normal((4, 50))
    g = mx.grad(lambda s: (soft_topk(s, 10, 0.3) * w).sum())(s)
    assert bool(mx.isfinite(g).all()) and float(mx.abs(g).max()) > 0
    # Moving one score cannot change the mask's sum: directional derivative of Σm is 0.
    gs = mx.grad(lambda s: soft_topk(s, 10, 0.3).sum())(s)
    assert float(mx.abs(gs).max()) < 1e-4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    src = make_tiny_hf("llama", root / "hf", seed=5)
    convert(src, root / "m", progress=False)
    return root


def _cfg(**kw):
    base = dict(encoder_layers=1, steps=12, batch=2, n_train=6, n_val=3, lr=3e-2, val_every=6)
    return TrainConfig.preset("quick", **{**base, **kw})


def test_tiny_training_lowers_val_loss_and_round_trips(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder / "m", folder)
    model, tok = ifp_mlx.load(folder)
    trainer = Trainer(model, tok, _cfg(), folder, progress=False)
    trainer.prepare()
    report = trainer.run()
    first, last = report["history"][0]["val_loss"], report["history"][-1]["val_loss"]
    assert last < first, report["history"]
    trainer.write()
    cfg = json.loads((folder / "config.json").read_text())["ifp"]["predictor"]
    assert cfg["type"] == "learned" and (folder / cfg["file"]).is_file()
    again, _ = ifp_mlx.load(folder)
    prompt = [3, 9, 12, 40, 7]
    ours = LearnedPredictor(trainer.head).score(model, prompt, None).scores
    theirs = LearnedPredictor().score(again, prompt, None).scores
    for a, b in zip(ours, theirs):
        assert mx.array_equal(a, b)
    sel = again.select(prompt, keep=0.5, predictor="learned")
    assert sel.predictor == "learned" and sel.prefilled == 0
    assert again.default_predictor == "learned" and model.default_predictor == "activation"
    assert again.select(prompt, keep=0.5).predictor == "learned"  # the folder's default
    text = ifp_mlx.generate(again, tok, "w7 w8", keep=0.5, predictor="learned", max_tokens=3)
    assert isinstance(text, str)
    # ifp-eval picks the learned predictor up without changes.
    r = evaluate(again, tok, EvalConfig.quick(metrics=["chat-loss"]), progress=False)
    assert "ifp-learned" in r["settings"]["methods"]
    assert any(x["method"] == "ifp-learned" and x["keep"] == 0.5 for x in r["results"])


def test_training_keeps_protected_layers_whole_and_answers_end_with_their_turn(
    tiny_folder, tmp_path
):
    """The head trains under the budget the folder runs with (``ifp.protect``: first/last layers
    whole), and every answer that fits ends with the end-of-turn token (the model learns to stop
    under the masks too)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder / "m", folder)
    config = json.loads((folder / "config.json").read_text())
    config["ifp"]["protect"] = [1, 0]
    (folder / "config.json").write_text(json.dumps(config))
    model, tok = ifp_mlx.load(folder)
    trainer = Trainer(model, tok, _cfg(max_answer=400), folder, progress=False)
    trainer.prepare()
    assert all(a[-1] == tok.eos_token_id for _, a in trainer.train)  # all fit in 400 tokens
    short = Trainer(model, tok, _cfg(max_answer=2), folder, progress=False)
    assert all(len(a) == 2 and a[-1] != tok.eos_token_id for _, a in short.examples("train", 4))
    masks = trainer._masks(trainer.head(trainer.val_f), 0.75, hard_only=True)
    n = len(trainer.val)  # 96 units a layer: 144 of 192 kept, 96 of them the protected layer's
    assert float(masks[0].sum()) == n * 96 and float(masks[1].sum()) == n * 48
    assert hard_topk(mx.array([[3.0, 1.0, 2.0]]), 1).tolist() == [[1.0, 0.0, 0.0]]


def test_oracle_targets_pull_the_scores_towards_each_answers_units(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder / "m", folder)
    trainer = Trainer(*ifp_mlx.load(folder), _cfg(oracle=1.0), folder, progress=False)
    trainer.prepare()
    n = len(trainer.train)
    assert trainer.train_t.shape == (n, sum(trainer.model.ffn_units))
    # A target is the z-scored log GRIFFIN importance over prompt and answer, computed here
    # from transformers' activations of the float source model.
    for i in (0, n - 1):
        p, a = trainer.train[i]
        acts = torch_unit_activations(tiny_folder / "hf", list(p) + list(a))
        for t, act in zip(np.split(np.array(trainer.train_t[i]), len(acts)), acts):
            z = np.log(griffin_scores(act) + 1e-6)
            np.testing.assert_allclose(t, (z - z.mean()) / z.std(), rtol=1e-3, atol=2e-3)

    def error():
        s = mx.concatenate(trainer.head(trainer.train_f), -1)
        return float(((s - trainer.train_t) ** 2).mean())

    before = error()
    trainer.run()
    assert error() < before


def test_resume_continues_where_it_stopped(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder / "m", folder)
    full = Trainer(*ifp_mlx.load(folder), _cfg(steps=6), folder, progress=False)
    full.prepare()
    full.run()
    part = Trainer(*ifp_mlx.load(folder), _cfg(steps=3), folder, progress=False)
    part.prepare()
    part.run(tmp_path / "ckpt")
    resumed = Trainer(*ifp_mlx.load(folder), _cfg(steps=6), folder, progress=False)
    resumed.resume(tmp_path / "ckpt")
    resumed.prepare()
    resumed.run()
    want = dict(tree_flatten(full.head.parameters()))
    got = dict(tree_flatten(resumed.head.parameters()))
    assert set(got) == set(want)  # the feature statistics too
    for k, v in want.items():
        assert np.allclose(np.array(v), np.array(got[k]), atol=1e-5), k


def _head(units=(64, 64), d=16, seed=3):
    mx.random.seed(seed)
    return PredictorHead(PredictorConfig(list(units), d, 1, 32))


def test_feature_standardization_lets_the_head_see_the_prompt():
    """Real hidden states share a few large dimensions, so a head fed them raw sees nearly one
    input and gives every prompt the same mask; standardized, the prompts differ again."""
    head = _head()
    mx.random.seed(4)
    feats = mx.random.normal((32,)) * 30 + mx.random.normal((24, 32))

    def diversity():
        scores = head(feats)
        return mask_diversity(np.array(mx.concatenate([hard_topk(s, 32) for s in scores], -1)))

    raw = diversity()
    head.fit_features(feats)
    x = (head.normalize(feats) - head.feature_mean) / head.feature_std
    assert np.allclose(np.array(x.mean(0)), 0, atol=1e-4)
    assert np.allclose(np.array(x.std(0)), 1, atol=1e-3)
    assert diversity() > 3 * raw, (raw, diversity())


def test_heads_saved_without_feature_statistics_still_load(tmp_path):
    head = _head()
    entry = save(head, tmp_path)
    path = tmp_path / entry["file"]
    weights = mx.load(str(path))
    mx.save_safetensors(str(path), {k: v for k, v in weights.items() if "feature" not in k})
    again = load_head(tmp_path, entry)
    feats = mx.random.normal((3, 32))
    for a, b in zip(head(feats), again(feats)):
        assert mx.array_equal(a, b)


@pytest.mark.parametrize("stats", [False, True])
def test_torch_predictor_import_matches_torch(tiny_folder, tmp_path, stats):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    src = tiny_folder / "hf"
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    cfg = json.loads((src / "config.json").read_text())
    units, d, k = cfg["intermediate_size"], cfg["hidden_size"], 1
    n_layers = cfg["num_hidden_layers"]
    torch.manual_seed(0)
    head = torch.nn.Sequential(
        torch.nn.Linear(2 * d, 16), torch.nn.GELU(), torch.nn.Linear(16, units * n_layers)
    )
    state = dict(head.state_dict())
    mean, std = torch.zeros(2 * d), torch.ones(2 * d)
    if stats:  # a head trained on standardized features ships their statistics
        mean, std = torch.randn(2 * d) * 0.1, torch.rand(2 * d) + 0.5
        state.update(feature_mean=mean, feature_std=std)
    torch.save(state, tmp_path / "pred.pt")
    (tmp_path / "pred.json").write_text(json.dumps({"encoder_layers": k, "hidden": 16}))
    out = tmp_path / "mlx"
    convert(src, out, predictor=tmp_path / "pred.pt", predictor_config=tmp_path / "pred.json",
            progress=False)  # fmt: skip
    prompt = [3, 17, 22, 9, 41, 5]
    with torch.no_grad():
        h = ref(torch.tensor([prompt]), output_hidden_states=True).hidden_states[k][0]
        rms = lambda x: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
        flat = head((torch.cat([rms(h.mean(0)), rms(h[-1])]) - mean) / std)
        want = [(s - s.mean()) / (s.std(unbiased=False) + 1e-5) for s in flat.split(units)]
    model, _ = ifp_mlx.load(out)
    got = LearnedPredictor().score(model, prompt, None).scores
    for a, b in zip(got, want):
        assert np.abs(np.array(a) - b.numpy()).max() < 1e-4


def test_bad_input(tiny_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder / "m", folder)

    def fails(argv, needle):
        argv = ["--model", str(folder), "--preset", "quick", "--encoder-layers", "1"] + argv
        assert needle in cli_error(train_app.main, argv, capsys, "ifp-train")

    fails(["--keep", "0.001"], "rounds to 0")
    fails(["--keep", "1.5"], "keep must be in (0, 1]")
    fails(["--oracle", "-1"], "--oracle must be ≥ 0")
    fails(["--resume", "--checkpoint", str(tmp_path / "none")], "nothing to resume")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text(
        json.dumps({"step": 1, "fingerprint": {"units": [1]}})
    )
    mx.save_safetensors(str(tmp_path / "bad" / "state.safetensors"), {"x": mx.zeros(1)})
    fails(["--resume", "--checkpoint", str(tmp_path / "bad")], "different model")
    from ifp_mlx.eval import data

    monkeypatch.setattr(data, "sharegpt", lambda split: [])
    fails([], "no usable training data")
    monkeypatch.undo()
    model, _ = ifp_mlx.load(folder)
    with pytest.raises(ifp_mlx.IFPError, match="no learned predictor"):
        model.select([3, 4, 5], keep=0.5, predictor="learned")
