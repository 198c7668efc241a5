"""LLM-as-a-Judge for Self-Rewarding: the paper's additive 5-point prompt, parsing, aggregation.

Two modes (``judge.mode``):
- ``text``: the paper's procedure. The judge writes a justification ending in ``Score: N``; it is
  sampled K times with the generation decoding parameters and the parsed scores are averaged.
  Samples that do not parse are dropped from the mean and counted; a response with no parsed
  sample gets ``score=None`` (never a silent 0).
- ``score_only``: our addition for small judges that cannot follow the format. The judge prompt
  is followed by an assistant turn that starts with ``Score:`` and the score is the expected
  value of the next token over the digits min..max (renormalised), read from the log-probabilities
  of one decoding step. Deterministic, so one sample per response.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Iterable, Mapping

from orchestrator import chat
from orchestrator.chat import Messages
from orchestrator.section import Section
from orchestrator.types import Generation, GenerationRequest, Judgment

# Yuan et al. 2024, Figure 2 (the additive 5-point LLM-as-a-Judge prompt).
JUDGE_PROMPT = """Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:

- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}

<response>{response}</response>

After examining the user's instruction and the response:

- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria."""

SCORE_PREFIX = "Score:"
_SCORE_RE = re.compile(r"Score:\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)

MODES = ("text", "score_only")


# The paper's prompt labels the question "User:"; a multi-turn transcript labels each of its turns.
_TRANSCRIPT_JUDGE_PROMPT = JUDGE_PROMPT.replace("User: {prompt}", "{prompt}")


def judge_prompt(messages: Messages, response: str) -> str:
    """The judge's prompt for ``response`` to the prompt ``messages`` (shown as ``chat.transcript``)."""
    template = JUDGE_PROMPT if len(messages) == 1 else _TRANSCRIPT_JUDGE_PROMPT
    return template.format(prompt=chat.transcript(messages), response=response)


def parse_score(text: str, lo: float = 0.0, hi: float = 5.0) -> float | None:
    """The last ``Score: N`` in a judgment, or None if absent or outside [lo, hi]."""
    matches = _SCORE_RE.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if lo <= value <= hi else None


def score_choices(lo: int, hi: int) -> list[str]:
    return [str(s) for s in range(int(lo), int(hi) + 1)]


def expected_score(probs: dict[str, float] | None) -> float | None:
    """Probability-weighted mean over digit choices (already renormalised)."""
    if not probs:
        return None
    total = sum(probs.values())
    if total <= 0 or not math.isfinite(total):
        return None
    return sum(float(k) * v for k, v in probs.items()) / total


def mean_or_none(samples: Iterable[float | None]) -> float | None:
    kept = [s for s in samples if s is not None]
    return sum(kept) / len(kept) if kept else None


def text_judgments(
    generations: list[Generation], outputs: list[list[str]], lo: float, hi: float
) -> list[Judgment]:
    """Judgments from K sampled judge texts per generation."""
    out = []
    for gen, texts in zip(generations, outputs, strict=True):
        samples = [parse_score(t, lo, hi) for t in texts]
        out.append(
            Judgment(
                prompt_id=gen.prompt_id,
                index=gen.index,
                score=mean_or_none(samples),
                samples=samples,
                raw=list(texts),
                mode="text",
            )
        )
    return out


def score_only_judgments(generations: list[Generation], probs: list[dict[str, float] | None]) -> list[Judgment]:
    out = []
    for gen, p in zip(generations, probs, strict=True):
        score = expected_score(p)
        out.append(
            Judgment(
                prompt_id=gen.prompt_id,
                index=gen.index,
                score=score,
                samples=[score],
                raw=[repr(p)] if p else [],
                mode="score_only",
            )
        )
    return out


def judgment_metrics(judgments: list[Judgment]) -> dict[str, float]:
    scores = [j.score for j in judgments if j.score is not None]
    samples = [s for j in judgments for s in j.samples]
    failed_samples = sum(1 for s in samples if s is None)
    metrics = {
        "judge/responses": float(len(judgments)),
        "judge/scored": float(len(scores)),
        "judge/parse_rate": len(scores) / len(judgments) if judgments else 0.0,
        "judge/parse_failure_rate": 1.0 - len(scores) / len(judgments) if judgments else 0.0,
        "judge/sample_parse_failures": float(failed_samples),
        "judge/sample_parse_failure_rate": failed_samples / len(samples) if samples else 0.0,
    }
    if scores:
        metrics["judge/score_mean"] = statistics.fmean(scores)
        metrics["judge/score_median"] = statistics.median(scores)
        metrics["judge/score_std"] = statistics.pstdev(scores)
    return metrics


def score_with(backend: Any, generations: list[Generation], cfg: Mapping[str, Any]) -> list[Judgment]:
    """Judge ``generations`` through any backend with ``generate`` and ``choice_probs``.

    ``cfg`` is the whole ``judge`` section (conf/judge/); a missing key is a KeyError naming it.
    """
    cfg = Section("judge", cfg)
    lo, hi = cfg["min_score"], cfg["max_score"]
    prompts = [judge_prompt(g.messages, g.text) for g in generations]
    if cfg["mode"] == "score_only":
        probs = backend.choice_probs(prompts, score_choices(lo, hi), assistant_prefix=SCORE_PREFIX)
        return score_only_judgments(generations, probs)
    request = GenerationRequest(
        prompts=prompts,
        n=int(cfg["samples"]),
        temperature=float(cfg["temperature"]),
        top_p=float(cfg["top_p"]),
        max_tokens=int(cfg["max_tokens"]),
    )
    return text_judgments(generations, [c.texts for c in backend.generate(request)], lo, hi)
