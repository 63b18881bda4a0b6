"""The conversion pipeline: read → map names → fix config → unit-major FFN → (permute) →
(quantize) → write atomically."""

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import (
    _get_classes,
    get_total_parameters,
    quantize_model,
    save_config,
)
from tqdm import tqdm

from ..errors import IFPError, looks_like_repo_id, read_json
from ..model import FORMAT_VERSION, find_ffns, to_unit_major
from ..paths import check_file
from ..store import write_model_files
from .config import fix_config
from .gguf_reader import read_gguf
from .layout import calibration_activations, coactivation_order, permute_units
from .readers import (
    TORCH_SUFFIXES,
    Checkpoint,
    _weight_files,
    copy_tokenizer_files,
    read_folder,
    read_state_dict,
)
from .writer import atomic_folder, check_output

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
Q_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
Q_GROUP_SIZES = (32, 64, 128)


@dataclass
class Summary:
    output: str
    model_type: str
    params: int
    bytes: int
    dtype: str
    bits: Optional[int]
    group_size: Optional[int]
    seconds: float

    def line(self) -> str:
        q = f"{self.bits}-bit g{self.group_size}" if self.bits else self.dtype
        return (
            f"converted {self.model_type}: {self.params / 1e6:.1f}M params, "
            f"{self.bytes / 2**20:.1f} MiB, {q}, {self.seconds:.1f} s -> {self.output}"
        )


def _bar(progress: bool, desc: str):
    return lambda it: tqdm(it, desc=desc, disable=not progress, leave=False, unit="t")


def read_source(
    source: Union[str, Path],
    config: Optional[Path] = None,
    revision: Optional[str] = None,
    progress: bool = True,
) -> Checkpoint:
    """Dispatch on what ``source`` is: folder, GGUF, bare state dict, or hub repo id."""
    path = Path(source)
    bar = _bar(progress, "read")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return read_gguf(check_file(path, ggufs[0], "GGUF file"), bar)
        return read_folder(path, bar)
    if path.is_file():
        if path.suffix == ".gguf":
            return read_gguf(path, bar)
        if path.suffix in TORCH_SUFFIXES + (".safetensors",):
            return read_state_dict(path, config)
        raise IFPError(
            f"unknown input type {path.name} (want a folder, .gguf, .safetensors, .bin, .pt)"
        )
    if looks_like_repo_id(str(source)):
        return read_folder(_download(str(source), revision), bar)
    raise IFPError(f"no such file or folder: {source}")


def source_parameters(source: Union[str, Path]) -> int:
    """Parameters in a local checkpoint, from file headers only (0 when unknown): the output
    size is checked against free space before the model is read."""
    path = Path(source)
    try:
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").exists() and len(ggufs) == 1:
                path = ggufs[0]
            else:
                return sum(_file_parameters(f) for f in _weight_files(path))
        return _file_parameters(path) if path.is_file() else 0
    except Exception:  # an estimate only: the reader reports what is wrong with the source
        return 0


def _file_parameters(path: Path) -> int:
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= path.stat().st_size - 8:
                return 0  # garbled: the reader says so
            header = json.loads(f.read(n))
        return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    if path.suffix == ".gguf":
        from .gguf_reader import gguf_reader

        return sum(int(t.n_elements) for t in gguf_reader(path).tensors)
    return path.stat().st_size // 4 if path.suffix in TORCH_SUFFIXES else 0


def _download(repo: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    try:  # honours HF_HOME, HF_HUB_OFFLINE (no network when the cache has it) and revisions
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):  # an older repo: torch pickles only
            pickles = patterns + ["*.bin", "*.pt", "*.pth"]
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=pickles))
        return folder
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise IFPError(f"cannot get {repo} from the hub or its cache: {first}")


def build_model(config: dict) -> nn.Module:
    from ..validate import check_model_config

    check_model_config(config, "config")
    try:
        model_class, args_class = _get_classes(config)
    except ValueError:
        raise IFPError(
            f"unknown model_type {config.get('model_type')!r}: mlx-lm has no such family"
        )
    try:
        return model_class(args_class.from_dict(config))
    except Exception as e:
        raise IFPError(
            f"config does not describe a valid {config['model_type']} model: {e!r}"[:300]
        )


def check_weights(model: nn.Module, weights: dict) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in expected:
            raise IFPError(
                f"unexpected tensor {name!r} for this {type(model).__module__.split('.')[-1]} config"
            )
        if tuple(w.shape) != tuple(expected[name].shape):
            raise IFPError(
                f"tensor shape mismatch: {name} is {tuple(w.shape)} in the checkpoint, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    missing = [n for n in expected if n not in weights]
    if missing:
        raise IFPError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")


def keep_source_quantization(model: nn.Module, source: dict) -> None:
    """A quantized source's own tensors wherever its layout is ours (attention, embeddings,
    gate/up: quantized along the input), so they are not quantized twice; only the FFN
    down projections, unit-major here, are requantized."""
    downs = tuple(f"{path}.down_proj." for path, _ in find_ffns(model))
    updates = []
    for name, value in tree_flatten(model.parameters()):
        src = source.get(name)
        if name.startswith(downs) or src is None or src.shape != value.shape:
            continue
        same_kind = mx.issubdtype(src.dtype, mx.floating) == mx.issubdtype(value.dtype, mx.floating)
        if same_kind:
            updates.append((name, src.astype(value.dtype)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def _nearest_quantization(q: dict):
    """The source's bits and group size, or the nearest this layout supports."""
    bits = q.get("bits") if q.get("bits") in Q_BITS else (8 if (q.get("bits") or 4) > 4 else 4)
    group = q.get("group_size") if q.get("group_size") in Q_GROUP_SIZES else 64
    return bits, group


def _check_options(dtype: str, quantize: bool, q_bits: int, q_group_size: int) -> None:
    if dtype not in DTYPES:
        raise IFPError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize and q_bits not in Q_BITS:
        raise IFPError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, not {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise IFPError(f"--q-group-size must be 32, 64 or 128, not {q_group_size}")


def _calibration_tokens(path: Path, tokenizer_dir: Path, max_tokens: int = 512):
    from mlx_lm.utils import load_tokenizer

    if not Path(path).is_file():
        raise IFPError(f"calibration text {path} does not exist")
    text = Path(path).read_text(errors="replace").strip()
    if not text:
        raise IFPError(f"calibration text {path} is empty")
    tokens = load_tokenizer(tokenizer_dir).encode(text)[:max_tokens]
    if len(tokens) < 8:
        raise IFPError(f"calibration text {path} is too short ({len(tokens)} tokens)")
    return tokens


def _write_tokenizer(ckpt: Checkpoint, tokenizer: Optional[Path], dst: Path) -> None:
    src = tokenizer if tokenizer is not None else ckpt.tokenizer
    if callable(src):
        src(dst)
    elif src is None:
        raise IFPError("missing tokenizer: pass --tokenizer FOLDER")
    else:
        copy_tokenizer_files(Path(src), dst)


def convert(
    source: Union[str, Path],
    output: Union[str, Path],
    *,
    config: Optional[Union[str, Path]] = None,
    tokenizer: Optional[Union[str, Path]] = None,
    dtype: str = "float32",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_down_bits: Optional[int] = None,
    permute_units_text: Optional[Union[str, Path]] = None,
    force: bool = False,
    revision: Optional[str] = None,
    progress: bool = True,
    predictor: Optional[Union[str, Path]] = None,
    predictor_config: Optional[Union[str, Path]] = None,
) -> Summary:
    """Convert a checkpoint into an ifp-mlx model folder. Returns a :class:`Summary`."""
    start = time.perf_counter()
    output = Path(output)
    _check_options(dtype, quantize, q_bits, q_group_size)
    if q_down_bits is not None and (not quantize or q_down_bits not in Q_BITS):
        raise IFPError(f"--q-down-bits needs -q and must be one of {', '.join(map(str, Q_BITS))}")
    bits = (q_bits + 2 * 32 / q_group_size) if quantize else 8 * DTYPES[dtype].size
    check_output(output, force, int(1.05 * source_parameters(source) * bits / 8))
    if predictor is not None and permute_units_text is not None:
        raise IFPError("--predictor cannot be combined with --permute-units (unit order differs)")
    if predictor is not None and predictor_config is None:
        raise IFPError("--predictor needs --predictor-config (a JSON with encoder_layers, hidden)")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise IFPError(f"--tokenizer {tokenizer} is not a folder")

    ckpt = read_source(source, Path(config) if config else None, revision, progress)
    if ckpt.quantization and not quantize:  # a quantized mlx-lm folder stays quantized
        quantize, q_bits, q_group_size = True, *_nearest_quantization(ckpt.quantization)
        if q_bits == 4 and q_down_bits is None:  # its down_proj requantized at 8 bits keeps
            q_down_bits = 8  # the source's quality (README: 4-bit requantization costs 1.6 %)
    cfg = fix_config(ckpt.config)
    model = build_model(cfg)
    weights = model.sanitize(ckpt.weights) if hasattr(model, "sanitize") else ckpt.weights
    check_weights(model, weights)
    target = DTYPES[dtype]
    weights = {
        k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()))
    del weights, ckpt.weights
    mx.eval(model.parameters())
    ffn_paths = to_unit_major(model)
    if not ffn_paths:
        raise IFPError(f"{cfg['model_type']} has no gate/up/down FFN that ifp-mlx can slice")

    with atomic_folder(output, force) as tmp:
        _write_tokenizer(ckpt, Path(tokenizer) if tokenizer else None, tmp)
        if permute_units_text is not None:
            tokens = _calibration_tokens(Path(permute_units_text), tmp)
            acts = calibration_activations(model, tokens)
            bar = _bar(progress, "permute")
            permute_units(model, [coactivation_order(a) for a in bar(acts)])
        quant = None
        if quantize:

            def predicate(path: str, _module):
                # down_proj carries what the dropped units no longer add: more bits there
                # (--q-down-bits 8) is the knob that compounds least with pruning
                if q_down_bits is not None and path.endswith("down_proj"):
                    return {"bits": q_down_bits, "group_size": q_group_size}
                return True

            with contextlib.redirect_stdout(io.StringIO()):
                model, cfg = quantize_model(
                    model, cfg, q_group_size, q_bits, quant_predicate=predicate
                )
            if ckpt.quantized and ckpt.quantization == {"bits": q_bits, "group_size": q_group_size}:
                keep_source_quantization(model, ckpt.quantized)
            quant = {"bits": q_bits, "group_size": q_group_size, "mode": "affine"}
            if q_down_bits is not None:
                quant["down_proj_bits"] = q_down_bits
        cfg["ifp"] = {
            "format_version": FORMAT_VERSION,
            "ffn_layout": "unit-major",
            "down_proj": "stored (units, hidden); quantized along hidden",
            # ffn_store (below): the FFN units live in a unit-bundled file, not safetensors
            "ffn_units": [m.gate_proj.weight.shape[0] for _, m in find_ffns(model)],
            "dtype": dtype,
            "quantization": quant,
            "permuted_units": permute_units_text is not None,
            # an ifp-mlx folder converted again names the checkpoint it came from
            "source": ckpt.config.get("ifp", {}).get("source") or Path(str(source)).name,
        }
        if predictor is None and ckpt.predictor is not None and permute_units_text is None:
            from ..predictors.learned import load_head, save, weights_of

            source_ifp = read_json(ckpt.predictor / "config.json")["ifp"]
            head = load_head(ckpt.predictor, source_ifp["predictor"])
            cfg["ifp"]["predictor"] = save(head, tmp)  # still trained on the source's weights
            cfg["ifp"]["predictor"]["trained_on"] = source_ifp["predictor"].get(
                "trained_on", weights_of(source_ifp)
            )
            if source_ifp.get("training"):
                cfg["ifp"]["training"] = source_ifp["training"]
        if predictor is not None:
            from ..predictors.learned import save, weights_of
            from .predictor import import_predictor

            hidden_size = int(cfg["hidden_size"])
            head = import_predictor(
                predictor, predictor_config, cfg["ifp"]["ffn_units"], hidden_size
            )
            cfg["ifp"]["predictor"] = save(head, tmp)
            cfg["ifp"]["predictor"]["trained_on"] = weights_of(cfg["ifp"])  # the user says so
        cfg["ifp"]["ffn_store"] = write_model_files(tmp, model)
        save_config(cfg, tmp / "config.json")
        params = dict(tree_flatten(model.parameters()))
        n_bytes = sum(v.nbytes for v in params.values())
        n_params = get_total_parameters(model)

    return Summary(
        str(output),
        cfg["model_type"],
        n_params,
        n_bytes,
        dtype,
        q_bits if quantize else None,
        q_group_size if quantize else None,
        time.perf_counter() - start,
    )
