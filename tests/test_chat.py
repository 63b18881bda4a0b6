"""Multi-turn conversations (policies, cache reuse) and the ifp-chat / ifp-generate CLIs."""

import signal
import subprocess
import sys

import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.chat import Conversation
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError
from tests.helpers import make_tiny_hf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = make_tiny_hf("llama", root / "hf", seed=11)
    convert(src, root / "m", progress=False)
    return root / "m"


def answer(conv, text, n=5):
    return "".join(r.text for r in conv.ask(text, max_tokens=n))


@pytest.mark.parametrize("policy", ["first-turn", "per-turn"])
def test_policies(tiny_folder, policy):
    model, tok = ifp_mlx.load(tiny_folder)
    conv = Conversation(model, tok, keep=0.5, policy=policy)
    answer(conv, "w4 w5 w6")
    first = model.selection
    offset = conv.cache[0].offset
    answer(conv, "w30 w31 w32 w33")
    assert conv.cache[0].offset > offset  # cache reused, grown
    assert len(conv.messages) == 4
    if policy == "first-turn":
        assert model.selection is first
    else:
        assert model.selection is not first


def count_feeds(monkeypatch, model) -> list:
    """The number of tokens of every forward pass of ``model`` (prefill chunks, decode steps)."""
    fed, cls = [], type(model)
    forward = cls.__call__

    def counted(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[1])
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    return fed


def reference_turn(model, f1, f2, s, sel1, sel2, n, rebuilt=False):
    """Turn 2 computed by hand from an empty cache, as the design says it runs: turn 1's
    prompt but its last token prefilled dense, turn 1's selection for the rest of what the
    cache kept (``f2[:s]``); then turn 2's new tokens: pruned with the same selection
    (first-turn), or dense-prefilled and re-selected (per-turn). Returns n greedy logprobs."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)

    def feed(tokens):
        return model(mx.array(tokens)[None], cache=cache)[0, -1]

    if not rebuilt:
        model.dense()
        feed(f1[:-1])
        model.apply_selection(sel1)
        feed(f2[len(f1) - 1 : s])
    rest = f2[s:]
    if sel2 is not sel1:
        model.dense()
        feed(rest[:-1])
        rest = rest[-1:]
    model.apply_selection(sel2)
    logits, out = feed(rest), []
    for _ in range(n):
        out.append(np.array(logits - mx.logsumexp(logits)))
        logits = feed([int(logits.argmax())])
    return out


@pytest.mark.parametrize(
    "policy,system", [("first-turn", None), ("per-turn", None), ("first-turn", "w60 w61 w62")]
)
def test_second_turn_continues_the_cache_exactly(tiny_folder, monkeypatch, policy, system):
    """Turn 2 equals the hand-built reference over several tokens (logprobs, not one argmax),
    and feeds only its new tokens: a chat that re-prefills the conversation fails both ways."""
    from mlx_lm.utils import common_prefix_len

    from ifp_mlx.generate import prompt_tokens

    model, tok = ifp_mlx.load(tiny_folder)
    conv = Conversation(model, tok, keep=0.5, policy=policy, system=system)
    long = " ".join(f"w{i}" for i in range(10, 50))  # 40 words: re-feeding them would show
    answer(conv, long, n=4)
    sel1, kept = model.selection, list(conv.cache_tokens)
    fed = count_feeds(monkeypatch, model)
    second = list(conv.ask("w7 w8", max_tokens=6))
    sel2 = model.selection
    assert (sel2 is sel1) == (policy == "first-turn")
    f1 = prompt_tokens(tok, conv.messages[:-3])
    f2 = prompt_tokens(tok, conv.messages[:-1])
    if system:  # the system prompt opens every turn's prompt
        assert conv.messages[0] == {"role": "system", "content": system}
        opening = prompt_tokens(tok, conv.messages[:1])[:-1]  # without the answer marker
        assert f1[: len(opening)] == opening
    s = min(common_prefix_len(kept, f2), len(kept))
    assert s >= len(f1)  # turn 1's prompt and answer stay in the cache
    new = len(f2) - s
    assert new + 5 <= sum(fed) <= new + 6, (fed, len(f2), s)  # new tokens + decode steps
    ref = reference_turn(model, f1, f2, s, sel1, sel2, 6)
    for r, want in zip(second, ref):
        np.testing.assert_allclose(np.array(r.logprobs), want, atol=2e-4)
    assert [r.token for r in second] == [int(w.argmax()) for w in ref]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_history_the_cache_does_not_match_is_trimmed_or_rebuilt(tmp_path, monkeypatch, family):
    """Turn 1's answer ends in EOS, which the cache holds but turn 2's prompt does not: the
    cache is trimmed back to the common prefix (llama) or, a rotated sliding-window cache
    being untrimmable, rebuilt from scratch (gemma3); either way turn 2 equals its reference."""
    import mlx.core as mx
    from mlx_lm.utils import common_prefix_len

    from ifp_mlx.generate import prompt_tokens

    src = make_tiny_hf(family, tmp_path / "hf", seed=5)
    convert(src, tmp_path / "m", progress=False)
    model, tok = ifp_mlx.load(tmp_path / "m")
    conv = Conversation(model, tok, keep=0.5)
    calls = []

    def eos_second(tokens, logits):  # the answer: one word, then EOS (id 2)
        calls.append(1)
        force = mx.where(mx.arange(logits.shape[-1]) == 2, 1e4, -1e4)[None]
        return force if len(calls) == 2 else logits

    f1 = prompt_tokens(tok, [{"role": "user", "content": "w9 " * 20}])
    list(conv.ask("w9 " * 20, max_tokens=4, logits_processors=[eos_second]))
    sel1, kept = model.selection, list(conv.cache_tokens)
    assert kept[len(f1) + 1] == 2
    second = list(conv.ask("w7 w8", max_tokens=5))
    f2 = prompt_tokens(tok, conv.messages[:-1])
    s = common_prefix_len(kept, f2)
    assert s == len(f1) + 1  # the history diverges at the EOS
    rebuilt = family == "gemma3_text"
    ref = reference_turn(model, f1, f2, 0 if rebuilt else s, sel1, sel1, 5, rebuilt=rebuilt)
    for r, want in zip(second, ref):
        np.testing.assert_allclose(np.array(r.logprobs), want, atol=2e-4)


def test_keep_dense_reset_and_errors(tiny_folder):
    model, tok = ifp_mlx.load(tiny_folder)
    conv = Conversation(model, tok, keep=0.5)
    answer(conv, "w4 w5")
    conv.set_keep(0.25)
    answer(conv, "w6")
    assert model.selection.keep == pytest.approx(0.25, abs=0.02)
    conv.set_keep(1.0)
    answer(conv, "w7")
    assert model.selection is None
    conv.reset()
    assert conv.messages == [] and conv.cache[0].offset == 0
    with pytest.raises(IFPError, match="keep"):
        conv.set_keep(0)
    with pytest.raises(IFPError, match="policy"):
        Conversation(model, tok, policy="sometimes")


def run(args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_chat_cli_piped(tiny_folder):
    script = "w4 w5 w6\n/keep 0.3\nw7 w8\n/dense\nw9\n/keep 7\n/bogus\n/stats\n/quit\n"
    res = run(["ifp_mlx.apps.chat", "--model", str(tiny_folder), "--max-tokens", "4"], script)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("[kept ") == 3  # one stats line per answer
    assert "[kept 50% (activation)" in out and "[kept 30% (activation)" in out
    assert "[kept 100% (dense)" in out
    assert "error: keep must be in (0, 1], not 7.0" in res.stderr
    assert "error: unknown command /bogus" in res.stderr
    assert "generation_tps" in out and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--keep", "0"], "keep must be in (0, 1]"),
        (["--keep", "1.5"], "keep must be in (0, 1]"),
        (["--predictor", "magic"], "unknown predictor 'magic'"),
        (["--policy", "never"], "unknown policy 'never'"),
        (["--keep", "0.5,0.5,0.5"], "per-layer budget has 3 entries"),
        (["--prompt", " "], "empty prompt"),
        (["--prompt", "w5 " * 300], "context"),
    ],
)
def test_generate_cli_bad_input(tiny_folder, flags, message):
    args = ["ifp_mlx.apps.generate", "--model", str(tiny_folder), "--max-tokens", "3"]
    if "--prompt" not in flags:
        args += ["--prompt", "w5 w6"]
    res = run(args + flags)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], res.stderr


def test_generate_cli_ok(tiny_folder):
    res = run(
        [
            "ifp_mlx.apps.generate",
            "--model",
            str(tiny_folder),
            "--prompt",
            "w5 w6",
            "--max-tokens",
            "3",
            "--keep",
            "0.5",
        ]
    )
    assert res.returncode == 0, res.stderr
    assert "[kept 50% (activation)" in res.stderr


def test_chat_ctrl_c_stops_answer_not_program(tiny_folder):
    """Through a pseudo-terminal: Ctrl-C during an endless answer, then another turn, /quit."""
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "ifp_mlx.apps.chat", "--model", str(tiny_folder), "--max-tokens", "100000"],
        encoding="utf-8",
        timeout=120,
        # a child inherits an ignored SIGINT (and Python then never raises KeyboardInterrupt):
        # start it with the default disposition, as a terminal does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect(">> ")
    child.sendline("w4 w5 w6")
    child.expect_exact("w4 w5 w6\r\n")  # the terminal's echo of the line (not the answer)
    child.expect(r"w\d")  # the answer is streaming
    stopped = False
    for _ in range(6):  # under load one SIGINT can land before the stream's handler is armed
        child.sendintr()
        stopped = child.expect([r"\[stopped\]", pexpect.TIMEOUT], timeout=20) == 0
        if stopped:
            break
    assert stopped
    child.expect(">> ")
    child.sendline("/keep 0.25")
    child.expect(">> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_failed_turn_leaves_conversation_unchanged(tiny_folder):
    model, tok = ifp_mlx.load(tiny_folder)
    conv = Conversation(model, tok, keep=0.5)
    answer(conv, "w4 w5")
    before = list(conv.messages)
    with pytest.raises(IFPError, match="context"):
        answer(conv, "w6 " * 300)
    assert conv.messages == before
    answer(conv, "w7")  # still usable
    assert len(conv.messages) == 4


def test_cli_flash_store_stats_line(tiny_folder):
    """--ffn-store flash: the chat banner names the store, every stats line says what was read."""
    script = "w4 w5 w6\n/dense\nw9\n/quit\n"
    args = ["--model", str(tiny_folder), "--max-tokens", "3", "--ffn-store", "flash"]
    res = run(["ifp_mlx.apps.chat", *args], script)
    assert res.returncode == 0, res.stderr
    assert "FFN store flash" in res.stdout
    lines = [line for line in res.stdout.splitlines() if "[kept " in line]
    assert len(lines) == 2 and "store flash, read" in lines[0]
    assert "[dense model: read" in res.stdout and "every unit in memory (dense)" in lines[1]
    res = run(["ifp_mlx.apps.generate", *args, "--prompt", "w5 w6", "--keep", "0.5"])
    assert res.returncode == 0, res.stderr
    assert "store flash, read" in res.stderr and "[kept 50% (activation)" in res.stderr
    res = run(["ifp_mlx.apps.generate", *args[:2], "--prompt", "w5", "--ffn-store", "ssd"])
    assert res.returncode != 0 and "invalid choice: 'ssd'" in res.stderr


def test_tokenizer_beyond_the_embedding_is_refused(tiny_folder, tmp_path):
    """A tokenizer.json that maps a word past the embedding table: one error line, no crash
    (in a subprocess, so that a segfault would show as a signal, not a pass)."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["model"]["vocab"]["w9"] = 10**9
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    res = run(["ifp_mlx.apps.generate", "--model", str(bad), "--prompt", "w9", "--max-tokens", "2"])
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "the tokenizer has token ids up to 1000000000" in err[0]


def generate_cli(capsys, folder, *flags) -> str:
    from ifp_mlx.apps import generate as generate_app

    capsys.readouterr()
    generate_app.main(["--model", str(folder), "--prompt", "w5 w6 w7", "--keep", "0.5",
                       "--max-tokens", "12", *flags])  # fmt: skip
    return capsys.readouterr().out


def test_sampling_flags(tiny_folder, capsys):
    """--temp 0 is greedy (the API's answer); --seed makes sampling repeatable and another
    seed samples another answer; --top-p near 0 leaves only the top token (greedy again)."""
    model, tok = ifp_mlx.load(tiny_folder)
    greedy = ifp_mlx.generate(model, tok, "w5 w6 w7", keep=0.5, max_tokens=12)
    assert generate_cli(capsys, tiny_folder).strip() == greedy.strip()
    a = generate_cli(capsys, tiny_folder, "--temp", "1.5", "--seed", "7")
    assert a == generate_cli(capsys, tiny_folder, "--temp", "1.5", "--seed", "7")
    assert a != generate_cli(capsys, tiny_folder, "--temp", "1.5", "--seed", "8")
    assert a.strip() != greedy.strip()
    top = generate_cli(capsys, tiny_folder, "--temp", "1.5", "--top-p", "1e-6", "--seed", "7")
    assert top.strip() == greedy.strip()


def test_chat_reset_and_help(tiny_folder, capsys, monkeypatch):
    """/reset starts over: the same first message is again a whole first-turn prompt (the
    second turn fed only its new tokens); /help lists every command."""
    import io
    import re

    from ifp_mlx.apps import chat as chat_app

    script = "w4 w5 w6\n/stats\nw4 w5 w6\n/stats\n/reset\nw4 w5 w6\n/stats\n/help\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    chat_app.main(["--model", str(tiny_folder), "--max-tokens", "6", "--keep", "0.5"])
    out = capsys.readouterr().out
    fed = [int(n) for n in re.findall(r"prompt_tokens: (\d+)", out)]
    assert len(fed) == 3 and fed[0] == fed[2] == 6 and fed[1] != 6, fed  # w3 w4 w5 w6 w4 w5
    assert "[new conversation]" in out
    for cmd in ("/keep", "/max-kl", "/dense", "/stats", "/reset", "/help", "/quit"):
        assert f"  {cmd}" in out
