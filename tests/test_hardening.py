"""Files that stay in their folder, code from a folder that cannot hang us, terminals that
print text (not commands), a flash file that changed, a convert that was killed, two
generations at once, and damaged inputs that were tracebacks: each case failed before."""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError, set_ifp_entries
from ifp_mlx.predictors.learned import PredictorConfig, PredictorHead, save
from tests.fixtures.tiny_gguf import write_gguf
from tests.helpers import cli_error, make_tiny_hf, read_config


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    src = make_tiny_hf("llama", root / "hf", seed=5)
    convert(src, root / "m", progress=False)
    return src, root / "m"


@pytest.fixture()
def src(made, tmp_path):
    return Path_copy(made[0], tmp_path / "src")


@pytest.fixture()
def folder(made, tmp_path):
    return Path_copy(made[1], tmp_path / "m")


def Path_copy(a, b):
    shutil.copytree(a, b, symlinks=True)
    return b


def refused(fn, *needles):
    with pytest.raises(IFPError) as e:
        fn()
    msg = str(e.value)
    assert all(n in msg for n in needles) and "\n" not in msg, msg
    return msg


def shard_index(folder, names):
    index = {"metadata": {}, "weight_map": {k: v for k, v in names.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------- files stay in the folder


def test_a_shard_index_naming_files_outside_is_refused(src, tmp_path):
    """The converter once took a weight from an outside file an index named."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(src / "model.safetensors", outside)
    (src / "model.safetensors").rename(src / "inside.safetensors")
    for bad, needle in ((str(outside), "is outside the model folder"),
                        ("../outside.safetensors", "is outside the model folder"),
                        (None, "not a file name"), (7, "not a file name")):  # fmt: skip
        shard_index(src, {"model.embed_tokens.weight": bad, "lm_head.weight": "inside.safetensors"})
        refused(lambda: convert(src, tmp_path / "out", progress=False), needle)
        assert not (tmp_path / "out").exists()
    shard_index(src, {"model.embed_tokens.weight": "inside.safetensors"})
    convert(src, tmp_path / "out", progress=False)  # inside: fine


def test_a_symlink_out_of_the_folder_is_refused_but_a_hub_cache_blob_is_not(src, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(outside)
    (src / "model.safetensors").symlink_to(outside)
    refused(lambda: convert(src, tmp_path / "out", progress=False), "leads outside")
    # The Hugging Face cache: snapshots/REV/file -> ../../blobs/HASH is how every hub
    # download looks, and stays allowed.
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(src, snap, symlinks=True)
    (snap / "model.safetensors").unlink()
    outside.rename(repo / "blobs" / "f00d")
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    convert(snap, tmp_path / "out", progress=False)


def test_a_fifo_weight_file_does_not_hang_the_converter(src, tmp_path):
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    res = subprocess.run([sys.executable, "-m", "ifp_mlx.convert", str(src), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "special file" in res.stderr.strip().splitlines()[-1]


def test_a_model_folder_cannot_name_files_outside_it(folder, tmp_path):
    """The predictor entry, the shard index and symlinked weights of an ifp folder."""
    model, _ = ifp_mlx.load(folder)
    head = PredictorHead(PredictorConfig(model.ffn_units, 64, encoder_layers=1, hidden=16))
    entry = save(head, folder)
    shutil.copy(folder / entry["file"], tmp_path / "theirs.safetensors")
    for bad in ("../theirs.safetensors", str(tmp_path / "theirs.safetensors")):
        set_ifp_entries(folder, predictor={**entry, "file": bad})
        refused(lambda: ifp_mlx.load(folder), "is outside the model folder")
    set_ifp_entries(folder, predictor=entry)
    ifp_mlx.load(folder)
    weights = folder / "model.safetensors"
    weights.rename(tmp_path / "w.safetensors")
    weights.symlink_to(tmp_path / "w.safetensors")
    refused(lambda: ifp_mlx.load(folder), "leads outside")
    weights.unlink()
    (tmp_path / "w.safetensors").rename(folder / "model-00001.safetensors")
    for bad, needle in ((str(folder / "model-00001.safetensors"), "outside the model folder"),
                        (None, "not a file name")):  # fmt: skip
        shard_index(folder, {"model.embed_tokens.weight": bad})
        refused(lambda: ifp_mlx.load(folder), needle)


# ---------------------------------------------------------------- code and text from a folder


def test_a_chat_template_that_loops_for_ever_is_stopped(folder, monkeypatch):
    """~1 min of loops (for ever, as far as a user can tell) is stopped at the limit."""
    monkeypatch.setattr(sys.modules["ifp_mlx.generate"], "TEMPLATE_SECONDS", 0.5)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for i in range(100000) %}{% for j in range(3000) %}"
                            "{% endfor %}{% endfor %}w5")  # fmt: skip
    cfg_path.write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    model, tok = ifp_mlx.load(folder)
    tic = time.time()
    refused(lambda: ifp_mlx.generate(model, tok, "w5 w6", max_tokens=1), "did not finish")
    assert time.time() - tic < 5


def test_printable_strips_terminal_control():
    from ifp_mlx.apps.common import printable

    assert printable("a\x1b]0;pwned\x07b\x1b[2Jc\x1b[31mred\x9b2Jd\te\nf\rg\x1bPq\x00") == (
        "abcred2Jd\te\nfgq"
    )
    assert printable("plain text, ünïcode 🙂\n") == "plain text, ünïcode 🙂\n"
    # a sequence split between two streamed pieces leaves no control character behind
    assert "\x1b" not in printable("x\x1b") + printable("]0;title\x07y")


def test_the_clis_print_no_escape_sequences(folder, capsys):
    """Every word of this tokenizer carries a clear-screen and a window-title sequence."""
    from ifp_mlx.apps.generate import main

    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tj["model"]["vocab"] = {(f"\x1b[2J\x1b]0;{k}\x07{k}" if k.startswith("w") else k): v
                            for k, v in vocab.items()}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    main(["--model", str(folder), "--prompt", "w5 w6", "--max-tokens", "6", "--keep", "0.5"])
    out = capsys.readouterr().out
    assert out.strip() and "\x1b" not in out and "\x07" not in out
    assert "w" in out  # the words themselves are printed


def test_tiny_temperatures_are_greedy_in_the_cli(folder, capsys):
    from ifp_mlx.apps.generate import main

    outs = []
    for flags in (["--temp", "0"], ["--temp", "1e-300"], ["--temp", "0.7", "--top-p", "1e-300"]):
        main(["--model", str(folder), "--prompt", "w5 w6", "--max-tokens", "8", *flags,
              "--seed", "3"])  # fmt: skip
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].strip()


# ---------------------------------------------------------------- the flash unit file


def _layer_bytes(folder, layer=1):
    spec = read_config(folder)["ifp"]["ffn_store"]
    return folder / spec["file"], spec["layers"][layer]["offset"]


def test_a_unit_file_rewritten_in_place_is_caught_at_the_next_select(folder):
    model, tok = ifp_mlx.load(folder, ffn_store="flash")
    model.select(tok.encode("w5 w6 w7"), keep=0.5)
    path, offset = _layer_bytes(folder)
    time.sleep(0.01)
    with open(path, "r+b") as f:  # same size, header intact: only a layer's bytes differ
        f.seek(offset)
        f.write(os.urandom(64))
    refused(lambda: model.select(tok.encode("w5 w6 w7"), keep=0.5), "was modified since")
    again, _ = ifp_mlx.load(folder, ffn_store="flash")  # a new load reads the new file
    again.select(tok.encode("w5 w6 w7"), keep=0.5)


def test_a_unit_file_replaced_is_caught(folder):
    model, tok = ifp_mlx.load(folder, ffn_store="flash")
    path, _ = _layer_bytes(folder)
    shutil.copy(path, path.with_suffix(".new"))
    path.with_suffix(".new").replace(path)  # a new inode at the same name
    refused(lambda: model.select(tok.encode("w5 w6"), keep=0.5), "replaced or removed")


def test_the_checksum_option_finds_damage_at_rest(folder):
    path, offset = _layer_bytes(folder, layer=1)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # no trace in the file's times
    ifp_mlx.load(folder, ffn_store="flash")  # without the option: not looked at
    refused(lambda: ifp_mlx.load(folder, ffn_store="flash", verify_store=True),
            "layer 1", "fails its checksum")  # fmt: skip
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        f.write(byte)
    ifp_mlx.load(folder, ffn_store="flash", verify_store=True)


# ---------------------------------------------------------------- a killed convert


def test_a_killed_convert_leaves_a_temp_folder_the_next_one_removes(made, tmp_path):
    out = tmp_path / "out"
    code = ("import os, sys; from ifp_mlx.convert.writer import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as t:\n"
            "    (t / 'model.safetensors').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), 9)\n")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True)
    assert res.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1  # SIGKILL: no handler ran
    alive = tmp_path / ".other.tmp-live"  # a convert still running (this process)
    alive.mkdir()
    (alive / ".ifp-partial").write_text(f"{socket.gethostname()} {os.getpid()}")
    unmarked = tmp_path / ".not-ours"
    unmarked.mkdir()
    convert(made[0], tmp_path / "next", progress=False)
    assert not left[0].exists() and alive.exists() and unmarked.exists()
    assert not (tmp_path / "next" / ".ifp-partial").exists()


# ---------------------------------------------------------------- one generation per model


def test_two_interleaved_generations_are_an_error_not_corruption(folder):
    model, tok = ifp_mlx.load(folder)
    first = ifp_mlx.stream_generate(model, tok, "w5 w6 w7", keep=0.5, max_tokens=6)
    a = [next(first).token]
    second = ifp_mlx.stream_generate(model, tok, "w9 w8", keep=0.25, max_tokens=6)
    refused(lambda: next(second), "already generating")
    a += [r.token for r in first]
    alone = [r.token for r in ifp_mlx.stream_generate(model, tok, "w5 w6 w7", keep=0.5,
                                                      max_tokens=6)]  # fmt: skip
    assert a == alone
    third = ifp_mlx.stream_generate(model, tok, "w9 w8", keep=0.25, max_tokens=6)
    next(third)
    third.close()  # closing one frees the model at once
    assert len(list(ifp_mlx.stream_generate(model, tok, "w9", keep=0.5, max_tokens=2))) == 2


# ---------------------------------------------------------------- damaged inputs: one line


@pytest.fixture(scope="module")
def ggufs(made, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ok = write_gguf(made[0], "llama", root / "ok.gguf")
    out = {"no-scores": write_gguf(made[0], "llama", root / "ns.gguf", scores=False),
           "bos": write_gguf(made[0], "llama", root / "bos.gguf", bos=10**9)}  # fmt: skip
    raw = ok.read_bytes()
    for name, at in (("tensor-count", 8), ("kv-count", 16), ("key-length", 24)):
        bad = bytearray(raw)
        bad[at : at + 8] = struct.pack("<Q", 2**40)
        (root / f"{name}.gguf").write_bytes(bytes(bad))
        out[name] = root / f"{name}.gguf"
    return out


@pytest.mark.parametrize(
    "case,needle",
    [("no-scores", "no tokenizer.ggml.scores"), ("bos", "bos_token_id"),
     ("tensor-count", "as GGUF"), ("kv-count", "as GGUF"), ("key-length", "as GGUF")],
)  # fmt: skip
def test_damaged_ggufs_are_one_line(ggufs, case, needle, tmp_path, capsys):
    from ifp_mlx.convert.cli import main

    err = cli_error(main, [str(ggufs[case]), str(tmp_path / "o")], capsys, "ifp-convert")
    assert needle in err and not (tmp_path / "o").exists()


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(edit(json.loads(raw[8 : 8 + n]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])


def _string_offsets(h):
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [str(x) for x in v["data_offsets"]]
    return h


@pytest.mark.parametrize("edit", [lambda h: [1, 2], lambda h: 5, _string_offsets],
                         ids=["list", "number", "string-offsets"])  # fmt: skip
def test_safetensors_headers_of_the_wrong_shape_are_one_line(folder, src, edit, tmp_path):
    _rewrite_header(folder / "model.safetensors", edit)
    refused(lambda: ifp_mlx.load(folder), "not a readable safetensors file")
    _rewrite_header(src / "model.safetensors", edit)
    refused(lambda: convert(src, tmp_path / "o", progress=False), "cannot read")


def test_a_predictor_deeper_than_the_model_is_one_line(folder):
    model, _ = ifp_mlx.load(folder)
    layers = len(model.ffn_units)
    head = PredictorHead(PredictorConfig(model.ffn_units, 64, encoder_layers=layers + 3, hidden=8))
    set_ifp_entries(folder, predictor=save(head, folder))
    for store in ("flash", "memory"):
        refused(lambda: ifp_mlx.load(folder, ffn_store=store), "encoder layers")


def test_the_clis_run_under_a_low_open_file_hard_limit(folder):
    import resource

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1000))

    res = subprocess.run([sys.executable, "-m", "ifp_mlx.apps.generate", "--model", str(folder),
                          "--prompt", "w5 w6", "--max-tokens", "2"],
                         capture_output=True, text=True, timeout=120, preexec_fn=low)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip(), res.stderr[-500:]
