"""Checkpoint readers: each returns ``Checkpoint(weights, config, tokenizer)``.

Weights come back as ``name -> mx.array`` in the checkpoint's own (Hugging Face) names and
dtypes; mlx-lm's ``sanitize`` maps them later. Pickles are read with
``torch.load(weights_only=True)`` only, so a checkpoint can never run code.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from ..errors import IFPError, read_json
from ..paths import check_file, check_files, inside

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    weights: Dict[str, mx.array]
    config: dict
    # Either a folder holding tokenizer files, or a callable that writes them into a folder.
    tokenizer: Optional[object] = None
    source: str = ""
    predictor: Optional[Path] = None  # an ifp-mlx source folder whose predictor carries over
    quantization: Optional[dict] = None  # a quantized source's bits / group_size (mlx-lm)
    quantized: Optional[dict] = None  # and its own quantized tensors


def read_config(path: Path) -> dict:
    config = read_json(path)
    if "model_type" not in config:
        raise IFPError(f"config {path} has no 'model_type'")
    return config


def _torch_to_mx(t) -> mx.array:
    import torch

    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def load_torch_file(path: Path) -> Dict[str, mx.array]:
    """A plain tensor state dict, refusing anything that is not just tensors."""
    try:
        import torch
    except ImportError:
        raise IFPError(
            f"reading {path.name} needs torch: pip install 'ifp-mlx[torch]' "
            "(safetensors and GGUF inputs do not)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        import pickle

        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            raise IFPError(
                f"cannot read {path} as a tensor state dict: it pickles Python objects beyond "
                "tensors, which could run code when loaded; ifp-convert never executes a "
                "checkpoint. Re-save its tensors (safetensors) with the program that made it"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IFPError(f"cannot read {path} as a tensor state dict: {first[:200]}")
    if isinstance(obj, dict) and len(obj) == 1:
        inner = next(iter(obj.values()))
        if isinstance(inner, dict):  # {"state_dict": {...}} / {"model": {...}}
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise IFPError(f"{path} holds a {type(obj).__name__}, not a tensor state dict")
    out = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise IFPError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = _torch_to_mx(t)
    return out


def load_safetensors_file(path: Path) -> Dict[str, mx.array]:
    try:
        return dict(mx.load(str(path)))
    except Exception as e:
        raise IFPError(f"cannot read {path} as safetensors: {str(e)[:200]}")


def load_weight_file(path: Path) -> Dict[str, mx.array]:
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    if path.suffix in TORCH_SUFFIXES:
        return load_torch_file(path)
    raise IFPError(f"unknown weight file type: {path.name}")


def _weight_files(folder: Path) -> List[Path]:
    """Weight files of an HF folder, preferring safetensors, honouring shard indexes; every
    file inside the folder and a regular file (``ifp_mlx.paths``)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = json.loads(index.read_text())["weight_map"].values()
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as e:  # fmt: skip
                raise IFPError(f"garbled shard index {index}: {type(e).__name__} {e}")
            if not all(isinstance(n, str) for n in names):
                raise IFPError(f"garbled shard index {index}: a weight_map value is not a file name")  # fmt: skip
            shards = [inside(folder, n, "shard") for n in sorted(set(names))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise IFPError(f"{index} lists missing shard {missing[0]}")
            return shards
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
        if (folder / name).exists():
            return [check_file(folder, folder / name, "weight file")]
    singles = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES
    )
    if not singles:
        raise IFPError(f"no weights in {folder} (expected *.safetensors or pytorch_model.bin)")
    return check_files(folder, singles)


def read_folder(folder: Path, progress: Callable = iter) -> Checkpoint:
    """A Hugging Face style folder: config.json + weights (+ tokenizer files)."""
    config = read_config(folder / "config.json")
    if "ifp" in config:
        return read_ifp_folder(folder)
    if isinstance(config.get("quantization"), dict):
        return read_mlx_lm_folder(folder, config)
    weights: Dict[str, mx.array] = {}
    for f in progress(_weight_files(folder)):
        weights.update(load_weight_file(f))
    return Checkpoint(weights, config, tokenizer=folder, source=str(folder))


def read_ifp_folder(folder: Path) -> Checkpoint:
    """An ifp-mlx model folder (e.g. one ``ifp-train --stage`` wrote): float weights in the
    Hugging Face orientation, so the folder converts again (say, to 4-bit) like any checkpoint."""
    from mlx.utils import tree_flatten

    from ..loading import load
    from ..model import dequantize, find_ffns

    model, _ = load(folder, predictor_any=True)  # its weights only
    dequantize(model)
    weights = dict(tree_flatten(model.parameters()))
    for path, _ in find_ffns(model):  # unit-major (units, hidden) back to (hidden, units)
        key = f"{path}.down_proj.weight"
        weights[key] = weights[key].T
    config = read_config(folder / "config.json")
    has_predictor = bool(config["ifp"].get("predictor"))
    return Checkpoint(weights, config, folder, str(folder), folder if has_predictor else None)


def read_mlx_lm_folder(folder: Path, config: dict) -> Checkpoint:
    """A quantized folder made by mlx-lm (``mlx_lm.convert -q``, mlx-community models):
    loaded by mlx-lm itself, dequantized to float. Its ``down_proj`` groups run along the FFN
    units, so a unit is no row gather there: the converter requantizes it unit-major (by
    default at the source's bits and group size; the README gives the measured cost)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    try:
        model, _ = load_model(folder)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise IFPError(f"cannot load {folder} as an mlx-lm model folder: {first}")
    packed = dict(tree_flatten(model.parameters()))  # kept where the layouts agree
    weights = dict(tree_flatten(dequantize_model(model).parameters()))
    q = config["quantization"]
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    ckpt = Checkpoint(weights, config, tokenizer=folder, source=str(folder))
    ckpt.quantization = {"bits": q.get("bits"), "group_size": q.get("group_size")}
    ckpt.quantized = packed
    return ckpt


def read_state_dict(path: Path, config_path: Optional[Path]) -> Checkpoint:
    """A bare state dict file (.pt/.pth/.bin/.safetensors) plus a config.json."""
    if config_path is None:
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise IFPError(
                f"missing config: {path.name} is a bare state dict, pass --config config.json"
            )
    config = read_config(config_path)
    return Checkpoint(
        load_weight_file(path), config, tokenizer=config_path.parent, source=str(path)
    )


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists() and check_file(src, src / name, "tokenizer file").is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise IFPError(
            f"missing tokenizer: no tokenizer.json / tokenizer.model / vocab.json in {src} "
            "(pass --tokenizer FOLDER)"
        )
    return copied
