"""RIP: Rejecting Instruction Preferences (Yu et al. 2025; algorithms.md 7.5).

A pair is kept only if all three hold, each threshold a percentile over the round's pairs:
rejected score >= tau1, rejected length >= tau2, score gap (chosen - rejected) <= tau3. The paper's
best setting is the 50th percentile on all three. Low-scored or short rejected responses and huge
gaps mark prompts too easy to teach anything, or broken.

Deviation: the paper scores responses with a reward model or a 0-10 judge averaged over 10 runs and
filters prompts before sampling the training set; here the scores are the round's own judge
scores and the filter runs on the round's pairs. Length is in characters (the paper: tokens).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from orchestrator.plugins import StageContext
from orchestrator.types import Pair


class RIPFilter:
    def __init__(self, rejected_score_pct: float, rejected_length_pct: float, gap_pct: float):
        for key, value in (("rejected_score_pct", rejected_score_pct), ("rejected_length_pct", rejected_length_pct), ("gap_pct", gap_pct)):
            if not 0 <= float(value) <= 100:
                raise ValueError(f"{key}={value!r} is not a percentile in [0, 100]")
        self.pcts = (float(rejected_score_pct), float(rejected_length_pct), float(gap_pct))

    def __call__(self, ctx: StageContext, pairs: list[Pair]) -> tuple[list[Pair], dict[str, float]]:
        if not pairs:
            return [], {"rip/in": 0.0, "rip/kept": 0.0}
        score_t = float(np.percentile([p.rejected_score for p in pairs], self.pcts[0]))
        length_t = float(np.percentile([float(len(p.rejected)) for p in pairs], self.pcts[1]))
        gap_t = float(np.percentile([p.chosen_score - p.rejected_score for p in pairs], self.pcts[2]))
        kept: list[Pair] = []
        failed = {"rejected_score": 0, "rejected_length": 0, "gap": 0}
        for p in pairs:
            checks = {
                "rejected_score": p.rejected_score >= score_t,
                "rejected_length": len(p.rejected) >= length_t,
                "gap": p.chosen_score - p.rejected_score <= gap_t,
            }
            for key, ok in checks.items():
                failed[key] += not ok
            if all(checks.values()):
                kept.append(replace(p, meta={**p.meta, "rip": {"kept": True}}))
        metrics = {
            "rip/in": float(len(pairs)),
            "rip/kept": float(len(kept)),
            "rip/threshold_rejected_score": score_t,
            "rip/threshold_rejected_chars": length_t,
            "rip/threshold_gap": gap_t,
            **{f"rip/failed_{k}": float(v) for k, v in failed.items()},
        }
        return kept, metrics
