"""Does a learned predictor use the prompt? (``python experiments/prompt_ablation.py MODEL_DIR``)

Compares, on the ``ifp-eval`` chat prompts (ShareGPT ``test``, 16), the predictor's per-prompt
masks with the one mask it gives the *mean* features of 64 training prompts, used for every
prompt. Equal losses mean the predictor collapsed to a static mask.

Feeds docs/evaluation.md (does the learned predictor use the prompt).
"""

import sys

import mlx.core as mx

import ifp_mlx
from ifp_mlx.eval import data
from ifp_mlx.eval.methods import Method
from ifp_mlx.eval.metrics import answer_loss
from ifp_mlx.model import dequantize
from ifp_mlx.predictors.learned import encode


def main(folder: str) -> None:
    model, tok = ifp_mlx.load(folder)
    dequantize(model)
    head = model.__dict__["_ifp_predictor"]
    pairs, _ = data.chat_pairs(tok, "test", 16, 192, 96)
    train, _ = data.chat_pairs(tok, "train", 64, 128, 64)
    feats = mx.stack([encode(model, p, head.cfg.encoder_layers)[0] for p, _ in train]).mean(0)
    mean_prompt = Method("static", model, list)
    mean_prompt._static = [s[0] for s in head(feats[None])]  # one subset for every prompt
    learned = Method("ifp-learned", model, list)
    for keep in (0.5, 0.33):
        print(
            f"keep {keep}: per-prompt {answer_loss(learned, pairs, keep):.3f}, "
            f"mean-prompt mask {answer_loss(mean_prompt, pairs, keep):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
