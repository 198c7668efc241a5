"""Preference pairs from judged generations (Self-Rewarding: highest vs lowest mean score), EVOLVE's
direct and refinement pairs from refinement chains (``chain_pairs``), and ALMA's best-of-N
selection with its DPO pairs, best vs a random other response (``best_of_n``, ``best_vs_random``)."""

from __future__ import annotations

import dataclasses
import random
import statistics
from typing import Callable, Mapping

from orchestrator.chat import Messages
from orchestrator.refine import Chain
from orchestrator.types import Demonstration, Generation, Judgment, Pair, group_by_prompt


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


def _scored(generations: list[Generation], judgments: list[Judgment]) -> dict[str, list[tuple[float, Generation]]]:
    """Per prompt (first-seen order), its scored generations as (score, generation); unscored ones left out."""
    score_of = {(j.prompt_id, j.index): j.score for j in judgments}
    out: dict[str, list[tuple[float, Generation]]] = {}
    for prompt_id, gens in group_by_prompt(generations).items():
        out[prompt_id] = [(s, g) for g in gens if (s := score_of.get((g.prompt_id, g.index))) is not None]
    return out


def best_of_n(generations: list[Generation], judgments: list[Judgment]) -> tuple[list[Demonstration], dict[str, int]]:
    """Per prompt, its highest-scored response as a demonstration (ALMA's D_r), ``score`` and
    ``source`` (the checkpoint that wrote it) kept. Among equal scores the earliest sample wins; a
    blank response is never picked (it would teach the model to stop at once); a prompt with no
    scored, non-blank response gives none. Returns the demonstrations and the dropped counts."""
    kept, dropped = [], {"unscored": 0}
    for prompt_id, scored in _scored(generations, judgments).items():
        scored = [(s, g) for s, g in scored if g.text.strip()]
        if not scored:
            dropped["unscored"] += 1
            continue
        score, best = max(scored, key=lambda sg: sg[0])
        kept.append(Demonstration(prompt_id=prompt_id, messages=best.messages, response=best.text, score=float(score),
                                  source=best.source))
    return kept, dropped


def best_vs_random(
    generations: list[Generation], judgments: list[Judgment], rng: random.Random
) -> tuple[list[Pair], dict[str, int]]:
    """ALMA's DPO pairs: per prompt the best response (as ``best_of_n`` picks it) chosen, and one
    drawn at random from those scored strictly lower rejected (the paper's best construction of
    three). A prompt whose scored responses all tie with the best, or with fewer than two scored,
    gives no pair. ``meta`` names both responses' checkpoints."""
    pairs, dropped = [], {"tie": 0, "too_few_scored": 0}
    for prompt_id, scored in _scored(generations, judgments).items():
        if len(scored) < 2:
            dropped["too_few_scored"] += 1
            continue
        best_score, best = max(scored, key=lambda sg: sg[0])
        lower = [(s, g) for s, g in scored if s < best_score]
        if not lower:
            dropped["tie"] += 1
            continue
        score, other = rng.choice(lower)
        pairs.append(Pair(
            prompt_id=prompt_id, messages=best.messages, chosen=best.text, rejected=other.text, chosen_score=float(best_score),
            rejected_score=float(score), chosen_index=best.index, rejected_index=other.index,
            meta={"chosen_source": best.source, "rejected_source": other.source},
        ))
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


# -- refinement chains (EVOLVE) ------------------------------------------------------------------
SELECTIONS = ("judge", "rule")
KINDS = ("direct", "refine")


def select_from_chain(chain: Chain, selection: str, rule_min_gain: float | None) -> tuple[Pair | None, str | None]:
    """The (chosen, rejected) answers of one chain as a direct pair on x, or (None, why it is dropped).

    ``judge``: the best vs the worst answer of the chain by judge score, as ``best_vs_worst`` picks
    them among a prompt's samples (unscored answers left out; a tie or fewer than two scored answers
    give no pair). ``rule``: the final refinement y_K chosen, the direct answer y_0 rejected, kept
    only when both are scored and score(y_K) - score(y_0) >= ``rule_min_gain`` (the consistency
    check; None: no check, the rule alone). Either way a pair whose two answers are the same text
    is dropped ("identical"): it carries no preference.
    """
    if selection == "judge":
        gens = [Generation(prompt_id=chain.prompt_id, messages=chain.messages, index=k, text=t, num_tokens=0)
                for k, t in enumerate(chain.texts)]
        judgments = [Judgment(prompt_id=chain.prompt_id, index=k, score=s, samples=[s]) for k, s in enumerate(chain.scores)]
        found, dropped = best_vs_worst(gens, judgments)
        if not found:
            return None, next(reason for reason, n in dropped.items() if n)
        pair = found[0]
    elif selection == "rule":
        first, last = chain.scores[0], chain.scores[-1]
        if chain.steps < 1:
            return None, "too_few_steps"
        if first is None or last is None:
            return None, "unscored"
        if rule_min_gain is not None and last - first < rule_min_gain:
            return None, "inconsistent"
        pair = Pair(
            prompt_id=chain.prompt_id, messages=chain.messages, chosen=chain.texts[-1], rejected=chain.texts[0],
            chosen_score=float(last), rejected_score=float(first), chosen_index=chain.steps, rejected_index=0,
        )
    else:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    if pair.chosen == pair.rejected:
        return None, "identical"
    return pair, None


def chain_pairs(
    chains: list[Chain],
    selection: str,
    weights: Mapping[str, float],
    refine_prompt: Callable[[Messages, str], Messages],
    rule_min_gain: float | None = 0.0,
) -> tuple[list[Pair], dict[str, int]]:
    """EVOLVE's two kinds of pairs from refinement chains, with each kind's loss weight as the pair's ``weight``.

    Per chain, ``select_from_chain`` picks (y_w, y_l); then
    - ``direct``: (x; y_w, y_l), the answer to the question;
    - ``refine``: (T_ref(x, y_l); y_w, y_l): given the worse answer, write the better one
      (``refine_prompt(x, y_l)`` builds the prompt).
    A kind whose weight is 0 is not built. ``meta`` marks each pair: ``kind``, ``steps`` [w, l]
    (the chain steps of chosen and rejected), ``chain`` (its index within the prompt) and, for refine
    pairs, ``context_step`` (the step whose answer the prompt holds). Returns the pairs (per chain:
    its direct pair, then its refine pair) and how many chains were dropped for each reason.
    """
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"loss weights for unknown pair kinds {sorted(unknown)}; the kinds are {', '.join(KINDS)}")
    dropped: dict[str, int] = {"tie": 0, "too_few_scored": 0, "identical": 0} if selection == "judge" else {
        "unscored": 0, "inconsistent": 0, "identical": 0, "too_few_steps": 0}
    pairs: list[Pair] = []
    for chain in chains:
        pair, why = select_from_chain(chain, selection, rule_min_gain)
        if pair is None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        steps = [pair.chosen_index, pair.rejected_index]
        common = {"chain": chain.index, "steps": steps, "selection": selection}
        if float(weights.get("direct", 0.0)) > 0:
            pairs.append(dataclasses.replace(pair, weight=float(weights["direct"]), meta={"kind": "direct", **common}))
        if float(weights.get("refine", 0.0)) > 0:
            pairs.append(dataclasses.replace(
                pair, messages=refine_prompt(chain.messages, pair.rejected), weight=float(weights["refine"]),
                meta={"kind": "refine", "context_step": pair.rejected_index, **common},
            ))
    return pairs, dropped
