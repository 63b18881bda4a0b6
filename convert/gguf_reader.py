"""GGUF → Hugging Face names and float weights, with numpy only (no torch).

Tensors are dequantized by the ``gguf`` package (every llama.cpp type, including the K-quants
that MLX's own GGUF loader lacks). The config and tokenizer come from transformers' public GGUF
support (``AutoConfig``/``AutoTokenizer`` with ``gguf_file=``), which reads metadata only.
"""

import re
from pathlib import Path
from typing import Callable, Dict

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from .readers import Checkpoint

_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma puts the pre-FFN norm under ffn_norm and stores every norm as (1 + w).
_GEMMA_BLOCK = {**_BLOCK, "ffn_norm": "pre_feedforward_layernorm"}
_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2"}
_PERMUTED_QK = {"llama", "mistral"}  # llama.cpp interleaves q/k rows for its RoPE


def hf_name(gguf_name: str, arch: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    table = _GEMMA_BLOCK if arch.startswith("gemma") else _BLOCK
    if not m or m.group(2) not in table:
        raise IFPError(f"GGUF tensor {gguf_name!r} has no known mapping for {arch}")
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{suffix}"


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave (transformers does the same on GGUF load)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, progress: Callable = iter) -> Checkpoint:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise IFPError("reading GGUF needs the 'gguf' package: pip install gguf")
    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:
        raise IFPError(f"cannot read {path} as GGUF: {str(e)[:200]}")
    if arch not in _ARCHS:
        raise IFPError(f"GGUF architecture {arch!r} is not supported (have {sorted(_ARCHS)})")

    config = _gguf_config(path)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    weights: Dict[str, mx.array] = {}
    for t in progress(reader.tensors):
        name = hf_name(t.name, arch)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute_qk(w, heads if "q_proj" in name else kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1.0
        weights[name] = mx.array(w)

    def write_tokenizer(dst: Path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(dst))

    return Checkpoint(weights, config, tokenizer=write_tokenizer, source=str(path))


def _gguf_config(path: Path) -> dict:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except Exception as e:
        raise IFPError(f"cannot read the config of {path.name}: {str(e)[:200]}")
    for key in ("_name_or_path", "_model_name_or_path", "id2label", "label2id"):
        cfg.pop(key, None)
    return cfg
