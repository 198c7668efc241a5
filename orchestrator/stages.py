"""Reusable stage bodies. Each takes workers and inputs and returns (records, metrics).

They know nothing of files, MLflow or resume: the controller's ``Round.stage`` wraps them with
that. Workers are called through ``call`` so the same code drives a Ray actor or a local object.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable, Sequence

from orchestrator import chat, judging
from orchestrator.errors import JudgeError
from orchestrator.pairs import best_vs_worst, pair_metrics
from orchestrator.selfinstruct import PromptFilter, clean_candidate, few_shot_prompt, pick_demos
from orchestrator.types import Generation, GenerationRequest, Judgment, Pair, Prompt

Call = Callable[..., Any]  # call(worker, "method", *args) -> result


def draw_prompts(pool: Sequence[Prompt], used: set[str], k: int, rng: random.Random) -> tuple[list[Prompt], bool]:
    """``k`` prompts not used in earlier rounds; wraps (returns True) once the pool runs dry."""
    fresh = [p for p in pool if p.id not in used]
    wrapped = len(fresh) < k
    if wrapped:
        fresh = list(pool)
    return rng.sample(fresh, min(k, len(fresh))), wrapped


def self_instruct(
    call: Call,
    policy: Any,
    seed_texts: Sequence[str],
    earlier: Sequence[str],
    existing: Sequence[str],
    cfg: dict[str, Any],
    rng: random.Random,
    round_index: int,
) -> tuple[list[Prompt], dict[str, float]]:
    """New prompts written by the policy from few-shot demonstrations, filtered and deduplicated."""
    want = int(cfg["num_prompts"])
    if want <= 0:
        return [], {}
    filt = PromptFilter(
        existing, float(cfg["rouge_l_max"]), int(cfg["min_words"]), int(cfg["max_words"]), list(cfg["banned_keywords"])
    )
    demo_prompts = [
        few_shot_prompt(pick_demos(rng, seed_texts, earlier, int(cfg["shots_seed"]), int(cfg["shots_generated"])))
        for _ in range(want * int(cfg["oversample"]))
    ]
    request = GenerationRequest(
        prompts=demo_prompts,
        n=1,
        temperature=float(cfg["temperature"]),
        top_p=float(cfg["top_p"]),
        max_tokens=int(cfg["max_tokens"]),
        chat=False,
        stop=["\nTask", "\n\n"],
    )
    completions = call(policy, "generate", request)
    kept: list[Prompt] = []
    reasons: dict[str, int] = {}
    for comp in completions:
        text = clean_candidate(comp.texts[0])
        why = filt.reason(text)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
            continue
        kept.append(Prompt(id=f"si-r{round_index:03d}-{len(kept) + 1:04d}", messages=chat.user(text), source="self_instruct"))
        if len(kept) == want:
            break
    metrics = {
        "self_instruct/candidates": float(len(completions)),
        "self_instruct/kept": float(len(kept)),
    }
    metrics.update({f"self_instruct/rejected_{k}": float(v) for k, v in reasons.items()})
    return kept, metrics


def generate_responses(
    call: Call, policy: Any, prompts: Sequence[Prompt], cfg: dict[str, Any]
) -> tuple[list[Generation], dict[str, float]]:
    """N samples per prompt from the policy."""
    request = GenerationRequest(
        prompts=[p.messages for p in prompts],
        n=int(cfg["n"]),
        temperature=float(cfg["temperature"]),
        top_p=float(cfg["top_p"]),
        max_tokens=int(cfg["max_tokens"]),
    )
    t0 = time.perf_counter()
    completions = call(policy, "generate", request)
    wall = time.perf_counter() - t0
    gens = [
        Generation(prompt_id=p.id, messages=p.messages, index=i, text=text, num_tokens=ntok, finish_reason=fin)
        for p, comp in zip(prompts, completions, strict=True)
        for i, (text, ntok, fin) in enumerate(zip(comp.texts, comp.num_tokens, comp.finish_reasons))
    ]
    tokens = sum(g.num_tokens for g in gens)
    metrics = {
        "gen/prompts": float(len(prompts)),
        "gen/responses": float(len(gens)),
        "gen/tokens": float(tokens),
        "gen/tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "gen/response_tokens_mean": tokens / len(gens) if gens else 0.0,
        "gen/response_chars_mean": statistics.fmean(len(g.text) for g in gens) if gens else 0.0,
        "gen/truncated_rate": sum(g.finish_reason == "length" for g in gens) / len(gens) if gens else 0.0,
    }
    return gens, metrics


def judge_responses(
    call: Call, judge: Any, generations: list[Generation], cfg: dict[str, Any]
) -> tuple[list[Judgment], dict[str, float]]:
    judgments: list[Judgment] = call(judge, "score", generations, cfg)
    metrics = judging.judgment_metrics(judgments)
    if generations and metrics["judge/parse_failure_rate"] > float(cfg["max_parse_failure_rate"]):
        example = next((r for j in judgments if j.score is None for r in j.raw[:1]), "")
        raise JudgeError(
            f"the judge gave no parseable score for {metrics['judge/parse_failure_rate']:.0%} of responses "
            f"(judge.max_parse_failure_rate={cfg['max_parse_failure_rate']}; judge.mode={cfg['mode']}); "
            f"e.g. {example[:160]!r}. Try judge.mode=score_only or a stronger judge.model"
        )
    return judgments, metrics


def make_pairs(generations: list[Generation], judgments: list[Judgment]) -> tuple[list[Pair], dict[str, float]]:
    pairs, dropped = best_vs_worst(generations, judgments)
    num_prompts = len({g.prompt_id for g in generations})
    return pairs, pair_metrics(pairs, dropped, num_prompts)
