"""Load an ifp-mlx model folder into an mlx-lm model with unit-major FFNs."""

import re
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .errors import IFPError, read_json, write_json
from .model import FORMAT_VERSION, ifp_model_class


def _resolve(path: Union[str, Path]) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not p.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path)))
        except Exception as e:
            raise IFPError(f"cannot download {path}: {str(e).splitlines()[0][:200]}")
    raise IFPError(f"no such model folder: {path}")


def read_ifp_config(path: Path) -> dict:
    config = read_json(path / "config.json")
    ifp = config.get("ifp")
    if not isinstance(ifp, dict):
        raise IFPError(
            f"{path} is not an ifp-mlx model folder (convert it: ifp-convert {path} OUT)"
        )
    if ifp.get("format_version", 0) > FORMAT_VERSION:
        raise IFPError(f"{path} uses ifp format {ifp['format_version']}; upgrade ifp-mlx")
    return config


def load(
    path: Optional[Union[str, Path]] = None, lazy: bool = False
) -> Tuple[nn.Module, TokenizerWrapper]:
    """Load ``(model, tokenizer)`` from an ifp-mlx folder (default: the bundled SmolLM2).

    The model is an mlx-lm model (call it with ``cache=``, pass it to mlx-lm's ``generate``)
    whose FFNs hold the full unit store.
    """
    if path is None:
        from .bundled import default_model

        path = default_model()
    path = _resolve(path)
    ifp_config = read_ifp_config(path)["ifp"]

    def classes(config):
        model_class, args_class = _get_classes(config)
        return ifp_model_class(model_class), args_class

    try:
        model, config = load_model(path, lazy=lazy, get_model_classes=classes)
    except (ValueError, FileNotFoundError) as e:
        raise IFPError(f"cannot load {path}: {str(e).splitlines()[0][:200]}")
    object.__setattr__(model, "_ifp_config", ifp_config)
    budget = ifp_config.get("budget")
    if budget is not None and len(budget) != len(model.ffn_units):
        raise IFPError(
            f"{path}: ifp budget has {len(budget)} layers, the model {len(model.ffn_units)}"
        )
    if ifp_config.get("predictor"):
        from .predictors.learned import load_head

        object.__setattr__(model, "_ifp_predictor", load_head(path, ifp_config["predictor"]))
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def set_ifp_entries(folder: Union[str, Path], **entries) -> None:
    """Set entries of a model folder's ``ifp`` config (None removes one), atomically: the
    predictor and the searched budget live there, beside the model they were made for."""
    path = Path(folder) / "config.json"
    config = read_json(path)
    ifp = config.setdefault("ifp", {})
    for key, value in entries.items():
        if value is None:
            ifp.pop(key, None)
        else:
            ifp[key] = value
    write_json(path, config, indent=4)
