"""Check a model folder before loading it: every problem is one ``IFPError`` line naming the
file, what is wrong with it and how to fix it, never a traceback from deep inside a loader.

The most likely real damage is an interrupted copy (a truncated shard), then hand edits of
``config.json``; both are caught here, before mlx-lm or the tokenizer library sees the files.
"""

import json
import math
import numbers
from pathlib import Path
from typing import Callable, Dict

from .errors import IFPError, read_json
from .paths import inside


def _fix(path: Path) -> str:
    return f"reconvert it (ifp-convert SOURCE {path} --force) or copy it again"


def _is_list_of(kind) -> Callable:
    return lambda v: isinstance(v, list) and all(isinstance(x, kind) for x in v)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ifp block entry -> (check, what it must be). Entries not listed are informational.
IFP_TYPES: Dict[str, tuple] = {
    "format_version": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "ffn_units": (_is_list_of(int), "a list of integers"),
    "budget": (lambda v: v is None or (_is_list_of(numbers.Real)(v) and v), "a list of keeps"),
    "quantization": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "ffn_store": (lambda v: v is None or isinstance(v, dict), "an object"),
    "predictor": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "calibration": (lambda v: isinstance(v, dict), "an object"),
    "protect": (lambda v: _is_list_of(int)(v) and len(v) == 2, "[first, last]"),
    "default_max_kl": (lambda v: _number(v) and v > 0, "a positive number"),
    "compensate": (lambda v: isinstance(v, bool), "true or false"),
    "default_predictor": (lambda v: isinstance(v, str), "a predictor name"),
    "rescore": (_count, "a whole number ≥ 0"),
    "dense_head": (_count, "a whole number ≥ 0"),
}


# Sizes a model config may declare: anything beyond is a damaged or hand-edited file, and
# building it would allocate or loop without end instead of failing.
SIZE_LIMITS = {
    "num_hidden_layers": 1_000,
    "hidden_size": 1_000_000,
    "intermediate_size": 10_000_000,
    "num_attention_heads": 10_000,
    "num_key_value_heads": 10_000,
    "head_dim": 100_000,
    "vocab_size": 100_000_000,
    "max_position_embeddings": 100_000_000,
}


# Real-valued entries the model families read as numbers (null: the family's default).
REAL_ENTRIES = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "norm_eps",
                "partial_rotary_factor", "query_pre_attn_scalar", "rope_local_base_freq",
                "attn_logit_softcapping", "final_logit_softcapping")  # fmt: skip


def check_model_config(config: dict, where: str) -> None:
    if not isinstance(config.get("model_type"), str):
        raise IFPError(f"{where}: model_type = {json.dumps(config.get('model_type'))[:40]} is "
                       "not a model family name")  # fmt: skip
    arch = config.get("architectures")
    if arch is not None and not isinstance(arch, str) and not _is_list_of(str)(arch):
        raise IFPError(f"{where}: architectures = {json.dumps(arch)[:40]} is not a list of names")
    for key in REAL_ENTRIES:
        v = config.get(key)
        if v is not None and not (_number(v) and math.isfinite(v)):
            raise IFPError(f"{where}: {key} = {json.dumps(v)[:40]} is not a number")
    for key, limit in SIZE_LIMITS.items():
        v = config.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= limit:
            raise IFPError(f"{where}: {key} = {json.dumps(v)[:40]} is not a plausible model size")


def check_ifp_block(path: Path, ifp: dict) -> None:
    for key, (ok, want) in IFP_TYPES.items():
        if key in ifp and not ok(ifp[key]):
            raise IFPError(
                f"{path / 'config.json'}: ifp.{key} must be {want}, not {json.dumps(ifp[key])[:60]}"
                f"; fix the entry or {_fix(path)}"
            )


def check_safetensors(path: Path, folder: Path) -> None:
    """Header readable and the file exactly as long as the header says (no truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a {type(header).__name__}, not an object")
        offsets = [t.get("data_offsets") if isinstance(t, dict) else None
                   for k, t in header.items() if k != "__metadata__"]  # fmt: skip
        if not all(isinstance(o, list) and len(o) == 2 and all(type(x) is int and x >= 0 for x in o)
                   for o in offsets):  # fmt: skip
            raise ValueError("a tensor's data_offsets are not two byte offsets")
        end = max((o[1] for o in offsets), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise IFPError(f"{path}: not a readable safetensors file ({e}); {_fix(folder)}")
    if 8 + n + end != size:
        raise IFPError(
            f"{path}: {'truncated' if size < 8 + n + end else 'too long'} ({size} bytes, its "
            f"header needs {8 + n + end}): an interrupted copy? {_fix(folder)}"
        )


def check_weight_files(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise IFPError(f"{index}: no weight_map; {_fix(folder)}")
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise IFPError(f"{index}: a weight_map value is not a file name; {_fix(folder)}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not inside(folder, shard, "shard").is_file():
                raise IFPError(f"{index} lists {shard}, which is missing; {_fix(folder)}")
    else:
        shards = sorted(p.name for p in folder.glob("model*.safetensors"))
        if not shards:
            raise IFPError(f"{folder}: no model*.safetensors weights; {_fix(folder)}")
    for shard in shards:
        check_safetensors(folder / shard, folder)


def check_tokenizer_files(folder: Path) -> None:
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise IFPError(
            f"{folder}: missing tokenizer (no tokenizer.json / tokenizer.model); {_fix(folder)}"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            read_json(folder / name, "tokenizer file")


def check_folder(folder: Path, config: dict) -> None:
    """Everything ``load`` reads, checked up front (the unit file checks itself on open)."""
    check_model_config(config, str(folder / "config.json"))
    check_ifp_block(folder, config["ifp"])
    check_weight_files(folder)
    check_tokenizer_files(folder)


def check_vocabulary(folder: Path, tokenizer, vocab_size: int) -> None:
    """A tokenizer whose vocabulary maps words to ids the embedding does not have belongs to
    another model. (Added special tokens past the table, like a pad token some tokenizer
    classes add, are only refused if a prompt produces them: ids are checked per prompt.)"""
    try:
        added = set(tokenizer.get_added_vocab())
        top = max((i for t, i in tokenizer.get_vocab().items() if t not in added), default=-1)
    except Exception:  # a tokenizer without get_vocab: ids are still checked per prompt
        return
    if top >= vocab_size:
        raise IFPError(
            f"{folder}: the tokenizer has token ids up to {top}, the model's vocabulary is "
            f"{vocab_size}: the tokenizer files belong to another model; {_fix(folder)}"
        )
