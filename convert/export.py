"""``ifp-convert FOLDER --to-mlx-lm OUT``: an ifp-mlx folder as a plain mlx-lm folder (dense).

Everything but the FFN down projections is written as it is (quantized tensors bit for bit).
Our down projections are unit-major and quantized along the hidden dimension, a layout mlx-lm
has no module for; they are written dequantized and transposed back to ``(hidden, units)``,
marked unquantized in the config's per-layer ``quantization`` entries. So ``mlx_lm.load`` runs
exactly the dense model ifp-mlx runs (same values; only the matmul order of down_proj differs).
"""

from pathlib import Path
from typing import Union

from ..errors import IFPError, read_json


def to_mlx_lm(folder: Union[str, Path], out: Union[str, Path], force: bool = False) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, save_config

    from ..bundled import model_path
    from ..loading import load
    from ..model import find_ffns
    from ..store import save_weights
    from .readers import copy_tokenizer_files
    from .writer import atomic_folder, check_output

    folder = model_path(folder)
    if not (Path(folder) / "config.json").is_file() or "ifp" not in read_json(
        Path(folder) / "config.json"
    ):
        raise IFPError(f"{folder} is not an ifp-mlx model folder (--to-mlx-lm exports one)")
    model, _ = load(folder, predictor_any=True)  # memory store: every unit resident
    model.dense()
    total = get_total_parameters(model)
    config = read_json(Path(folder) / "config.json")
    check_output(Path(out), force, sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    weights = dict(tree_flatten(model.parameters()))
    quant = config.get("quantization")
    for path, mlp in find_ffns(model):
        down = mlp.down_proj
        if "scales" in down:
            down = down.dequantized()
            for k in ("scales", "biases"):
                weights.pop(f"{path}.down_proj.{k}", None)
        weights[f"{path}.down_proj.weight"] = mx.contiguous(down.weight.T)
        if isinstance(quant, dict):
            quant[f"{path}.down_proj"] = False  # written in float: mlx-lm leaves it so
    config.pop("ifp")
    config.pop("quantization_config", None)
    with atomic_folder(Path(out), force) as tmp:
        copy_tokenizer_files(Path(folder), tmp)
        save_weights(tmp, weights, total)
        save_config(config, tmp / "config.json")
    return Path(out)
