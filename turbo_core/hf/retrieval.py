"""Synthetic long-context recall, generated on the fly (no download), answered greedily.

Two tasks, each at several context lengths:

* **passkey** (Mohtashami & Jaggi, 2023): "The pass key is {N}. Remember it. {N} is the pass
  key." hidden in repeated filler sentences, then "What is the pass
  key? The pass key is";
* **multikey** (RULER's multi-key needle-in-a-haystack): ``needles`` sentences "One of the
  special magic numbers for {key} is: {value}." at evenly spaced depths in held-out text, one of
  them asked for, the others distractors with other keys.

A sample is right when the first number of the greedy continuation equals the value (exact
match). Prompts are built from whole sentences' tokens, so a prompt is at most ``length``
tokens and within a sentence of it. Everything is seeded: the baseline and a variant answer
the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
                 "text. Find it and memorize it. I will quiz you about it.")
KEY_WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
             "juniper", "kestrel", "lagoon", "meadow", "nickel", "onyx", "prairie", "quartz",
             "raven", "sierra", "tundra", "umber", "violet", "willow", "zephyr")
TASKS = ("passkey", "multikey")


@dataclass(frozen=True)
class RetrievalSettings:
    """``lengths``: prompt lengths in tokens (capped at the model's limit); ``samples``: per
    task and length (the needle's depths evenly spaced over all of a task's prompts);
    ``needles``: in the multi-key task, the asked one included."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    samples: int = 1
    needles: int = 4
    max_new_tokens: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 128:
            raise ValueError(f"retrieval lengths must be >= 128 tokens, got {list(self.lengths)}")
        if self.samples < 1 or self.needles < 1 or self.max_new_tokens < 1:
            raise ValueError("retrieval samples, needles and max_new_tokens must be >= 1")


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    depth: float
    answer: str
    ids: list[int] = field(repr=False)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _room(length: int, *fixed: list[int]) -> int:
    """Tokens left for the haystack after the fixed parts; refuses a length they exceed."""
    used = sum(len(x) for x in fixed)
    if used >= length:
        raise ValueError(f"retrieval length {length} is too short: the task's own text takes "
                         f"{used} tokens with this tokenizer")
    return length - used


class _Haystack:
    """Whole sentences, tokenized once, taken in order (cycling) to fill ``n`` tokens."""

    def __init__(self, tokenizer, text: str):
        self.pieces = [_ids(tokenizer, " " + s) for s in _sentences(text)]
        if not self.pieces:
            raise ValueError("retrieval haystack text is empty")
        self.at = 0

    def take(self, n: int) -> list[list[int]]:
        out, have = [], 0
        while True:
            piece = self.pieces[self.at % len(self.pieces)]
            if have + len(piece) > n:
                return out
            out.append(piece)
            have += len(piece)
            self.at += 1


def _assemble(head: list[int], hay: list[list[int]], needles: list[tuple[float, list[int]]],
              tail: list[int]) -> list[int]:
    """``head`` + haystack sentences with each needle inserted at the sentence boundary
    nearest its depth (a fraction of the haystack's tokens) + ``tail``."""
    bounds = [0]
    for piece in hay:
        bounds.append(bounds[-1] + len(piece))
    at: dict[int, list[list[int]]] = {}
    for depth, ids in needles:
        i = min(range(len(bounds)), key=lambda b: abs(bounds[b] - depth * bounds[-1]))
        at.setdefault(i, []).append(ids)
    body: list[int] = []
    for i in range(len(hay) + 1):
        for ids in at.get(i, []):
            body += ids
        if i < len(hay):
            body += hay[i]
    return head + body + tail


def _depths(n: int) -> list[float]:
    return [(i + 0.5) / n for i in range(n)]


def _passkey(tokenizer, length: int, depth: float, rng: random.Random) -> Sample:
    key = str(rng.randint(10000, 99999))
    head = _ids(tokenizer, PASSKEY_INTRO)
    needle = _ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
    tail = _ids(tokenizer, " What is the pass key? The pass key is")
    hay = _Haystack(tokenizer, FILLER).take(_room(length, head, needle, tail))
    return Sample("passkey", length, depth, key, _assemble(head, hay, [(depth, needle)], tail))


def _multikey(tokenizer, hay: _Haystack, length: int, depth: float, needles: int,
              rng: random.Random) -> Sample:
    keys = rng.sample(KEY_WORDS, needles)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    asked = rng.randrange(needles)
    spots = _depths(needles - 1)  # the distractors evenly spaced, the asked one at `depth`
    spots.insert(asked, depth)
    ids = [_ids(tokenizer, f" One of the special magic numbers for {k} is: {v}.")
           for k, v in zip(keys, values, strict=True)]
    q = (f" What is the special magic number for {keys[asked]} mentioned in the provided text? "
         f"The special magic number for {keys[asked]} mentioned in the provided text is")
    tail = _ids(tokenizer, q)
    body = hay.take(_room(length, tail, *ids))
    return Sample("multikey", length, depth, values[asked],
                  _assemble([], body, list(zip(spots, ids, strict=True)), tail))


def make_samples(tokenizer, haystack_text: str, settings: RetrievalSettings,
                 max_length: int | None = None) -> list[Sample]:
    """Every task × length × depth, seeded; lengths above ``max_length`` are capped to it."""
    rng = random.Random(settings.seed)
    lengths = sorted({min(n, max_length) if max_length else n for n in settings.lengths})
    hay = _Haystack(tokenizer, haystack_text)
    out = []
    spread = len(lengths) * settings.samples
    for i, length in enumerate(lengths):
        # depths evenly spaced over all of a task's prompts, interleaved across the lengths
        # (one sample per length still puts needles early, midway and late)
        for j in range(settings.samples):
            depth = (j * len(lengths) + i + 0.5) / spread
            out.append(_passkey(tokenizer, length, depth, rng))
            out.append(_multikey(tokenizer, hay, length, depth, settings.needles, rng))
    return out


def answered(text: str, answer: str) -> bool:
    """Exact match: the first number in the continuation is the answer."""
    m = re.search(r"\d+", text)
    return m is not None and m.group(0) == answer


def run(contender, tokenizer, samples: list[Sample], settings: RetrievalSettings,
        progress: bool = True) -> dict[str, object]:
    """Accuracy of one contender (``turbo_core.hf.contenders``) on ``samples``: overall, per
    task, per length, and each sample's outcome."""
    from turbo_core.hf.contenders import greedy

    rows = []
    for s in tqdm(samples, desc=f"retrieval {contender.name}", unit="prompt", disable=not progress):
        out = tokenizer.decode(greedy(contender, s.ids, settings.max_new_tokens,
                                      tokenizer.eos_token_id), skip_special_tokens=True)
        rows.append({"task": s.task, "length": s.length, "depth": round(s.depth, 3),
                     "tokens": len(s.ids), "answer": s.answer, "output": out.strip()[:40],
                     "correct": answered(out, s.answer)})

    def acc(group: list[dict]) -> float:
        return sum(r["correct"] for r in group) / len(group)

    return {"accuracy": acc(rows),
            "by_task": {t: acc([r for r in rows if r["task"] == t]) for t in TASKS},
            "by_length": {str(n): acc([r for r in rows if r["length"] == n])
                          for n in sorted({r["length"] for r in rows})},
            "samples": rows, "settings": asdict(settings)}


def kept(baseline: dict, variant: dict) -> dict[str, float | int]:
    """Of the prompts the baseline recalls (two ``run`` results on the same samples), the share
    the variant recalls too (1 when the baseline recalls none), their count, and the one-sided
    95 % upper confidence bound on that share, which the recall gate reads (docs/design.md
    §2.4): with 6–8 prompts
    one flip moves the share by 0.12–0.25, and the bound says what the prompts can show."""
    from turbo_core.stats import binomial_upper

    known = [b["correct"] for b in baseline["samples"]]
    hits = sum(b and v["correct"] for b, v in zip(known, variant["samples"], strict=True))
    return {"retrieval_kept": hits / sum(known) if any(known) else 1.0,
            "retrieval_known": sum(known),
            "retrieval_kept_upper": binomial_upper(hits, sum(known))}
