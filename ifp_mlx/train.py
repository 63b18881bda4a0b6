"""``ifp-train``: fit the learned sparsity predictor against a frozen LLM (IFPruning stage 0).

Each step: the head scores every unit from the prompt features, SoftTopK turns the scores into
per-layer masks (hard top-k forward, soft gradient backward, so training sees exactly the pruned
model inference runs), the frozen LLM runs prompt + answer with its FFN activations multiplied
by the masks, and the loss is the next-token loss of the answer (optionally + KL to the dense
model). Only the head learns; the encoder is the LLM's own first layers, so its prompt
features are computed once up front.
"""

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from .budget import budget_units, check_keep, protected_budget
from .errors import IFPError, read_json, set_ifp_entries
from .model import dequantize, tap_ffns
from .predictors.learned import PredictorConfig, PredictorHead, encode, save, weights_of
from .predictors.softtopk import hard_topk, straight_through
from .selection import mask_diversity

Example = Tuple[List[int], List[int]]  # (prompt tokens, answer tokens)


@dataclass
class TrainConfig:
    keep: float = 0.5
    keep_max: Optional[float] = None  # sample keep uniformly in [keep, keep_max] per step
    steps: int = 300
    batch: int = 4
    lr: float = 1e-3
    tau: float = 0.5  # SoftTopK temperature (scores are z-scored per layer)
    distill: float = 0.0  # weight of KL(dense ‖ pruned) on the answer
    encoder_layers: int = 2
    hidden: int = 128
    n_train: int = 1200
    n_val: int = 24
    max_prompt: int = 128
    max_answer: int = 64
    val_every: int = 50
    seed: int = 0
    init_scale: float = 0.1  # size of the prompt-dependent part of the head at step 0
    oracle: float = 0.0  # weight of fitting each training example's oracle unit importances

    @classmethod
    def preset(cls, name: str, **kw) -> "TrainConfig":
        presets = {
            "quick": dict(steps=6, batch=2, n_train=8, n_val=3, max_prompt=32, max_answer=8,
                          val_every=3),
            # SmolLM2-135M on a 2-core CPU: about 50 minutes (the oracle targets: ~15).
            "cpu": dict(oracle=1.0),
            # What a full run wants: ~20k prompts, longer answers, distillation, a GPU / Mac.
            "full": dict(steps=5000, batch=16, n_train=20000, n_val=256, max_prompt=512,
                         max_answer=256, distill=1.0, oracle=1.0),
        }  # fmt: skip
        if name not in presets:
            raise IFPError(f"unknown preset {name!r} (have: {', '.join(presets)})")
        return cls(**{**presets[name], **kw})


def check(cfg: TrainConfig, units: List[int]) -> None:
    check_keep(cfg.keep)
    if cfg.keep_max is not None and not (cfg.keep <= check_keep(cfg.keep_max)):
        raise IFPError("--keep-max must be ≥ --keep")
    for n in units:
        if round(cfg.keep * n) < 1:
            raise IFPError(f"keep {cfg.keep} rounds to 0 of a layer's {n} units")
    if cfg.oracle < 0:
        raise IFPError("--oracle must be ≥ 0")
    if cfg.steps <= 0 or cfg.batch <= 0 or cfg.n_train <= 0 or cfg.n_val <= 0:
        raise IFPError("steps, batch, n-train and n-val must be positive")


def examples(tokenizer, split: str, n: int, cfg: TrainConfig) -> List[Example]:
    """ShareGPT (prompt, answer) pairs of a split, length-capped, in the split's fixed order."""
    from .eval import data

    # Answers that fit end with the end-of-turn token: the pruned model must also learn to stop
    # (a pruned answer that says "Paris" and then runs on to max_tokens is the failure seen).
    eos = getattr(tokenizer, "eos_token_id", None)
    out, _ = data.chat_pairs(tokenizer, split, n, cfg.max_prompt, cfg.max_answer, end=eos)
    if not out:
        raise IFPError(f"no usable training data in the ShareGPT {split!r} split")
    return out


def _batch(items: List[Example]):
    """Right-padded token batch, answer-position weights and targets."""
    seqs = [p + a for p, a in items]
    T = max(len(s) for s in seqs)
    x = np.zeros((len(items), T), np.int32)
    y = np.zeros((len(items), T - 1), np.int32)
    w = np.zeros((len(items), T - 1), np.float32)
    for i, ((p, a), s) in enumerate(zip(items, seqs)):
        x[i, : len(s)] = s
        y[i, : len(s) - 1] = s[1:]
        w[i, len(p) - 1 : len(s) - 1] = 1.0
    return mx.array(x), mx.array(y), mx.array(w)


def _zlog(s: mx.array) -> mx.array:
    s = mx.log(s + 1e-6)
    return (s - s.mean()) / (s.std() + 1e-6)


def _features(model, items: List[Example], layers: int) -> mx.array:
    feats = [encode(model, p, layers)[0] for p, _ in items]
    out = mx.stack(feats)
    mx.eval(out)
    return out


class Trainer:
    def __init__(self, model, tokenizer, cfg: TrainConfig, folder: Path, progress: bool = True):
        self.model, self.tok, self.cfg, self.folder = model, tokenizer, cfg, Path(folder)
        self.progress = progress
        dequantize(model)  # fp32 training (CPU); the saved model folder is untouched
        model.dense()
        model.freeze()
        units = model.ffn_units
        check(cfg, units)
        hidden_size = int(model.model.embed_tokens.weight.shape[-1])
        pcfg = PredictorConfig(units, hidden_size, cfg.encoder_layers, cfg.hidden)
        protect = model.__dict__.get("_ifp_config", {}).get("protect")
        pcfg.recipe = {"trainer": "ifp-train (frozen LLM)", **asdict(cfg), "protect": protect,
                       "answer_end": True}  # fmt: skip
        mx.random.seed(cfg.seed)
        self.head = PredictorHead(pcfg)
        self.opt = optim.Adam(learning_rate=cfg.lr)
        self.step = 0
        self.history: List[dict] = []

    @property
    def trainable(self) -> nn.Module:
        """What the optimizer updates (the head; joint training adds the LLM's adapters)."""
        return self.head

    # ---- data
    def prepare(self) -> None:
        cfg = self.cfg
        self.train = self.examples("train", cfg.n_train)
        self.val = self.examples("val", cfg.n_val)
        L = cfg.encoder_layers
        self.train_f = _features(self.model, self.train, L)
        self.val_f = _features(self.model, self.val, L)
        self._fit_features()  # also on resume: the statistics are not checkpointed
        self.train_t = self._oracle_targets(self.train) if cfg.oracle else None
        if self.step == 0:
            self._init_head()

    def _fit_features(self) -> None:
        self.head.fit_features(self.train_f)

    def _oracle_targets(self, items: List[Example]) -> mx.array:
        """Per example, the z-scored log importance of every unit over prompt *and* answer (the
        eval's oracle): a dense per-unit target that tells the head which units *this* prompt's
        answer uses, far richer than the answer loss's gradient through a top-k."""
        from .eval.methods import OraclePredictor

        self.model.dense()
        out = []
        for p, a in tqdm(items, desc="oracle targets", disable=not self.progress):
            scores = OraclePredictor(a).score(self.model, p, None).scores
            out.append(mx.concatenate([_zlog(s) for s in scores]))
            mx.eval(out[-1])
        return mx.stack(out)

    def examples(self, split: str, n: int) -> List[Example]:
        return examples(self.tok, split, n, self.cfg)

    def _init_head(self) -> None:
        """Start at static pruning: the output bias holds z-scored calibration importances, so
        step 0 is a sensible mask and training learns the prompt-dependent part."""
        from .eval.methods import static_scores

        calib = [p + a for p, a in self.train[:64]]
        flat = mx.concatenate(
            [(s - s.mean()) / (s.std() + 1e-6) for s in static_scores(self.model, calib)]
        )
        self.head.fc2.bias = flat
        self.head.fc2.weight = self.head.fc2.weight * self.cfg.init_scale
        mx.eval(self.head.parameters())

    # ---- loss
    def _masks(self, scores: List[mx.array], keep: float, hard_only: bool = False):
        # the folder's budget layout: its protected layers stay whole, as they will at inference
        protect = self.model.__dict__.get("_ifp_config", {}).get("protect")
        units = self.model.ffn_units
        ks = budget_units(protected_budget(keep, protect, len(units)), units)
        if hard_only:
            return [hard_topk(s, k)[:, None, :] for s, k in zip(scores, ks)]
        return [straight_through(s, k, self.cfg.tau)[:, None, :] for s, k in zip(scores, ks)]

    def _loss(self, head, feats, x, y, w, keep, dense_logp=None, targets=None):
        scores = self.head(feats)
        masks = self._masks(scores, keep)
        with tap_ffns(self.model, record=False, masks=masks):
            logits = self.model(x)[:, :-1].astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, y) * w
        loss = ce.sum() / w.sum()
        if dense_logp is not None and self.cfg.distill:
            logq = logits - mx.logsumexp(logits, -1, keepdims=True)
            kl = ((mx.exp(dense_logp) * (dense_logp - logq)).sum(-1) * w).sum() / w.sum()
            loss = loss + self.cfg.distill * kl
        if targets is not None:
            loss = loss + self.cfg.oracle * ((mx.concatenate(scores, -1) - targets) ** 2).mean()
        return loss

    def val_loss(self, keep: Optional[float] = None) -> float:
        """Answer loss of the hard-pruned model on the val split (what inference runs)."""
        keep = self.cfg.keep if keep is None else keep
        total, count = 0.0, 0.0
        for i in range(len(self.val)):
            x, y, w = _batch(self.val[i : i + 1])
            masks = self._masks(self.head(self.val_f[i : i + 1]), keep, hard_only=True)
            with tap_ffns(self.model, record=False, masks=masks):
                logits = self.model(x)[:, :-1].astype(mx.float32)
            total += (nn.losses.cross_entropy(logits, y) * w).sum().item()
            count += w.sum().item()
        return total / count

    def mask_diversity(self, keep: Optional[float] = None) -> float:
        """Mean fraction of kept units that differ between two val prompts' masks (0 = the
        predictor ignores the prompt, i.e. collapsed to static)."""
        keep = self.cfg.keep if keep is None else keep
        masks = self._masks(self.head(self.val_f), keep, hard_only=True)
        return mask_diversity(np.array(mx.concatenate([x[:, 0] for x in masks], axis=-1)))

    def validate(self) -> dict:
        return {"val_loss": self.val_loss(), "diversity": self.mask_diversity()}

    def _step_keep(self, rng: random.Random) -> float:
        cfg = self.cfg
        return cfg.keep if cfg.keep_max is None else rng.uniform(cfg.keep, cfg.keep_max)

    def _teacher(self, x: mx.array) -> mx.array:
        """Logits of the dense model the pruned one is distilled towards."""
        return self.model(x)

    # ---- loop
    def run(self, checkpoint: Optional[Path] = None) -> dict:
        cfg = self.cfg
        loss_and_grad = nn.value_and_grad(self.trainable, self._loss)
        if self.step == 0:
            self.history.append({"step": 0, **self.validate()})
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ifp-train", disable=not self.progress)
        tic = time.perf_counter()
        while self.step < cfg.steps:
            rng = random.Random(cfg.seed * 1_000_003 + self.step)  # per step: resumable
            idx = [rng.randrange(len(self.train)) for _ in range(cfg.batch)]
            items = [self.train[i] for i in idx]
            x, y, w = _batch(items)
            feats = self.train_f[mx.array(idx)]
            targets = None if self.train_t is None else self.train_t[mx.array(idx)]
            keep = self._step_keep(rng)
            dense_logp = None
            if cfg.distill:
                d = self._teacher(x)[:, :-1].astype(mx.float32)
                dense_logp = mx.stop_gradient(d - mx.logsumexp(d, -1, keepdims=True))
            loss, grads = loss_and_grad(self.trainable, feats, x, y, w, keep, dense_logp, targets)
            self.opt.update(self.trainable, grads)
            mx.eval(self.trainable.parameters(), self.opt.state, loss)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                rec = {"step": self.step, "train_loss": loss.item(), **self.validate()}
                self.history.append(rec)
                bar.write(f"step {self.step}: " + ", ".join(
                    f"{k.replace('_', ' ')} {v:.4f}" for k, v in rec.items() if k != "step"
                ))  # fmt: skip
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
        bar.close()
        return {"seconds": time.perf_counter() - tic, "history": self.history}

    # ---- checkpoints and output
    def _fingerprint(self) -> dict:
        c = self.head.cfg
        return {"units": c.units, "hidden_size": c.hidden_size,
                "encoder_layers": c.encoder_layers, "hidden": c.hidden}  # fmt: skip

    def save_checkpoint(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.tmp.safetensors"
        arrays = {f"train.{k}": v for k, v in tree_flatten(self.trainable.trainable_parameters())}
        arrays.update(
            {f"opt.{k}": v for k, v in tree_flatten(self.opt.state) if isinstance(v, mx.array)}
        )
        mx.save_safetensors(str(tmp), arrays)
        tmp.replace(folder / "state.safetensors")
        meta = {"step": self.step, "fingerprint": self._fingerprint(), "history": self.history}
        (folder / "meta.tmp.json").write_text(json.dumps(meta))
        (folder / "meta.tmp.json").replace(folder / "meta.json")

    def resume(self, folder: Path) -> None:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = mx.load(str(folder / "state.safetensors"))
        except (OSError, ValueError) as e:
            raise IFPError(f"cannot resume from {folder}: {str(e).splitlines()[0][:160]}")
        if meta.get("fingerprint") != self._fingerprint():
            raise IFPError(f"checkpoint {folder} was made for a different model or predictor shape")
        params = [(k[6:], v) for k, v in arrays.items() if k.startswith("train.")]
        expected = {k for k, _ in tree_flatten(self.trainable.trainable_parameters())}
        if {k for k, _ in params} != expected:
            raise IFPError(f"checkpoint {folder} holds other parameters than this training")
        self.trainable.load_weights(params, strict=False)
        opt = [(k[4:], v) for k, v in arrays.items() if k.startswith("opt.")]
        state = dict(tree_unflatten(opt)) if opt else {}
        state["step"] = mx.array(meta["step"], mx.uint64)
        state["learning_rate"] = mx.array(self.cfg.lr)
        self.opt.state = state
        self.step = meta["step"]
        self.history = meta.get("history", [])

    def write(self) -> dict:
        """Save the head beside the model and point the folder's ``ifp`` config at it."""
        entry = save(self.head, self.folder)
        entry["recipe"]["history"] = self.history
        entry["trained_on"] = weights_of(read_json(self.folder / "config.json")["ifp"])
        set_ifp_entries(self.folder, predictor=entry)
        return entry
