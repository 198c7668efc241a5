"""Pairwise judging by a fixed judge, both orders, and judge agreement.

The judge sees an AlpacaEval-like comparison prompt (instruction, Output (a), Output (b)) and the
assistant turn is pre-filled with ``Output (``, so the next token is the verdict; the worker's
``choice_probs`` returns P(a) and P(b), renormalised here over the two choices (one decoding step,
always parseable unless neither letter is among the top log-probabilities).

Every pair is judged in both orders (model as (a), then model as (b)) to cancel position bias:
- ``mode: soft`` (default): preference = mean of P(model) over the two orders. A judge that always
  says "a" gives exactly 0.5; the preference keeps the judge's confidence.
- ``mode: hard``: each order gives a decision (1 win, 0 loss, 0.5 if P = 0.5 exactly); the
  preference is their mean, so two orders that disagree make a tie (0.5).
When only one order yields probabilities, that order alone is used (``orders`` = 1 in the record);
when neither does, the pair has no preference and is left out of the win rate (counted in
``judge_valid_rate``). Identical outputs are a tie (0.5) without asking the judge.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator.roles import call

COMPARE_TEMPLATE = """You are a careful and impartial judge. Below is an instruction and two outputs written by two different AI assistants. Decide which output follows the instruction better: it should be helpful, accurate, relevant and clearly written. The order in which the outputs appear and their length must not influence your decision.

## Instruction
{instruction}

## Output (a)
{output_a}

## Output (b)
{output_b}

Which output is better, Output (a) or Output (b)? Answer with "Output (a)" or "Output (b)" only."""

MODES = ("soft", "hard")


@dataclass
class PairVerdict:
    """The fixed judge on one (model, baseline) pair; preferences are P(model is better)."""

    p_model_first: float | None  # model shown as Output (a)
    p_model_second: float | None  # model shown as Output (b)
    preference: float | None
    orders: int  # how many of the two orders gave probabilities (0, 1, 2); 2 for identical outputs
    identical: bool = False


def compare_prompt(instruction: str, output_a: str, output_b: str, template: str | None, max_chars: int) -> str:
    """The comparison prompt; ``template`` None is COMPARE_TEMPLATE, ``max_chars`` 0 keeps outputs whole."""
    clip = (lambda s: s if len(s) <= max_chars else s[:max_chars] + " ...") if max_chars else (lambda s: s)  # noqa: E731
    return (template or COMPARE_TEMPLATE).format(instruction=instruction, output_a=clip(output_a), output_b=clip(output_b))


def decision(p: float | None, eps: float = 1e-9) -> float | None:
    """1 (prefers the model), 0 (prefers the baseline) or 0.5 (no preference)."""
    if p is None:
        return None
    return 1.0 if p > 0.5 + eps else 0.0 if p < 0.5 - eps else 0.5


def combine(p_first: float | None, p_second: float | None, mode: str) -> float | None:
    """Preference for the model from its two orders (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"pairwise mode must be one of {MODES}, got {mode!r}")
    vals = [p for p in (p_first, p_second) if p is not None]
    if not vals:
        return None
    if mode == "hard":
        vals = [decision(p) for p in vals]
    return float(sum(vals) / len(vals))


def judge_pairs(
    judge: Any,
    instructions: Sequence[str],
    model_outputs: Sequence[str],
    baseline_outputs: Sequence[str],
    cfg: Mapping[str, Any],
) -> list[PairVerdict]:
    """Judge each (model, baseline) pair in both orders with ``judge.choice_probs``.

    ``cfg`` is the ``eval.pairwise`` section (conf/eval/default.yaml); every key is read.
    """
    choices = list(cfg["choices"])
    if len(choices) != 2:
        raise ValueError(f"pairwise choices must be two strings, got {choices}")
    first, second = choices
    if not (len(instructions) == len(model_outputs) == len(baseline_outputs)):
        raise ValueError("instructions, model_outputs and baseline_outputs differ in length")
    todo = [i for i in range(len(instructions)) if model_outputs[i] != baseline_outputs[i]]
    template, max_chars = cfg["template"], int(cfg["max_output_chars"])
    prompts = []
    for i in todo:
        prompts.append(compare_prompt(instructions[i], model_outputs[i], baseline_outputs[i], template, max_chars))
        prompts.append(compare_prompt(instructions[i], baseline_outputs[i], model_outputs[i], template, max_chars))
    probs = call(judge, "choice_probs", prompts, choices, str(cfg["assistant_prefix"]), bool(cfg["chat"])) if prompts else []
    if len(probs) != len(prompts):
        raise ValueError(f"judge returned {len(probs)} results for {len(prompts)} prompts")
    verdicts = [PairVerdict(0.5, 0.5, 0.5, 2, identical=True) for _ in instructions]
    for k, i in enumerate(todo):
        pa, pb = probs[2 * k], probs[2 * k + 1]
        p1 = _prob(pa, first, second)
        p2 = _prob(pb, second, first)
        verdicts[i] = PairVerdict(p1, p2, combine(p1, p2, str(cfg["mode"])), int(p1 is not None) + int(p2 is not None))
    return verdicts


def _prob(probs: Mapping[str, float] | None, mine: str, other: str) -> float | None:
    if not probs:
        return None
    a, b = float(probs.get(mine, 0.0)), float(probs.get(other, 0.0))
    return a / (a + b) if a + b > 0 else None


def position_stats(verdicts: Sequence[PairVerdict]) -> dict[str, float]:
    """How much the verdicts hang on where an output was shown, over the pairs whose outputs differ.

    ``position_consistency``: the share of pairs judged in both orders where both orders pick the
    same output (MT-Bench's consistency; a tie in either order is not consistent); ``p_first``: the
    mean probability given to Output (a) over every order asked. A judge that reads the outputs is
    consistent on most pairs; one that picks by position has p_first far from 0.5, and its win
    rates sit near 50 whatever it compares (bench/judge_power.py). Empty when no pair was judged.
    """
    judged = [v for v in verdicts if not v.identical]
    both = [v for v in judged if v.p_model_first is not None and v.p_model_second is not None]
    # The model is Output (a) in the first order and Output (b) in the second.
    p_a = [p for v in judged for p in (v.p_model_first, None if v.p_model_second is None else 1.0 - v.p_model_second) if p is not None]
    out: dict[str, float] = {}
    if both:
        same = [decision(v.p_model_first) == decision(v.p_model_second) != 0.5 for v in both]
        out["position_consistency"] = sum(same) / len(both)
    if p_a:
        out["p_first"] = statistics.fmean(p_a)
    return out


def winrate(preferences: Sequence[float | None]) -> float | None:
    """Percent, ties (0.5) counting half; None when no pair has a preference."""
    vals = [p for p in preferences if p is not None]
    return 100.0 * statistics.fmean(vals) if vals else None


def agreement(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[float | None, int]:
    """How often two judges pick the same winner on the same pairs.

    Each preference becomes a decision (win / tie / loss); a pair scores 1 when both decide the
    same, 0 when they pick opposite winners and 0.5 when one of them calls it a tie. Pairs where
    either judge has no preference are skipped. Returns (rate in [0, 1] or None, pairs used).
    """
    scores = []
    for x, y in zip(a, b, strict=True):
        dx, dy = decision(x), decision(y)
        if dx is None or dy is None:
            continue
        scores.append(1.0 - abs(dx - dy))
    return (statistics.fmean(scores) if scores else None), len(scores)


def pointwise_preferences(model_scores: Sequence[float | None], baseline_scores: Sequence[float | None]) -> list[float | None]:
    """Preferences from two pointwise scores per pair: 1 if the model's is higher, 0.5 if equal."""
    out: list[float | None] = []
    for m, b in zip(model_scores, baseline_scores, strict=True):
        out.append(None if m is None or b is None else 1.0 if m > b else 0.0 if m < b else 0.5)
    return out
