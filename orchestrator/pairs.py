"""Preference pairs from judged generations (Self-Rewarding: highest vs lowest mean score)."""

from __future__ import annotations

import statistics

from orchestrator.types import Generation, Judgment, Pair, group_by_prompt


def best_vs_worst(generations: list[Generation], judgments: list[Judgment]) -> tuple[list[Pair], dict[str, int]]:
    """One pair per prompt: the highest-scored response is chosen, the lowest rejected.

    Unscored responses are left out; a prompt with fewer than two scored responses, or whose
    best and worst scores are equal (a tie), yields no pair. Among equal scores the earliest
    sample wins, so the result does not depend on dict or sort stability elsewhere.
    Returns the pairs and the count of prompts dropped for each reason.
    """
    score_of = {(j.prompt_id, j.index): j.score for j in judgments}
    dropped = {"tie": 0, "too_few_scored": 0}
    pairs: list[Pair] = []
    for prompt_id, gens in group_by_prompt(generations).items():
        scored = [(score_of.get((g.prompt_id, g.index)), g) for g in gens]
        scored = [(s, g) for s, g in scored if s is not None]
        if len(scored) < 2:
            dropped["too_few_scored"] += 1
            continue
        best_score, best = max(scored, key=lambda sg: sg[0])
        worst_score, worst = min(scored, key=lambda sg: sg[0])
        if best_score == worst_score:
            dropped["tie"] += 1
            continue
        pairs.append(
            Pair(
                prompt_id=prompt_id,
                messages=best.messages,
                chosen=best.text,
                rejected=worst.text,
                chosen_score=float(best_score),
                rejected_score=float(worst_score),
                chosen_index=best.index,
                rejected_index=worst.index,
            )
        )
    return pairs, dropped


def pair_metrics(pairs: list[Pair], dropped: dict[str, int], num_prompts: int) -> dict[str, float]:
    metrics: dict[str, float] = {
        "pairs/kept": float(len(pairs)),
        "pairs/prompts": float(num_prompts),
        "pairs/kept_rate": len(pairs) / num_prompts if num_prompts else 0.0,
    }
    for reason, count in dropped.items():
        metrics[f"pairs/dropped_{reason}"] = float(count)
    if pairs:
        metrics["pairs/chosen_score_mean"] = statistics.fmean(p.chosen_score for p in pairs)
        metrics["pairs/rejected_score_mean"] = statistics.fmean(p.rejected_score for p in pairs)
        metrics["pairs/score_gap_mean"] = statistics.fmean(p.chosen_score - p.rejected_score for p in pairs)
        metrics["pairs/chosen_chars_mean"] = statistics.fmean(len(p.chosen) for p in pairs)
        metrics["pairs/rejected_chars_mean"] = statistics.fmean(len(p.rejected) for p in pairs)
    return metrics
