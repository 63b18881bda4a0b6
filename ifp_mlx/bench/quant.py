"""``ifp-bench quant``: unit-major quantization vs mlx-lm's, as held-out text loss of the same
weights (measured side by side in one run)."""

import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..convert import convert
from ..convert.config import fix_config
from ..errors import IFPError
from ..loading import load
from ..metrics import text_loss


def _mlx_lm_quantized(source: Path, out: Path, bits: int, group_size: int):
    """mlx-lm's own ``convert -q`` of the same HF folder (config RoPE fixed the same way)."""
    from mlx_lm import convert as mlx_convert
    from mlx_lm import load as mlx_load

    fixed = out.parent / "hf-fixed"
    fixed.mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.name != "config.json" and not (fixed / f.name).exists():
            (fixed / f.name).symlink_to(f.resolve())
    cfg = fix_config(json.loads((source / "config.json").read_text()))
    (fixed / "config.json").write_text(json.dumps(cfg))
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_convert(
            str(fixed),
            str(out),
            quantize=True,
            q_bits=bits,
            q_group_size=group_size,
            dtype="float32",
        )
    return mlx_load(str(out))


def quant_quality(
    source: Path,
    text: Path,
    bits_list=(4, 8),
    group_size: int = 64,
    max_tokens: int = 2048,
    work: Optional[Path] = None,
) -> dict:
    """Held-out text loss: fp32 vs ifp-mlx unit-major quantization vs mlx-lm's own, same bits."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise IFPError(f"{source} is not a Hugging Face folder with config.json")
    if not Path(text).is_file():
        raise IFPError(f"text file {text} does not exist")
    tmp = Path(work or tempfile.mkdtemp(prefix="ifp-bench-"))
    try:
        t = time.perf_counter()
        convert(source, tmp / "f32", progress=False)
        model, tok = load(tmp / "f32")
        tokens = tok.encode(Path(text).read_text(errors="replace"))[:max_tokens]
        out = {
            "source": source.name,  # names, never a path of this machine
            "text": Path(text).name,
            "tokens": len(tokens),
            "group_size": group_size,
            "loss_fp32": text_loss(model, tokens),
            "rows": [],
        }
        for bits in bits_list:
            q = tmp / f"ifp-q{bits}"
            convert(source, q, quantize=True, q_bits=bits, q_group_size=group_size, progress=False)
            row = {"bits": bits, "loss_ifp": text_loss(load(q)[0], tokens)}
            theirs, _ = _mlx_lm_quantized(source, tmp / f"mlx-lm-q{bits}", bits, group_size)
            row["loss_mlx_lm"] = text_loss(theirs, tokens)
            row["relative_diff"] = row["loss_ifp"] / row["loss_mlx_lm"] - 1
            out["rows"].append(row)
        out["seconds"] = time.perf_counter() - t
        return out
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
