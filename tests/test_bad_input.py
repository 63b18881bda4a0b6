"""Bad input never crashes: token ids, invalid UTF-8, sampling flags, long prompts, a fuzz of
prompts, token ids and damaged folders. Anything a user gets wrong is one clear line."""

import json
import os
import random
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import ifp_mlx
from ifp_mlx.chat import Conversation
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError
from ifp_mlx.generate import stream_generate
from tests.helpers import make_tiny_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    src = make_tiny_hf("llama", root / "hf", seed=12, max_position_embeddings=4096)
    convert(src, root / "m", progress=False)
    return src, root / "m"


def run(args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True,
                          timeout=timeout)  # fmt: skip


def one_line(res, code=1) -> str:
    """Exit ``code`` (never a signal: a negative return code), one stderr line, no traceback."""
    err = res.stderr.decode(errors="replace").strip()
    assert res.returncode == code and len(err.splitlines()) == 1, (res.returncode, err)
    return err


def test_out_of_vocabulary_ids_in_a_subprocess(tiny):
    """ids that once read past the embedding (or crashed the process) are an IFPError; in a
    subprocess, so that a crash would show as a signal, not a pass."""
    code = (f"import ifp_mlx\nfrom ifp_mlx.errors import IFPError\n"
            f"m, t = ifp_mlx.load({str(tiny[1])!r})\n"
            f"for bad in (10**9, -1, 96, 2**63):\n"
            f"    for call in (lambda: m.select([5, bad], keep=0.5),\n"
            f"                 lambda: ifp_mlx.generate(m, t, [5, bad], max_tokens=2)):\n"
            f"        try:\n            call()\n            raise SystemExit(f'accepted {{bad}}')\n"
            f"        except IFPError as e:\n            print(e)\n")  # fmt: skip
    res = run(["-c", code])
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()[-400:]
    assert out.count("is not in this model's vocabulary (0..95)") == 8


def test_invalid_utf8_everywhere(tiny):
    """argv, stdin and chat lines with bytes that are not UTF-8 are read as a terminal shows
    them (U+FFFD); the chat session goes on."""
    folder = str(tiny[1])
    gen = ["-m", "ifp_mlx.apps.generate", "--model", folder, "--max-tokens", "2", "--keep", "0.5"]
    res = run([*gen, "--prompt", b"w5 \xff\xfe w6".decode(errors="surrogateescape")])
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    res = run([*gen, "--prompt", "-"], stdin=b"w5 \xc3\x28 w6\n")
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    chat = ["-m", "ifp_mlx.apps.chat", "--model", folder, "--max-tokens", "2", "--keep", "0.5"]
    res = run(chat, stdin=b"w5 \xff w6\n/keep \xfe\nw7 w8\n/quit\n")
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    assert res.stdout.count(b"[kept ") == 2  # both messages answered
    model, tok = ifp_mlx.load(folder)
    assert isinstance(ifp_mlx.generate(model, tok, "w5 \udcff \ud800", max_tokens=2), str)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temp", "-1"], "--temp must be a number ≥ 0"),
        (["--temp", "nan"], "--temp must be a number ≥ 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--max-tokens", "-1"], "--max-tokens must be at least 1"),
        (["--seed", "-3"], "--seed must be in 0 .. 2**64 - 1"),
    ],
)
def test_sampling_flags_are_range_checked(tiny, flags, needle, capsys):
    from ifp_mlx.apps import generate as generate_app
    from tests.helpers import cli_error

    argv = ["--model", str(tiny[1]), "--prompt", "w5", *flags]
    assert needle in cli_error(generate_app.main, argv, capsys, "ifp-generate")


def test_max_tokens_in_the_api(tiny):
    model, tok = ifp_mlx.load(tiny[1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(IFPError, match="max_tokens must be a whole number ≥ 1"):
            ifp_mlx.generate(model, tok, "w5", max_tokens=bad)


def test_prefill_progress_is_reported(tiny):
    """From 0 before any work to every prompt token, never backwards, through the
    activation predictor's 512-token chunks and mlx-lm's own prefill."""
    model, tok = ifp_mlx.load(tiny[1])
    ids = [int(t) for t in mx.random.randint(3, 96, (1200,), key=mx.random.key(0))]
    for keep in (0.5, 1.0):
        seen = []
        list(stream_generate(model, tok, ids, keep=keep, max_tokens=1,
                             progress=lambda d, t: seen.append((d, t))))  # fmt: skip
        assert seen[0] == (0, 1200) and seen[-1] == (1200, 1200), seen
        done = [d for d, _ in seen]
        assert done == sorted(done) and len(set(done)) >= 3, seen


def test_prefill_bar_says_up_front_when_a_prompt_is_long(capsys):
    from ifp_mlx.apps.common import LONG_PROMPT, PrefillBar

    bar = PrefillBar("ifp-chat", delay=0)
    bar(0, LONG_PROMPT + 100)
    bar(LONG_PROMPT + 100, LONG_PROMPT + 100)
    err = capsys.readouterr().err
    assert f"a {LONG_PROMPT + 100}-token prompt: its prefill takes a while (Ctrl-C stops it)" in err
    PrefillBar("ifp-chat")(0, 50)
    assert "takes a while" not in capsys.readouterr().err


def test_ctrl_c_during_the_prefill_leaves_the_conversation_usable(tiny):
    """Interrupted mid-prefill (the dense scoring pass): the turn is dropped, the next one
    gets the answer a fresh conversation would give."""
    model, tok = ifp_mlx.load(tiny[1])
    conv = Conversation(model, tok, keep=0.5)
    list(conv.ask("w4 w5", max_tokens=3))
    before = list(conv.messages)

    def interrupt(done, total):
        if done > 0:
            raise KeyboardInterrupt

    long = " ".join(f"w{3 + i % 90}" for i in range(700))
    with pytest.raises(KeyboardInterrupt):
        list(conv.ask(long, max_tokens=3, progress=interrupt))
    assert conv.messages == before
    again = [r.token for r in conv.ask("w6 w7", max_tokens=4)]
    fresh = Conversation(model, tok, keep=0.5)
    list(fresh.ask("w4 w5", max_tokens=3))
    assert again == [r.token for r in fresh.ask("w6 w7", max_tokens=4)]


# ------------------------------------------------------------------- the fuzz


def _random_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 7, 10**12, -0.5, 1e308, "x", "", [], [1, "a"], {},
                       {"a": 1}, [0.5] * 3, float("nan")])  # fmt: skip


def _edit_config(folder, rng: random.Random) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    target = cfg["ifp"] if "ifp" in cfg and rng.random() < 0.7 else cfg
    key = rng.choice(sorted(target) + ["budget", "protect", "predictor", "default_max_kl"])
    if rng.random() < 0.2:
        target.pop(key, None)
    else:
        target[key] = _random_value(rng)
    (folder / "config.json").write_text(json.dumps(cfg))


def _damage_file(folder, rng: random.Random) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 and data:
        data = data[: rng.randrange(len(data))]
    else:
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(min(len(data), 4096))] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _hostile_files(folder, rng: random.Random) -> None:
    """What a hostile folder names: files outside it, FIFOs, headers of the wrong shape."""
    outside = folder.parent / f"outside-{folder.name}.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    name = rng.choice([str(outside), "../" + outside.name, None, 3, "", "model.safetensors"])
    kind = rng.randrange(5)
    if kind == 0:
        weights = folder / "model.safetensors"
        keys = list(json.loads(weights.read_bytes()[8 : 8 + int.from_bytes(weights.read_bytes()[:8], "little")]))  # fmt: skip
        index = {"weight_map": {k: rng.choice([name, "model.safetensors"]) for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == 1:
        cfg = json.loads((folder / "config.json").read_text())
        target = cfg.get("ifp", cfg)
        target["predictor"] = {"type": "learned", "file": name, "units": [1], "hidden_size": 4}
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == 2:
        victim = rng.choice(sorted(p for p in folder.iterdir() if p.is_file()))
        victim.unlink()
        victim.symlink_to(outside)
    elif kind == 3:
        victim = rng.choice(sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")))  # fmt: skip
        victim.unlink()
        os.mkfifo(victim)
    else:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = rng.choice([b"[1, 2]", b"7", b'{"a": {"data_offsets": ["0", "4"]}}', b"{}"])
        path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


def test_fuzz_never_crashes(tiny, tmp_path):
    """200 seeded cases: random bytes as prompts, random token ids, random edits of
    config.json and its ifp block, damaged files, hostile files (names outside the folder,
    symlinks out, FIFOs, headers of the wrong shape), damaged sources to convert. Each ends in an
    answer or an IFPError, never another exception (or a crash of the process)."""
    src, folder = tiny
    rng = random.Random(18)
    model, tok = ifp_mlx.load(folder)
    outcomes = {"ok": 0, "refused": 0}

    def attempt(fn):
        try:
            fn()
            outcomes["ok"] += 1
        except IFPError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1

    for i in range(200):
        kind = i % 5
        if kind == 0:  # random bytes as a prompt (decoded as argv would be)
            text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            prompt = text.decode("utf-8", "surrogateescape")
            attempt(lambda: ifp_mlx.generate(model, tok, prompt, keep=0.5, max_tokens=2))
        elif kind == 1:  # random token ids, some outside the vocabulary
            ids = [rng.choice([rng.randrange(96), rng.randrange(-5, 10**6), 2**40])
                   for _ in range(rng.randint(1, 12))]  # fmt: skip
            attempt(lambda: ifp_mlx.generate(model, tok, ids, keep=0.5, max_tokens=2))
        elif kind in (2, 3):  # a damaged model folder: edited config, damaged files
            bad = tmp_path / f"m{i}"
            shutil.copytree(folder, bad)
            edit = _edit_config if kind == 2 else rng.choice([_damage_file, _hostile_files])
            edit(bad, rng)

            def load_and_answer():
                m, t = ifp_mlx.load(bad, ffn_store=rng.choice(["memory", "flash"]))
                ifp_mlx.generate(m, t, "w5 w6", max_tokens=2)

            attempt(load_and_answer)
            shutil.rmtree(bad)
        else:  # a damaged source to convert
            bad = tmp_path / f"s{i}"
            shutil.copytree(src, bad)
            rng.choice([_edit_config, _damage_file, _hostile_files])(bad, rng)
            attempt(lambda: convert(bad, tmp_path / f"o{i}", progress=False))
            shutil.rmtree(bad)
            shutil.rmtree(tmp_path / f"o{i}", ignore_errors=True)
    assert outcomes["ok"] > 20 and outcomes["refused"] > 40, outcomes
