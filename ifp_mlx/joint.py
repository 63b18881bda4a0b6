"""``ifp-train --stage 1|2``: adapt the LLM and the predictor together (IFPruning's two stages).

The frozen-LLM predictor (stage 0, :mod:`ifp_mlx.train`) can only choose units; a small model
loses much at keep 0.5 even with perfect choices. Here the LLM learns to work under the masks
too, through LoRA adapters (mlx-lm's tuner layers) trained jointly with the predictor head:

- stage 1: plain text (the ShareGPT ``train`` split flattened), mask from a prefix of the text,
  loss on the rest — continued pre-training under masks;
- stage 2: ShareGPT prompt → answer pairs, mask from the prompt — instruction tuning.

Keeps are sampled from a range each step and a share of steps runs dense (keep 1), so one model
serves several keep levels and its dense path stays good. Adapters sit only in the layers after
the predictor's encoder layers: the encoder stays the original model's first layers, so the
prompt features stay valid (and precomputed) while the rest of the model adapts. The result is
a new float model folder with the adapters fused in and the predictor beside it; ``ifp-convert
OUT OUT-q4 --quantize`` requantizes it.
"""

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import save_config

from .errors import IFPError, read_json
from .model import FORMAT_VERSION
from .store import write_model_files
from .train import Example, TrainConfig, Trainer

LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj"]  # fmt: skip


@dataclass
class JointConfig(TrainConfig):
    stage: int = 2
    keep: float = 0.33
    keep_max: Optional[float] = 0.75
    dense_frac: float = 0.2  # share of steps at keep 1 (keeps the dense path good)
    lora_rank: int = 8
    lora_scale: float = 10.0
    lora_lr: float = 1e-4  # adapters move the LLM itself: a smaller step than the head's
    lora_keys: List[str] = field(default_factory=lambda: list(LORA_KEYS))
    prefix: int = 64  # stage 1: tokens of each text the mask is predicted from
    text_tokens: int = 160  # stage 1: tokens per text

    @classmethod
    def preset(cls, name: str, **kw) -> "JointConfig":
        presets = {
            "quick": dict(steps=6, batch=2, n_train=8, n_val=3, max_prompt=32, max_answer=8,
                          val_every=3, prefix=8, text_tokens=24),
            # SmolLM2-135M on a 2-core CPU: 43 minutes for stage 2 (measured, cores shared).
            "cpu": dict(steps=200),
            # What a full run wants: the paper's data scale, a GPU / Mac, distillation.
            "full": dict(steps=20000, batch=32, n_train=200000, n_val=512, max_prompt=512,
                         max_answer=512, text_tokens=1024, prefix=256, distill=1.0,
                         lora_rank=64),
        }  # fmt: skip
        if name not in presets:
            raise IFPError(f"unknown preset {name!r} (have: {', '.join(presets)})")
        return cls(**{**presets[name], **kw})


class _Joint(nn.Module):
    """The head and the model in one tree, so one optimizer updates both (the model's only
    trainable parameters are its LoRA adapters)."""

    def __init__(self, head: nn.Module, model: nn.Module):
        super().__init__()
        self.head = head
        self.model = model


class JointTrainer(Trainer):
    def __init__(self, model, tokenizer, cfg: JointConfig, folder: Path, progress: bool = True):
        if cfg.stage not in (1, 2):
            raise IFPError(f"--stage must be 1 or 2, not {cfg.stage}")
        if not 0.0 <= cfg.dense_frac < 1.0:
            raise IFPError("--dense-frac must be in [0, 1)")
        base_head = model.__dict__.get("_ifp_predictor")
        if cfg.stage == 2 and base_head is None:
            raise IFPError(
                f"stage 2 starts from a predictor and {folder} has none "
                "(train one first: ifp-train, or ifp-train --stage 1)"
            )
        if base_head is not None:  # continue the folder's predictor, with its shape
            cfg.encoder_layers, cfg.hidden = base_head.cfg.encoder_layers, base_head.cfg.hidden
        super().__init__(model, tokenizer, cfg, folder, progress)
        self.base_head = base_head
        n_layers = len(model.layers)
        adapted = n_layers - cfg.encoder_layers
        if adapted < 1:
            raise IFPError("no layers left to adapt after the predictor's encoder layers")
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": 0.0,
                "keys": cfg.lora_keys}  # fmt: skip
        mx.random.seed(cfg.seed)
        try:
            linear_to_lora_layers(model, adapted, lora)
        except ValueError as e:
            raise IFPError(f"cannot add LoRA adapters: {e}")
        model.__dict__.pop("_ifp_ffn_store", None)  # the FFN modules changed: rebuild the IFP store
        self.joint = _Joint(self.head, model)
        self.opt = optim.MultiOptimizer(
            [optim.Adam(learning_rate=cfg.lora_lr), optim.Adam(learning_rate=cfg.lr)],
            [lambda path, _: path.startswith("model.")],
        )
        self.head.cfg.recipe = {"trainer": f"ifp-train --stage {cfg.stage} (joint LoRA)",
                                **asdict(cfg)}  # fmt: skip

    @property
    def trainable(self) -> nn.Module:
        return self.joint

    def examples(self, split: str, n: int) -> List[Example]:
        if self.cfg.stage == 2:
            return super().examples(split, n)
        return text_examples(self.tok, split, n, self.cfg)

    def _fit_features(self) -> None:
        if self.base_head is None:
            return super()._fit_features()
        for k in self.head.STATS:  # the folder's predictor keeps its own
            setattr(self.head, k, getattr(self.base_head, k))

    def _init_head(self) -> None:
        if self.base_head is None:
            return super()._init_head()
        self.head.update(self.base_head.parameters())
        mx.eval(self.head.parameters())

    def _step_keep(self, rng: random.Random) -> float:
        return 1.0 if rng.random() < self.cfg.dense_frac else super()._step_keep(rng)

    def _teacher(self, x: mx.array) -> mx.array:
        """The original model: every adapter switched off for this pass."""
        layers = [m for _, m in self.model.named_modules() if isinstance(m, LoRALinear)]
        scales = [m.scale for m in layers]
        for m in layers:
            m.scale = 0.0
        try:
            return mx.stop_gradient(self.model(x))
        finally:
            for m, s in zip(layers, scales):
                m.scale = s

    def validate(self) -> dict:
        return {**super().validate(), "val_loss_dense": self.val_loss(1.0)}

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {**super()._fingerprint(), "stage": c.stage, "lora_rank": c.lora_rank,
                "lora_keys": c.lora_keys}  # fmt: skip

    def write(self, out: Optional[Path] = None) -> dict:
        """A new model folder: the adapters fused into float weights, the predictor beside."""
        from .convert.readers import copy_tokenizer_files
        from .convert.writer import atomic_folder
        from .errors import set_ifp_entries
        from .predictors.learned import save, weights_of

        if out is None:
            raise IFPError("joint training writes a new model folder: pass --out")
        fused = [(p, m.fuse(dequantize=True)) for p, m in self.model.named_modules()
                 if isinstance(m, LoRALinear)]  # fmt: skip
        self.model.update_modules(tree_unflatten(fused))
        self.model.__dict__.pop("_ifp_ffn_store", None)
        config = read_json(self.folder / "config.json")
        with atomic_folder(Path(out), force=False) as tmp:
            copy_tokenizer_files(self.folder, tmp)
            for k in ("quantization", "quantization_config"):
                config.pop(k, None)
            ifp = config["ifp"]
            ifp.update(dtype="float32", quantization=None, source=f"{self.folder.name} (joint)")
            ifp.pop("budget", None)  # a searched budget belongs to the base model
            ifp.pop("budget_search", None)
            ifp.update(format_version=FORMAT_VERSION, ffn_store=write_model_files(tmp, self.model))
            save_config(config, tmp / "config.json")
            entry = save(self.head, tmp)
            entry["recipe"]["history"] = self.history
            entry["trained_on"] = weights_of(ifp)  # trained together with these weights
            set_ifp_entries(tmp, predictor=entry, training=entry["recipe"])
        return entry


def text_examples(tokenizer, split: str, n: int, cfg: JointConfig) -> List[Example]:
    """Stage 1: plain text (a ShareGPT exchange flattened, no chat template) cut into
    (prefix the mask is predicted from, continuation the loss is on)."""
    from .eval import data

    out = []
    for ex in data.sharegpt(split):
        if len(out) >= n:
            break
        toks = tokenizer.encode(f"{ex.prompt}\n\n{ex.answer}", add_special_tokens=False)
        toks = toks[: cfg.text_tokens]
        if len(toks) >= cfg.prefix + 2:
            out.append((toks[: cfg.prefix], toks[cfg.prefix :]))
    if not out:
        raise IFPError(f"no usable training text in the ShareGPT {split!r} split")
    return out
