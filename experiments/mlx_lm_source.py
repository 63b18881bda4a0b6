"""An mlx-lm 4-bit folder as ifp-convert's source: what requantizing its down_proj unit-major
costs, and what the alternative (selecting at the source's group granularity) would cost.

    python experiments/mlx_lm_source.py HF_FP32_FOLDER  # writes results/mlx-lm-source-smollm2.json

1. mlx_lm.convert -q (4-bit, g64, float32) of SmolLM2's fp32 folder: the source.
2. Held-out text loss (Shakespeare, 2048 tokens): the source through mlx_lm.load, ifp-convert of
   it (attention/embeddings/gate/up kept as the source's own tensors; down_proj requantized
   along hidden at 4 bits, or at 8 bits with -q --q-down-bits 8), and fp32 for reference.
3. The native-layout alternative keeps down_proj's groups along the units, so selection could
   only keep whole groups of 64 units: its cost is measured as KL to the dense model at keep 0.5
   (activation predictor) with block=64 vs block=1 selection, over 8 held-out chat prompts.

Feeds docs/converting.md (an mlx-lm quantized folder as the source).
"""

import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm import convert as mlx_lm_convert
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.eval import data
from ifp_mlx.eval.metrics import continue_logits, kl_agreement
from ifp_mlx.metrics import text_loss


def block_kl(model, tok, prompts, block: int) -> float:
    kls = []
    for prompt in prompts:
        model.dense()
        answer = [int(t) for (t, _), _ in zip(generate_step(mx.array(prompt), model), range(24))]
        dense = continue_logits(model, make_prompt_cache(model), 0, prompt, answer)
        cache = make_prompt_cache(model)
        sel = model.select(prompt, keep=0.5, block=block, cache=cache)
        pruned = continue_logits(model, cache, sel.prefilled, prompt, answer)
        kls.append(kl_agreement(dense, pruned)[0])
    model.dense()
    return sum(kls) / len(kls)


def main(hf: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mlx-lm-source-"))
    mlx_lm_convert(hf, str(tmp / "mlx-q4"), quantize=True, q_group_size=64, q_bits=4,
                   dtype="float32")  # fmt: skip
    convert(tmp / "mlx-q4", tmp / "ifp-q4", progress=False)
    convert(tmp / "mlx-q4", tmp / "ifp-q4d8", quantize=True, q_bits=4, q_group_size=64,
            q_down_bits=8, progress=False)  # fmt: skip
    convert(hf, tmp / "ifp-f32", progress=False)
    # mlx-lm reads no transformers-5 rope_parameters: give it the theta, or the source would
    # look worse than it is (ifp-convert maps them itself)
    cfg = json.loads((tmp / "mlx-q4" / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    src, tok = mlx_lm_load(str(tmp / "mlx-q4"), model_config={"rope_theta": theta})
    text = next(iter(data.shakespeare_text().values()))
    tokens = tok.encode(text)[:2048]
    out = {"source": "SmolLM2-135M-Instruct fp32 -> mlx_lm.convert -q (4-bit, g64)",
           "text_tokens": len(tokens), "loss": {"mlx-lm source": text_loss(src, tokens)}}  # fmt: skip
    for name in ("ifp-q4", "ifp-q4d8", "ifp-f32"):
        model, _ = ifp_mlx.load(tmp / name)
        out["loss"][name] = text_loss(model, tokens)
    model, tok = ifp_mlx.load(tmp / "ifp-q4")
    pairs, _ = data.chat_pairs(tok, "test", 8, 256, 64)
    prompts = [p for p, _ in pairs]
    out["kl_keep_0.5"] = {f"block {b}": block_kl(model, tok, prompts, b) for b in (1, 64)}
    Path("results/mlx-lm-source-smollm2.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
