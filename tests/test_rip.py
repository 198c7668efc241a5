"""The RIP filter (algorithms.md 7.5) on pairs whose thresholds can be worked out by hand."""

from __future__ import annotations

import random

import pytest

from orchestrator.filters.rip import RIPFilter
from orchestrator.plugins import StageContext
from orchestrator.types import Pair


def pair(i: int, rejected_score: float, rejected_chars: int, gap: float) -> Pair:
    return Pair(prompt_id=f"p{i}", messages="q", chosen="c", rejected="r" * rejected_chars,
                chosen_score=rejected_score + gap, rejected_score=rejected_score)


CTX = StageContext(name="rip", round=None, rng=random.Random(0))  # RIP needs neither workers nor the round


def test_keeps_only_pairs_passing_all_three_median_thresholds():
    pairs = [
        pair(0, 3.0, 300, 0.5),  # passes all three
        pair(1, 1.0, 300, 0.5),  # low rejected score
        pair(2, 3.0, 10, 0.5),  # short rejected response
        pair(3, 3.0, 300, 3.0),  # gap too large
        pair(4, 3.0, 300, 0.5),  # exactly at every median: kept (>=, >=, <=)
    ]
    kept, m = RIPFilter(50, 50, 50)(CTX, pairs)
    assert [p.prompt_id for p in kept] == ["p0", "p4"]
    assert (m["rip/threshold_rejected_score"], m["rip/threshold_rejected_chars"], m["rip/threshold_gap"]) == (3.0, 300.0, 0.5)
    assert m["rip/failed_rejected_score"] == 1 and m["rip/failed_rejected_length"] == 1 and m["rip/failed_gap"] == 1
    assert all(p.meta["rip"]["kept"] for p in kept)


def test_percentile_zero_and_hundred_keep_everything():
    pairs = [pair(i, float(i), 10 * (i + 1), float(5 - i)) for i in range(5)]
    kept, _ = RIPFilter(0, 0, 100)(CTX, pairs)
    assert len(kept) == 5


@pytest.mark.parametrize("bad", [-1, 101])
def test_percentiles_are_checked(bad):
    with pytest.raises(ValueError, match="not a percentile"):
        RIPFilter(bad, 50, 50)
