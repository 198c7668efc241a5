"""Self-Instruct prompt synthesis: new prompts from few-shot demonstrations, filtered and deduplicated.

Yuan et al. generate each round's prompts 8-shot (6 seed + 2 earlier model-written prompts,
T=0.6, top_p=0.9) with Self-Instruct's template and filters (ROUGE-L similarity, banned
keywords, length). The paper uses a fixed Llama-2-Chat 70B for this; we use the current policy,
which the paper's appendix allows (deviation noted in conf/data/seed.yaml).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

HEADER = "Come up with a series of tasks:\n\n"
_WORD = re.compile(r"[a-z0-9]+")
_SPACE = re.compile(r"\s+")


def one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def few_shot_prompt(demos: Sequence[str]) -> str:
    """The Self-Instruct completion prompt: numbered tasks, ending at the next task's number."""
    body = "".join(f"Task {i}: {one_line(d)}\n\n" for i, d in enumerate(demos, 1))
    return f"{HEADER}{body}Task {len(demos) + 1}:"


def pick_demos(
    rng: random.Random, seed: Sequence[str], generated: Sequence[str], shots_seed: int, shots_generated: int
) -> list[str]:
    """``shots_seed`` seed prompts plus up to ``shots_generated`` earlier generated ones, shuffled.

    While fewer generated prompts exist than asked for, seed prompts fill the gap (as at round 1).
    """
    n_gen = min(shots_generated, len(generated))
    n_seed = min(shots_seed + shots_generated - n_gen, len(seed))
    demos = rng.sample(list(seed), n_seed) + rng.sample(list(generated), n_gen)
    rng.shuffle(demos)
    return demos


def clean_candidate(text: str) -> str:
    """Cut a completion at the next numbered task and strip list debris."""
    text = re.split(r"\n\s*\n|\bTask \d+\s*:", text, maxsplit=1)[0]
    return one_line(text).strip(" -*\"'")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 between two token lists (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


class PromptFilter:
    """Self-Instruct's filters; remembers what it kept so later candidates are checked against it."""

    def __init__(self, existing: Sequence[str], rouge_l_max: float, min_words: int, max_words: int, banned: Sequence[str]):
        self.rouge_l_max = rouge_l_max
        self.min_words = min_words
        self.max_words = max_words
        self.banned = [re.compile(rf"\b{re.escape(k.lower())}\b") for k in banned]
        self.kept_tokens = [tokens(t) for t in existing]
        self.seen = {one_line(t).lower() for t in existing}

    def reason(self, text: str) -> str | None:
        """Why ``text`` is rejected, or None if it passes (and is then remembered)."""
        words = tokens(text)
        # Self-Instruct drops instructions that start with punctuation or non-English text; we
        # also drop any with control or replacement characters (broken decoding).
        if not text or not (text[0].isascii() and text[0].isalnum()) or not text.isprintable() or "\ufffd" in text:
            return "format"
        if len(words) < self.min_words or len(words) > self.max_words:
            return "length"
        lowered = text.lower()
        if any(p.search(lowered) for p in self.banned):
            return "keyword"
        if lowered in self.seen:
            return "duplicate"
        if any(rouge_l(words, kept) > self.rouge_l_max for kept in self.kept_tokens):
            return "similar"
        self.seen.add(lowered)
        self.kept_tokens.append(words)
        return None
