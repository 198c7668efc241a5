"""Reusable stage bodies. Each takes workers and inputs and returns (records, metrics).

They know nothing of files, MLflow or resume: the controller's ``Round.stage`` wraps them with
that. Workers are called through ``call`` so the same code drives a Ray actor or a local object.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

from orchestrator import chat, judging, refine
from orchestrator.chat import Messages
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
    # shots_seed: a count, or [lo, hi] for a count drawn per request (ALMA: 3-5 random seed prompts)
    shots = cfg["shots_seed"]
    lo, hi = (int(shots), int(shots)) if isinstance(shots, (int, float)) else (int(shots[0]), int(shots[1]))
    demo_prompts = [
        few_shot_prompt(pick_demos(rng, seed_texts, earlier, lo if lo == hi else rng.randint(lo, hi),
                                   int(cfg["shots_generated"])))
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


def round_prompts(
    call: Call,
    policy: Any,
    pool: Sequence[Prompt],
    used: Sequence[Prompt],
    earlier: Sequence[Prompt],
    cfg: dict[str, Any],
    draw_rng: random.Random,
    self_instruct_rng: random.Random,
    round_index: int,
) -> tuple[list[Prompt], dict[str, float]]:
    """A round's prompts (Self-Rewarding's prompt stage, shared by recipes): ``data.prompts_per_round``
    pool prompts not used in earlier rounds (``used``) plus ``data.self_instruct.num_prompts`` written
    by the policy (``earlier``: the self-instructed prompts of earlier rounds). ``cfg``: the ``data`` section."""
    seed_texts = [p.text for p in pool]
    drawn, wrapped = draw_prompts(pool, {p.id for p in used}, int(cfg["prompts_per_round"]), draw_rng)
    new, metrics = self_instruct(
        call, policy, seed_texts, [p.text for p in earlier], seed_texts + [p.text for p in used],
        cfg["self_instruct"], self_instruct_rng, round_index,
    )
    metrics.update({"prompts/seed": len(drawn), "prompts/self_instruct": len(new), "prompts/pool_wrapped": float(wrapped)})
    return drawn + new, metrics


def generate_responses(
    call: Call, policy: Any, prompts: Sequence[Prompt], cfg: dict[str, Any], *, source: str = "policy", first_index: int = 0,
    prefix: str = "gen/",
) -> tuple[list[Generation], dict[str, float]]:
    """N samples per prompt from the policy (``cfg``: the ``generation`` section; N = ``cfg["n"]``).

    When several checkpoints answer the same prompts (ALMA), each call names its ``source`` and
    numbers its samples from ``first_index``, so (prompt, index) stays unique across them."""
    completions, wall = _sample(call, policy, [p.messages for p in prompts], int(cfg["n"]), cfg)
    gens = [
        Generation(prompt_id=p.id, messages=p.messages, index=first_index + i, text=text, num_tokens=ntok, finish_reason=fin,
                   source=source)
        for p, comp in zip(prompts, completions, strict=True)
        for i, (text, ntok, fin) in enumerate(zip(comp.texts, comp.num_tokens, comp.finish_reasons))
    ]
    return gens, generation_metrics(gens, len(prompts), wall, prefix)


def _sample(call: Call, policy: Any, prompts: list[Any], n: int, cfg: dict[str, Any]) -> tuple[list[Any], float]:
    """``n`` samples for each chat prompt with the ``generation`` section's decoding; (completions, wall seconds)."""
    request = GenerationRequest(
        prompts=prompts,
        n=n,
        temperature=float(cfg["temperature"]),
        top_p=float(cfg["top_p"]),
        max_tokens=int(cfg["max_tokens"]),
    )
    t0 = time.perf_counter()
    completions = call(policy, "generate", request)
    return completions, time.perf_counter() - t0


def generation_metrics(gens: Sequence[Generation], num_prompts: int, wall: float, prefix: str = "gen/") -> dict[str, float]:
    tokens = sum(g.num_tokens for g in gens)
    return {
        f"{prefix}prompts": float(num_prompts),
        f"{prefix}responses": float(len(gens)),
        f"{prefix}tokens": float(tokens),
        f"{prefix}tokens_per_s": tokens / wall if wall > 0 else 0.0,
        f"{prefix}response_tokens_mean": tokens / len(gens) if gens else 0.0,
        f"{prefix}response_chars_mean": statistics.fmean(len(g.text) for g in gens) if gens else 0.0,
        f"{prefix}truncated_rate": sum(g.finish_reason == "length" for g in gens) / len(gens) if gens else 0.0,
    }


def refine_responses(
    call: Call, policy: Any, previous: Sequence[Generation], questions: Mapping[str, Messages],
    template: str | None, fmt: str, cfg: dict[str, Any], prefix: str = "refine/",
) -> tuple[list[Generation], dict[str, float]]:
    """One refinement step of every chain: the policy answers ``T_ref(x, y_prev)`` for each earlier
    answer ``y_prev`` in ``previous`` (x = ``questions[prompt_id]``), one sample each with the
    ``generation`` section's decoding. Each new Generation keeps its chain's prompt_id and index and
    carries the refinement prompt as its messages (what the policy answered)."""
    prompts = [refine.refine_messages(questions[g.prompt_id], g.text, template, fmt) for g in previous]
    completions, wall = _sample(call, policy, prompts, 1, cfg)
    gens = [
        Generation(prompt_id=g.prompt_id, messages=msgs, index=g.index, text=comp.texts[0], num_tokens=comp.num_tokens[0],
                   finish_reason=comp.finish_reasons[0])
        for g, msgs, comp in zip(previous, prompts, completions, strict=True)
    ]
    metrics = generation_metrics(gens, len(prompts), wall, prefix)
    metrics[f"{prefix}unchanged_rate"] = (
        sum(new.text == old.text for new, old in zip(gens, previous)) / len(gens) if gens else 0.0
    )
    return gens, metrics


def judge_responses(
    call: Call, judge: Any, generations: list[Generation], cfg: dict[str, Any]
) -> tuple[list[Judgment], dict[str, float]]:
    # vLLM judges count the prompt tokens their prefix cache served: every judge prompt starts with
    # the same rubric, so a low share means the cache is off or evicted.
    # (The first call restarts the counts, so the second reads this stage's alone, on whichever engine
    # did the work if the stage was redone on a fresh one.)
    counted = hasattr(judge, "prefix_cache")
    if counted:
        call(judge, "prefix_cache")
    judgments: list[Judgment] = call(judge, "score", generations, cfg)
    metrics = {**judging.judgment_metrics(judgments), **judging.injection_metrics(generations)}
    if counted:
        cache = call(judge, "prefix_cache")
        if cache["prompt_tokens"] > 0:
            metrics["judge/prefix_cache_hit_rate"] = cache["hit_rate"]
    if generations and metrics["judge/parse_failure_rate"] > float(cfg["max_parse_failure_rate"]):
        example = next((r for j in judgments if j.score is None for r in j.raw[:1]), "")
        raise JudgeError(
            f"the judge gave no parseable score for {metrics['judge/parse_failure_rate']:.0%} of responses "
            f"(judge.max_parse_failure_rate={cfg['max_parse_failure_rate']}; judge.mode={cfg['mode']}); "
            f"e.g. {example[:160]!r}. Try judge.mode=score_only or a stronger judge.model"
        )
    return judgments, metrics


def judge_answers(
    call: Call, judge: Any, answers: Sequence[Generation], questions: Mapping[str, Messages], cfg: dict[str, Any],
    prefix: str = "judge/",
) -> tuple[list[Judgment], dict[str, float]]:
    """``judge_responses`` on each answer as an answer to its question ``questions[prompt_id]``
    (a refinement is judged against x, not against the refinement prompt it was written for);
    the metrics are named ``<prefix>...`` instead of ``judge/...``."""
    as_answers = [dataclasses.replace(g, messages=questions[g.prompt_id]) for g in answers]
    judgments, metrics = judge_responses(call, judge, as_answers, cfg)
    return judgments, {prefix + k.removeprefix("judge/"): v for k, v in metrics.items()}


def make_pairs(generations: list[Generation], judgments: list[Judgment]) -> tuple[list[Pair], dict[str, float]]:
    pairs, dropped = best_vs_worst(generations, judgments)
    num_prompts = len({g.prompt_id for g in generations})
    return pairs, pair_metrics(pairs, dropped, num_prompts)
