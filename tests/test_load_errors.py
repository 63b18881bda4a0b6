"""Loading a folder that is not what ``load`` needs: one clear error, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError, set_ifp_entries
from ifp_mlx.predictors.learned import PredictorConfig, PredictorHead, save, weights_of
from tests.helpers import make_tiny_hf, read_config


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny source folder and its conversion with a (random) learned predictor beside it."""
    root = tmp_path_factory.mktemp("load")
    src = make_tiny_hf("llama", root / "hf", seed=4)
    convert(src, root / "m", progress=False)
    model, _ = ifp_mlx.load(root / "m")
    head = PredictorHead(PredictorConfig(model.ffn_units, 64, encoder_layers=1, hidden=16))
    set_ifp_entries(root / "m", predictor=save(head, root / "m"))
    ifp_mlx.load(root / "m")  # loads as made
    return src, root / "m"


@pytest.fixture()
def folder(made, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(made[1], dst)
    return dst


def edit_ifp(folder, **entries):
    cfg = read_config(folder)
    cfg["ifp"].update(entries)
    (folder / "config.json").write_text(json.dumps(cfg))


def refused(folder, needle: str) -> str:
    with pytest.raises(IFPError) as e:
        ifp_mlx.load(folder)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    return msg


def test_missing_folder(tmp_path, monkeypatch):
    refused(tmp_path / "nowhere", "no such model folder")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/smol" is a path with a typo, not a hub repo
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: 1 / 0)
    refused("models/smol", "no such model folder: models/smol")


def test_a_folder_that_is_not_a_model(tmp_path):
    refused(tmp_path, "missing config")


def test_an_unconverted_folder_says_how_to_convert(made):
    refused(made[0], "is not an ifp-mlx model folder (convert it: ifp-convert")


def test_garbled_config(folder):
    (folder / "config.json").write_text("{not json")
    refused(folder, "garbled config")


def test_a_newer_format_asks_for_an_upgrade(folder):
    edit_ifp(folder, format_version=99)
    refused(folder, "uses ifp format 99; upgrade ifp-mlx")


def test_missing_weights(folder):
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    refused(folder, "lists model.safetensors, which is missing")


def test_missing_predictor_file(folder):
    (folder / read_config(folder)["ifp"]["predictor"]["file"]).unlink()
    refused(folder, "the learned predictor's weights")


def test_predictor_file_that_does_not_match_its_config(folder):
    entry = read_config(folder)["ifp"]["predictor"]
    edit_ifp(folder, predictor={**entry, "hidden": 32})  # the file holds a 16-wide head
    refused(folder, "does not match its config")


def test_a_predictor_trained_on_other_weights_is_refused(folder, capsys):
    """Same shapes, other weights (here: it says it was trained on a 4-bit conversion)."""
    from ifp_mlx.apps import generate

    entry = read_config(folder)["ifp"]["predictor"]
    q4 = {"bits": 4, "group_size": 64, "mode": "affine"}
    edit_ifp(folder, predictor={**entry, "trained_on": {"source": "x.gguf", "quantization": q4}})
    msg = refused(folder, "its learned predictor was trained on 4-bit g64 x.gguf weights, this "
                  "folder holds float32 hf weights")  # fmt: skip
    assert "--predictor-any" in msg and "ifp-train" in msg
    model, _ = ifp_mlx.load(folder, predictor_any=True)
    assert (
        model.default_predictor == "learned" and model.select([5, 6, 7], 0.5).predictor == "learned"
    )
    edit_ifp(folder, default_predictor="activation")  # loads; asking for the head is refused
    model, _ = ifp_mlx.load(folder)
    assert model.select([5, 6, 7], 0.5).predictor == "activation"
    with pytest.raises(IFPError, match="trained on 4-bit g64 x.gguf weights"):
        model.select([5, 6, 7], 0.5, predictor="learned")
    argv = ["--model", str(folder), "--prompt", "w5", "--max-tokens", "2", "--predictor", "learned"]
    with pytest.raises(SystemExit):
        generate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on 4-bit g64" in err[0], err
    generate.main(argv + ["--predictor-any"])
    # its own weights: accepted
    edit_ifp(folder, predictor={**entry, "trained_on": weights_of(read_config(folder)["ifp"])})
    model, _ = ifp_mlx.load(folder)
    assert model.select([5, 6, 7], 0.5, predictor="learned").predictor == "learned"


def test_converting_again_keeps_the_weights_a_predictor_was_trained_on(made, tmp_path):
    convert(made[1], tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, progress=False)
    refused(tmp_path / "q4", "trained on float32 hf weights, this folder holds 4-bit g32 hf")
    convert(made[1], tmp_path / "f32", progress=False)  # the same weights: its predictor fits
    assert ifp_mlx.load(tmp_path / "f32")[0].default_predictor == "learned"


def test_predictor_made_for_another_model(folder):
    entry = read_config(folder)["ifp"]["predictor"]
    other = PredictorHead(PredictorConfig([128, 128], 64, encoder_layers=1, hidden=16))
    edit_ifp(folder, predictor={**entry, **save(other, folder), "units": [128, 128]})
    refused(folder, "the learned predictor was made for another model")


@pytest.mark.parametrize(
    "entry,needle",
    [
        ("learned", "ifp.predictor must be an object or null"),
        ({"type": "learned", "file": "x"}, "the ifp.predictor entry is damaged"),
    ],
)
def test_damaged_predictor_entry(folder, entry, needle):
    edit_ifp(folder, predictor=entry)
    refused(folder, needle)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


def _two_shards(folder):
    """The folder's weights split over two shards with an index, as mlx-lm writes big models."""
    import mlx.core as mx

    weights = mx.load(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    index = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(str(folder / file), {n: weights[n] for n in part})
        index.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def test_several_shards_load_and_each_is_checked(folder):
    _two_shards(folder)
    ifp_mlx.load(folder)
    with open(folder / "model-00002-of-00002.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    refused(folder, "model-00002-of-00002.safetensors: too long")
    _truncate(folder / "model-00002-of-00002.safetensors")
    refused(folder, "model-00002-of-00002.safetensors: truncated")


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda f: _truncate(f / "model.safetensors"), "model.safetensors: truncated"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64), "not a readable safetensors"),
        (lambda f: [(f / n).unlink() for n in ("model.safetensors", "model.safetensors.index.json")], "no model*.safetensors weights"),
        (lambda f: (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}})), "lists model-2.safetensors, which is missing"),
        (lambda f: (f / "model.safetensors.index.json").write_text("{}"), "no weight_map"),
        (lambda f: (f / "tokenizer.json").unlink(), "missing tokenizer"),
        (lambda f: (f / "tokenizer.json").write_text("{oops"), "garbled tokenizer file"),
        (lambda f: (f / "tokenizer.json").write_text('{"model": 3}'), "cannot load the tokenizer"),
    ],
    ids=["truncated-shard", "garbled-shard", "no-weights", "index-missing-shard",
         "index-without-map", "no-tokenizer", "garbled-tokenizer", "damaged-tokenizer"],
)  # fmt: skip
def test_damaged_files_are_named(folder, damage, needle):
    damage(folder)
    msg = refused(folder, needle)
    assert "reconvert" in msg or "tokenizer" in msg


@pytest.mark.parametrize(
    "entry,value,needle",
    [
        ("budget", 0.5, "ifp.budget must be a list of keeps"),
        ("format_version", "2", "ifp.format_version must be an integer"),
        ("protect", [4], "ifp.protect must be [first, last]"),
        ("default_max_kl", -1, "ifp.default_max_kl must be a positive number"),
        ("compensate", "yes", "ifp.compensate must be true or false"),
        ("ffn_units", "many", "ifp.ffn_units must be a list of integers"),
    ],
)
def test_ifp_block_types(folder, entry, value, needle):
    edit_ifp(folder, **{entry: value})
    refused(folder, needle)


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 10**12), ("hidden_size", -4),
                                       ("vocab_size", "big")])  # fmt: skip
def test_implausible_model_sizes(folder, key, value):
    cfg = read_config(folder)
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(folder, f"{key} = ")


def test_a_tokenizer_of_another_model_is_refused_at_load(folder):
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["model"]["vocab"]["w9"] = 10**9
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    refused(folder, "the tokenizer has token ids up to 1000000000, the model's vocabulary is 96")
    tj["model"]["vocab"]["w9"] = 96  # one past the last row of the embedding
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    refused(folder, "the tokenizer has token ids up to 96, the model's vocabulary is 96")


def test_cli_prints_one_line(folder):
    edit_ifp(folder, format_version=99)
    res = subprocess.run(
        [sys.executable, "-m", "ifp_mlx.apps.generate", "--model", str(folder), "--prompt", "w5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(err) == 1 and "upgrade ifp-mlx" in err[0], res.stderr
