"""Load an ifp-mlx model folder into an mlx-lm model with unit-major FFNs."""

from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .errors import IFPError, looks_like_repo_id, read_json
from .model import FORMAT_VERSION, exact_embed_scale, find_ffns, to_unit_major
from .paths import check_file, check_files
from .selection import IFPMixin
from .store import (
    FileSpec,
    FlashStore,
    UnitFile,
    build,
    install,
    layer_modules,
    template,
    unit_arrays,
)
from .validate import check_folder, check_ifp_block, check_vocabulary

FFN_STORES = ("memory", "flash", "auto")
_CLASSES = {}


def ifp_model_class(base: type) -> type:
    """The mlx-lm ``Model`` class ``base`` with unit-major FFNs (built once per family)."""
    if base not in _CLASSES:

        def __init__(self, args):
            base.__init__(self, args)
            to_unit_major(self)

        _CLASSES[base] = type(f"IFP{base.__name__}", (IFPMixin, base), {"__init__": __init__})
    return _CLASSES[base]


def _without_units(model: nn.Module, spec: FileSpec, path: Path) -> nn.Module:
    """Shape the model's FFNs as the unit file declares (quantized or not) and take their
    per-unit arrays out (never evaluated, so never allocated): mlx-lm then loads and checks
    exactly the other weights, and the units come from the store."""
    ffns = find_ffns(model)
    if [p for p, _ in ffns] != [layer.path for layer in spec.layers]:
        raise IFPError(f"{path}: ifp.ffn_store does not describe this model's FFN layers")
    templates = []
    for (name, mlp), layer in zip(ffns, spec.layers):
        for proj, q in layer.quantization.items():
            if q is not None and "scales" not in getattr(mlp, proj):
                setattr(mlp, proj, getattr(mlp, proj).to_quantized(**q))
        expected = {f.name: f.shape for f in layer.fields}
        have = {n: tuple(a.shape[1:]) for n, a in unit_arrays(layer_modules(mlp))}
        if have != expected or mlp.gate_proj.weight.shape[0] != layer.units:
            raise IFPError(f"{path}: ifp.ffn_store does not match the model config at {name}")
        templates.append(template(layer_modules(mlp)))
        install(mlp, templates[-1])
    object.__setattr__(model, "_ifp_templates", templates)
    return model


def _resolve(path: Union[str, Path]) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if looks_like_repo_id(str(path)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path)))
        except Exception as e:
            raise IFPError(f"cannot download {path}: {str(e).splitlines()[0][:200]}")
    names = f" (bundled models: {', '.join(_NAMED[1])})" if _NAMED else ""
    raise IFPError(f"no such model folder: {path}{names}")


# Names that stand for folders (the bundled models, converted on first use). The package root
# wires ``bundled`` in here: this module cannot import it (bundled converts with the converter,
# which loads ifp folders with this module).
_NAMED: Optional[Tuple[Callable, Sequence[str]]] = None


def register_names(resolve: Callable, names: Sequence[str]) -> None:
    """``resolve(model)``: None or a name → its folder; anything else unchanged."""
    global _NAMED
    _NAMED = (resolve, list(names))


def read_ifp_config(path: Path, name: Optional[str] = None) -> dict:
    """The folder's config with its ``ifp`` block; ``name`` is how the user named it (a hub
    repo id resolves to a cache folder, but the advice should repeat the id)."""
    name = name or str(path)
    config = read_json(path / "config.json")
    ifp = config.get("ifp")
    if not isinstance(ifp, dict):
        raise IFPError(
            f"{name} is not an ifp-mlx model folder (convert it: ifp-convert {name} OUT)"
        )
    check_ifp_block(path, ifp)
    if ifp.get("format_version", 0) > FORMAT_VERSION:
        raise IFPError(f"{path} uses ifp format {ifp['format_version']}; upgrade ifp-mlx")
    return config


def load(
    path: Optional[Union[str, Path]] = None,
    lazy: bool = False,
    ffn_store: str = "memory",
    distributed: bool = False,
    shard_policy: str = "global",
    verify_store: bool = False,
    predictor_any: bool = False,
) -> Tuple[nn.Module, TokenizerWrapper]:
    """Load ``(model, tokenizer)`` from an ifp-mlx folder (default: the bundled SmolLM2).

    The model is an mlx-lm model (call it with ``cache=``, pass it to mlx-lm's ``generate``).
    ``ffn_store="memory"`` reads every FFN unit now; ``"flash"`` reads none: each ``select``
    reads only the kept units from the folder's unit file (``dense()`` reads them all; a
    forward pass without either streams each layer's units through memory). ``"auto"`` (what
    the CLIs and the server use) is flash where the folder has a unit file, else memory: a
    pruned model then peaks below the same weights dense. Training, calibration and direct
    mlx-lm use want every unit resident: the library's default stays ``"memory"``.

    ``distributed=True`` (every rank of an ``mlx.launch`` job calls it): this rank holds its
    share of attention heads and of every FFN layer's units (``ifp_mlx.distributed``);
    ``shard_policy`` is ``"global"`` (the single-machine selection) or ``"balanced"`` (equal
    kept units per rank).

    ``verify_store=True`` reads the unit file once and checks each layer's CRC-32 (written at
    convert time) before the load: damage at rest is found then, not as garbage answers. A
    file changed after the load is caught at the next select without it.

    A learned predictor trained on other weights than the folder's (another bit width, another
    source) is refused: the load fails with one line when it is the folder's default
    predictor, else asking for it does. ``predictor_any=True`` uses it anyway.
    """
    if ffn_store not in FFN_STORES:
        raise IFPError(f"ffn_store must be one of {', '.join(FFN_STORES)}, not {ffn_store!r}")
    if distributed:
        from .distributed import check_policy

        check_policy(shard_policy)
    if _NAMED is not None:
        path = _NAMED[0](path)
    name = str(path)
    path = _resolve(path)
    full_config = read_ifp_config(path, name)
    check_folder(path, full_config)
    ifp_config = full_config["ifp"]
    spec = None
    if ifp_config.get("ffn_store") is not None:
        spec = FileSpec.from_dict(ifp_config["ffn_store"], path)
    if ffn_store == "auto":
        ffn_store = "flash" if spec is not None else "memory"
    if spec is None and ffn_store == "flash":
        raise IFPError(
            f"{path} was converted before the flash FFN store existed; reconvert it "
            "(ifp-convert SOURCE OUT) to use --ffn-store flash, or use --ffn-store memory"
        )
    if spec is None and distributed:
        raise IFPError(
            f"{path} was converted before the FFN unit file existed; reconvert it "
            "(ifp-convert SOURCE OUT) to shard it over ranks"
        )
    check_files(path, path.glob("*.safetensors"))  # nothing outside the folder, no FIFOs
    if spec is not None:
        check_file(path, path / spec.file, "FFN unit file")
    units = UnitFile(path, spec) if spec is not None else None  # validated before the load
    if verify_store:
        if units is None:
            raise IFPError(f"{path} has no FFN unit file to verify (reconvert it)")
        units.verify()
    group = None
    if distributed:
        from .distributed import connect

        group = connect()

    def classes(config):
        model_class, args_class = _get_classes(config)
        cls = ifp_model_class(model_class)
        if spec is None:
            return cls, args_class
        return (lambda args: _without_units(cls(args), spec, path)), args_class

    try:
        model, config = load_model(path, lazy=lazy, get_model_classes=classes)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, TypeError) as e:
        raise IFPError(f"cannot load {path}: {str(e).splitlines()[0][:200]}")
    exact_embed_scale(model)
    object.__setattr__(model, "_ifp_config", ifp_config)
    head = None
    if ifp_config.get("predictor"):
        from .predictors.learned import foreign, load_head

        reason = None if predictor_any else foreign(ifp_config["predictor"], ifp_config)
        if reason is None:
            head = load_head(path, ifp_config["predictor"])
            object.__setattr__(model, "_ifp_predictor", head)
        else:
            refused = (f"{path}: {reason}; retrain it for these weights (ifp-train --model "
                       f"{path}) or use it anyway with --predictor-any")  # fmt: skip
            if ifp_config.get("default_predictor", "learned") == "learned":
                raise IFPError(refused)
            object.__setattr__(model, "_ifp_foreign_predictor", refused)
    if group is not None:
        from .distributed import same_everywhere, shard_model, sync_seed

        same_everywhere(group, [int(spec.id[i : i + 4], 16) for i in range(0, 16, 4)],
                        "the model (its FFN unit file differs)")  # fmt: skip
        shard_model(model, units, group, shard_policy)
        sync_seed(group)
    layers = len(find_ffns(model))
    if head is not None and not 0 <= head.cfg.encoder_layers < layers:
        raise IFPError(f"{path}: the learned predictor reads {head.cfg.encoder_layers} encoder "
                       f"layers; this model has {layers}: retrain it (ifp-train)")  # fmt: skip
    if units is not None:
        _attach_units(model, units, ffn_store, head)
    if head is not None and list(head.cfg.units) != model.ffn_units:
        raise IFPError(
            f"{path}: the learned predictor was made for another model ({len(head.cfg.units)} "
            f"FFN layers of {head.cfg.units[0]} units; this model: {len(model.ffn_units)} of "
            f"{model.ffn_units[0]}); retrain it: ifp-train"
        )
    budget = ifp_config.get("budget")
    if budget is not None and len(budget) != len(model.ffn_units):
        raise IFPError(
            f"{path}: ifp budget has {len(budget)} layers, the model {len(model.ffn_units)}"
        )
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # the tokenizer libraries raise anything on a damaged file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise IFPError(
            f"{path}: cannot load the tokenizer ({first}); reconvert the folder or copy its "
            "tokenizer files again"
        )
    check_vocabulary(path, tokenizer, model.vocab_size)
    return model, tokenizer


def _attach_units(model: nn.Module, units: UnitFile, ffn_store: str, head) -> None:
    """Memory: read every unit into the FFN modules. Flash: keep the file open; only a learned
    predictor's encoder layers are read now (they run dense for every prompt)."""
    templates = model.__dict__.pop("_ifp_templates")
    mlps = [m for _, m in find_ffns(model)]
    if ffn_store == "memory":
        for i, (mlp, tmpl) in enumerate(zip(mlps, templates)):
            install(mlp, build(tmpl, units.read(i)))
            mx.eval(mlp.parameters())
        units.close()
        return
    resident = range(head.cfg.encoder_layers) if head is not None else ()
    store = FlashStore(units, templates, resident)
    model._ifp_attach(store, mlps, "dense")
    model.release()
