"""Answer-level quality: free-running greedy answers, pruned vs the same model dense.

Teacher-forced KL scores each token given the *dense* model's history; a user reads answers
the pruned model wrote itself, where errors compound. These metrics compare whole answers:

- ``ends``: of the answers dense ends before the token limit, the share the pruned model ends;
- ``right``: on short questions with gold answers, the share of dense-correct questions the
  pruned model still gets right (absolute accuracies are reported too);
- ``loops``: the share of answers that repeat themselves (:func:`loops`);
- ``length_ratio``: pruned answer tokens / dense answer tokens (summed);
- ``first_sentence`` / ``f1``: agreement with dense's whole answer on open prompts (exact
  first sentence; bag-of-words F1 as in SQuAD);
- ``time_ratio``: wall time to a complete answer (selection + prefill + decode, to the end of
  turn or the limit), pruned / dense, measured alternately in one run: the speed a user feels.
"""

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import IFPError

DATA = Path(__file__).resolve().parent.parent / "data" / "short_answers.json"
SALT = "ifp-mlx-answers-v1"
LOOP_N, LOOP_TIMES = 4, 3  # an answer loops when a word 4-gram occurs 3 or more times


@dataclass
class Question:
    id: str
    q: str
    need: List[List[str]]  # every group must appear; any alternative of a group counts


def split_of(question: str) -> str:
    """``calib`` or ``test``: a fixed hash of the question text (half each)."""
    h = int(hashlib.sha256(f"{SALT}:{question}".encode()).hexdigest()[:8], 16)
    return "calib" if h % 2 == 0 else "test"


def short_answers(split: Optional[str] = None) -> List[Question]:
    """The bundled short-answer questions (``ifp_mlx/data/short_answers.json``), one split."""
    if split not in (None, "calib", "test"):
        raise IFPError(f"unknown split {split!r} (have: calib, test)")
    items = json.loads(DATA.read_text())["questions"]
    out = []
    for it in items:
        uid = hashlib.sha256(it["q"].encode()).hexdigest()[:10]
        if split is None or split_of(it["q"]) == split:
            out.append(Question(uid, it["q"], it["need"]))
    return out


def words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def is_right(text: str, need: Sequence[Sequence[str]]) -> bool:
    """Every group of ``need`` appears in ``text`` as a whole word or phrase (case-insensitive,
    a plural ``s``/``es`` allowed)."""

    def found(alt: str) -> bool:
        pattern = r"(?<!\w)" + re.escape(alt.lower()) + r"(?:s|es)?(?!\w)"
        return re.search(pattern, text.lower()) is not None

    return all(any(found(a) for a in group) for group in need)


def max_repeats(text: str, n: int = LOOP_N) -> int:
    """How often the most frequent word ``n``-gram of ``text`` occurs."""
    w = words(text)
    grams = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return max(grams.values(), default=0)


def loops(text: str, n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """An answer *loops* when some run of ``n`` words occurs ``times`` or more times in it:
    "It's a French capital, but it's not a French capital. You're looking for a French
    capital..." does; a list whose items share one word does not."""
    return max_repeats(text, n) >= times


def first_sentence(text: str) -> str:
    """Up to the first ``.``/``!``/``?`` before a space, or the first line break."""
    text = text.strip().split("\n", 1)[0]
    m = re.search(r"[.!?](\s|$)", text)
    return " ".join((text[: m.start() + 1] if m else text).split())


def token_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two answers (1.0 for two empty answers)."""
    wa, wb = Counter(words(a)), Counter(words(b))
    if not wa and not wb:
        return 1.0
    common = sum((wa & wb).values())
    if not common:
        return 0.0
    p, r = common / sum(wa.values()), common / sum(wb.values())
    return 2 * p * r / (p + r)


@dataclass
class Answer:
    text: str
    tokens: int
    ended: bool  # the model ended its turn before the limit
    seconds: float  # call to last token: selection, prefill and decode
    keep: float = 1.0


def answer(model, tokenizer, prompt, max_tokens: int, **kw) -> Answer:
    """One greedy answer through the runtime (``ifp_mlx.stream_generate``), timed."""
    from ..generate import stream_generate

    tic = time.perf_counter()
    text, last = "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw):
        text += r.text
        last = r
    seconds = time.perf_counter() - tic
    if last is None:
        return Answer("", 0, False, seconds)
    return Answer(
        text, last.generation_tokens, last.finish_reason == "stop", seconds, last.ifp.keep
    )


@dataclass
class AnswerMetrics:
    n: int = 0
    ends: float = 1.0  # of the answers dense ends, the share this setting ends too
    right: float = 1.0  # of the questions dense gets right, the share this setting gets right
    accuracy: float = 0.0  # share of all questions right
    dense_accuracy: float = 0.0
    loops: float = 0.0  # share of answers that loop
    dense_loops: float = 0.0
    length_ratio: float = 1.0  # answer tokens / dense's (summed)
    time_ratio: float = 1.0  # seconds to a complete answer / dense's (summed)
    first_sentence: float = 1.0  # share whose first sentence equals dense's
    f1: float = 1.0  # mean bag-of-words F1 to dense's answer
    keep: float = 1.0  # mean kept share of FFN units
    ids: List[str] = field(default_factory=list)


def compare(
    dense: Sequence[Answer],
    pruned: Sequence[Answer],
    needs: Optional[Sequence[Sequence[Sequence[str]]]] = None,
    ids: Sequence[str] = (),
) -> AnswerMetrics:
    """Answer metrics of ``pruned`` against ``dense`` (same prompts, same order); ``needs``
    (gold answers) adds ``right`` and the accuracies."""
    if len(dense) != len(pruned) or not dense:
        raise IFPError("compare needs the same non-empty prompts answered by both")
    n = len(dense)
    ended = [i for i, d in enumerate(dense) if d.ended]
    m = AnswerMetrics(n=n, ids=list(ids))
    m.ends = sum(pruned[i].ended for i in ended) / len(ended) if ended else 1.0
    m.loops = sum(loops(p.text) for p in pruned) / n
    m.dense_loops = sum(loops(d.text) for d in dense) / n
    m.length_ratio = sum(p.tokens for p in pruned) / max(1, sum(d.tokens for d in dense))
    m.time_ratio = sum(p.seconds for p in pruned) / max(1e-9, sum(d.seconds for d in dense))
    m.first_sentence = (
        sum(first_sentence(p.text) == first_sentence(d.text) for d, p in zip(dense, pruned)) / n
    )
    m.f1 = sum(token_f1(p.text, d.text) for d, p in zip(dense, pruned)) / n
    m.keep = sum(p.keep for p in pruned) / n
    if needs is not None:
        dr = [is_right(d.text, g) for d, g in zip(dense, needs)]
        pr = [is_right(p.text, g) for p, g in zip(pruned, needs)]
        m.dense_accuracy, m.accuracy = sum(dr) / n, sum(pr) / n
        both = [i for i in range(n) if dr[i]]
        m.right = sum(pr[i] for i in both) / len(both) if both else 1.0
    return m


def run_settings(
    model,
    tokenizer,
    prompts: Sequence,
    settings: Dict[str, dict],
    max_tokens: int,
    progress=None,
) -> Dict[str, List[Answer]]:
    """Answer every prompt with every setting (``stream_generate`` keyword sets; include
    ``"dense": {"keep": 1.0}``), settings alternating per prompt so that drifts in the
    machine's speed hit all of them alike. A warm-up answer runs first."""
    if prompts:
        for kw in settings.values():
            answer(model, tokenizer, prompts[0], 2, **kw)
    out: Dict[str, List[Answer]] = {name: [] for name in settings}
    for i, prompt in enumerate(prompts):
        names = list(settings) if i % 2 == 0 else list(reversed(settings))
        for name in names:
            out[name].append(answer(model, tokenizer, prompt, max_tokens, **settings[name]))
        if progress is not None:
            progress(i + 1, len(prompts))
    return out


def to_dict(m: AnswerMetrics) -> dict:
    return asdict(m)
