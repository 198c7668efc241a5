"""Planted-noise preference pairs for the pair-filter tests (UPO, CRM).

Every pair's true order is known: the better response contains "Paris", the worse one "London"
instead, the rest random words of the same count (so length and vocabulary give nothing away; the
same rule tests/test_reward_model.py shows a tiny random model learns). A known share of the pairs
then has chosen and rejected swapped, marked ``meta.planted_flip`` (filters copy it into their
decision records). A filter removes noise when the flipped share among the pairs it keeps is clearly
below the share among all pairs, and below what keeping the same number of pairs at random gives.
"""

from __future__ import annotations

import random
import statistics

from orchestrator import chat
from orchestrator.types import Pair

WORDS = "the quick brown fox jumps over lazy dog a helpful assistant answers question clearly and politely".split()


def planted_pairs(n: int, flip_rate: float, seed: int, tag: str = "p") -> list[Pair]:
    """``n`` pairs, exactly ``round(flip_rate * n)`` of them (chosen at random) with chosen and rejected swapped."""
    rng = random.Random(seed)
    flipped = set(rng.sample(range(n), round(flip_rate * n)))
    out = []
    for i in range(n):
        good, bad = rng.sample(WORDS, 6), rng.sample(WORDS, 6)
        good.insert(rng.randrange(7), "Paris")
        bad.insert(rng.randrange(7), "London")
        chosen, rejected = (" ".join(bad), " ".join(good)) if i in flipped else (" ".join(good), " ".join(bad))
        out.append(Pair(
            prompt_id=f"{tag}{i}", messages=chat.user(f"Tell me about item {i}."), chosen=chosen, rejected=rejected,
            chosen_score=4.0, rejected_score=2.0, chosen_index=0, rejected_index=1, meta={"planted_flip": i in flipped},
        ))  # fmt: skip
    return out


def flipped_share(pairs: list[Pair]) -> float:
    if not pairs:
        raise ValueError("no pairs")
    return sum(bool(p.meta["planted_flip"]) for p in pairs) / len(pairs)


def random_keep(pairs: list[Pair], k: int, trials: int = 2000, seed: int = 0) -> dict[str, float]:
    """The flipped share among ``k`` pairs kept at random: mean and 1st percentile over ``trials`` draws."""
    rng = random.Random(seed)
    flags = [bool(p.meta["planted_flip"]) for p in pairs]
    shares = sorted(sum(rng.sample(flags, k)) / k for _ in range(trials))
    return {"mean": statistics.fmean(shares), "p01": shares[int(0.01 * trials)]}
