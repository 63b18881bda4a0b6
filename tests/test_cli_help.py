"""Every CLI's --help says what each flag means and what it defaults to, in plain text."""

import argparse
import importlib

import pytest

CLIS = ["ifp_mlx.apps.generate", "ifp_mlx.apps.chat", "ifp_mlx.apps.serve",
        "ifp_mlx.apps.calibrate", "ifp_mlx.apps.eval", "ifp_mlx.apps.train",
        "ifp_mlx.apps.search", "ifp_mlx.apps.bench", "ifp_mlx.convert.cli"]  # fmt: skip


class _Parsed(Exception):
    pass


def parsers(module: str, monkeypatch) -> list:
    """The CLI's parser (and its subcommands'), caught where ``main`` parses its flags."""
    seen = []

    def grab(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main([])
    out = list(seen)
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += list(action.choices.values())
    return out


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_has_a_meaning_and_a_default(module, monkeypatch):
    for p in parsers(module, monkeypatch):
        text = p.format_help()
        assert "`" not in text and ":func:" not in text, f"{p.prog}: RST markup in --help"
        formatter = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"{p.prog} {a.option_strings or a.dest}: no help"
            if not a.option_strings or a.nargs == 0:
                continue  # positionals; on/off switches (off by default)
            shown = formatter._get_help_string(a)
            assert "default" in shown or a.required, f"{p.prog} {a.option_strings}: {shown!r}"


def test_mlx_lm_names_and_defaults_in_generate(monkeypatch):
    (p,) = parsers("ifp_mlx.apps.generate", monkeypatch)
    text = p.format_help()
    for flag in ("-p PROMPT, --prompt", "-m MAX_TOKENS, --max-tokens", "--system-prompt", "--top-k",
                 "--min-p", "--max-kv-size", "--ignore-chat-template", "--predictor-any"):  # fmt: skip
        assert flag in text, flag
    assert "(default: 512)" in text and "(default: 0.0)" in text  # max tokens, temperature


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ifp_mlx.convert import convert
    from tests.helpers import make_tiny_hf

    root = tmp_path_factory.mktemp("cli")
    convert(make_tiny_hf("llama", root / "hf", seed=6), root / "m", progress=False)
    return root / "m"


def test_generate_flags_do_what_mlx_lm_users_expect(folder, capsys):
    """--system-prompt and --ignore-chat-template shape the prompt as the library would,
    --max-kv-size bounds the cache, -m the answer."""
    import ifp_mlx
    from ifp_mlx.apps import generate

    model, tok = ifp_mlx.load(folder)

    def cli(*flags):
        generate.main(["--model", str(folder), "-p", "w5 w6", "--keep", "0.5", *flags])
        return capsys.readouterr().out.rstrip("\n")

    def lib(prompt, **kw):
        return ifp_mlx.generate(model, tok, prompt, keep=0.5, **kw)

    assert cli("-m", "4") == lib("w5 w6", max_tokens=4)
    with_system = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6"}]
    assert cli("-m", "4", "--system-prompt", "w9") == lib(with_system, max_tokens=4)
    assert cli("-m", "4", "--ignore-chat-template") == lib(tok.encode("w5 w6"), max_tokens=4)
    assert len(tok.encode(cli("-m", "6", "--max-kv-size", "4"), add_special_tokens=False)) <= 6
    for bad, needle in ((["--top-k", "-1"], "--top-k"), (["--min-p", "2"], "--min-p"),
                        (["--max-kv-size", "0"], "--max-kv-size")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli(*bad)
        assert needle in capsys.readouterr().err
