"""GGUF → Hugging Face names, config, tokenizer and float weights, without torch.

Tensors are dequantized by the ``gguf`` package (every llama.cpp type, including the K-quants
that MLX's own GGUF loader lacks). transformers' own GGUF loaders import torch, so we read the
metadata with ``gguf`` and reuse only transformers' torch-free pieces: its GGUF→config key table
and its GGUF tokenizer builder.
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


_READERS: dict = {}


def gguf_reader(path: Path):
    """gguf's reader of ``path``, parsed once per file version: its Python parser takes ~6 s
    over SmolLM2's 49k-token vocabulary and ~16 s over Gemma's 262k, and a conversion asks
    for the parameter count and then the weights. One file is kept (a reader maps it)."""
    from gguf import GGUFReader

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = GGUFReader(str(path))
    return _READERS[key]


def read_gguf(path: Path, progress: Callable = iter) -> Checkpoint:
    try:
        from gguf.quants import dequantize
    except ImportError:
        raise IFPError("reading GGUF needs the 'gguf' package: pip install gguf")
    try:
        reader = gguf_reader(path)
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:
        hint = " (truncated or corrupt: an incomplete download?)" if "reshape" in str(e) else ""
        raise IFPError(f"cannot read {path} as GGUF: {str(e)[:200]}{hint}")
    if arch not in _ARCHS:
        raise IFPError(f"GGUF architecture {arch!r} is not supported (have {sorted(_ARCHS)})")

    try:
        meta = {name: field.contents() for name, field in reader.fields.items()}
        names = {t.name for t in reader.tensors}
    except Exception as e:  # counts or lengths past the file: numpy index/shape errors
        raise IFPError(f"cannot read {path} as GGUF: damaged metadata ({type(e).__name__})")
    config = _gguf_config(meta, arch, tie="output.weight" not in names)
    tokenizer = _gguf_tokenizer(meta, arch)  # now: a broken one fails before any write
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
        tokenizer.save_pretrained(str(dst))

    return Checkpoint(weights, config, tokenizer=write_tokenizer, source=str(path))


_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma2": "gemma2", "mistral": "mistral"}
_GEMMA_27B_LAYERS = {"gemma3": 62, "gemma2": 46}  # llama.cpp's LLM_TYPE_27B by block count


def _gguf_config(meta: dict, arch: str, tie: bool) -> dict:
    """A transformers config dict from GGUF metadata (transformers' key table, its defaults)."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    table = GGUF_CONFIG_MAPPING.get(arch, GGUF_CONFIG_MAPPING["llama"])
    cfg = {"tie_word_embeddings": tie}
    for key, name in table.items():
        if name is not None and f"{arch}.{key}" in meta:
            cfg[name] = meta[f"{arch}.{key}"]
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in meta:
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            cfg[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    if arch in _GEMMA_27B_LAYERS and "head_dim" in cfg:
        # GGUF has no query_pre_attn_scalar; llama.cpp scales by 1/sqrt(head_dim), except at
        # 27B (n_embd / n_head). transformers' default (256) is right only for some sizes.
        big = cfg.get("num_hidden_layers") == _GEMMA_27B_LAYERS[arch]
        heads = cfg.get("num_attention_heads") or 1
        cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if big else cfg["head_dim"]
    model_type = _MODEL_TYPES.get(arch, arch)
    try:
        out = AutoConfig.for_model(model_type, **cfg).to_dict()
    except Exception as e:
        raise IFPError(f"cannot build a {model_type} config from the GGUF metadata: {e}"[:300])
    for key in ("id2label", "label2id", "_name_or_path"):
        out.pop(key, None)
    return out


def _gguf_tokenizer(meta: dict, arch: str):
    """A fast tokenizer (with chat template) from GGUF metadata, via transformers' builder."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    grouped = {
        group: {n: meta[f"tokenizer.{k}"] for k, n in renames.items() if f"tokenizer.{k}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise IFPError("missing tokenizer: the GGUF has no tokenizer.ggml.tokens")
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            n = len(tok_dict["tokens"])
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < n:  # fmt: skip
                raise IFPError(f"damaged GGUF tokenizer: tokenizer.ggml.{key} = {token_id!r} is "
                               f"not a token id of its {n}-token vocabulary")  # fmt: skip
            tok_config[name] = tok_dict["tokens"][token_id]
    # transformers picks the builder by the GGUF architecture ("gemma3": no "▁" before the
    # first word, as add_space_prefix = false says), not by the model type it maps it to
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    except KeyError as e:
        raise IFPError(f"incomplete GGUF tokenizer: no tokenizer.ggml.{e.args[0]}")
    except (ValueError, TypeError, IndexError) as e:
        raise IFPError(f"damaged GGUF tokenizer: {type(e).__name__}: {str(e)[:160]}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
