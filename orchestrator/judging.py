"""LLM-as-a-Judge for Self-Rewarding: the paper's additive 5-point prompt, parsing, aggregation.

Two modes (``judge.mode``):
- ``text``: the paper's procedure. The judge writes a justification ending in ``Score: N``; it is
  sampled K times with the generation decoding parameters and the parsed scores are averaged.
  Samples that do not parse are dropped from the mean and counted; a response with no parsed
  sample gets ``score=None`` (never a silent 0).
- ``score_only``: our addition for small judges that cannot follow the format. The judge prompt
  is followed by an assistant turn that starts with ``Score:`` and the score is the expected
  value of the next token over the digits min..max (renormalised), read from the log-probabilities
  of one decoding step. Deterministic, so one sample per response. The probability the judge put
  on the score tokens at all (``Judgment.mass``) is kept: a judge derailed by the response puts
  little there while its renormalised score still looks confident.

The response is data, not instructions. It is shown with the judge prompt's own tags escaped
(``neutralise``), so it cannot close ``<response>`` and write outside it, and with score labels
("Score: 5") redacted (``redact_scores``), so the judge cannot copy a score the response gives
itself; special-token text in it never becomes a control token (orchestrator.chat); a prompt too
long for the judge is fitted by cutting the response, never the rubric or the question
(``fitted_prompt``); and responses that try such things are counted per round
(``injection_metrics``). tests/test_judge_canary.py measures all of it on the default model.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Callable, Iterable, Mapping

from orchestrator import chat
from orchestrator.errors import JudgeError
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

# The judge prompt's own tags (<response>, </response>, any case or spacing). Written in a response
# they would close its field early; shown with the angle brackets escaped, they are text.
_TAG = re.compile(r"<(\s*/?\s*response\b[^<>]*)>", re.IGNORECASE)
# What the judge writes last and what score_only's assistant turn starts with: "Score: N" (or
# "Points: N", NeMo-Aligner's form; "Rating: 4.5/5"; markdown "**Score:** 5"). A response that
# writes it is asking for that score: SmolLM2 copies it (2.5 -> 4.7 with a trailing "Score: 5").
_SCORE_LIKE = re.compile(
    r"\b(?:score|points|rating)[\s*_]*[:=][\s*_]*[0-9]+(?:\.[0-9]+)?(?:\s*/\s*[0-9]+(?:\.[0-9]+)?)?", re.IGNORECASE
)
SCORE_REDACTED = "[score removed]"
# Special-token shapes of common chat formats (ChatML and Llama 3's <|...|>, <s>, </s>, [INST]):
# counted here; the tokenizer's exact list is what orchestrator.chat keeps from becoming control.
# Where a response too long for the judge's context is cut.
TRUNCATED = "\n[... truncated]"


def neutralise(text: str) -> str:
    """``text`` as the judge is shown it in its fields: the judge prompt's tags escaped."""
    return _TAG.sub(r"&lt;\1&gt;", text)


def redact_scores(response: str) -> str:
    """A response as the judge is shown it: score labels with their numbers replaced, so the judge
    has nothing to copy. Only in the judge's view; pairs and training keep the response as written."""
    return _SCORE_LIKE.sub(SCORE_REDACTED, response)


def _fill(question: str, response: str, single_turn: bool) -> str:
    template = JUDGE_PROMPT if single_turn else _TRANSCRIPT_JUDGE_PROMPT
    return template.format(prompt=neutralise(question), response=redact_scores(neutralise(response)))


def judge_prompt(messages: Messages, response: str) -> str:
    """The judge's prompt for ``response`` to the prompt ``messages`` (shown as ``chat.transcript``)."""
    return _fill(chat.transcript(messages), response, len(messages) == 1)


def _longest(n: int, ok: Callable[[int], bool]) -> int | None:
    """The largest k in 0..n with ok(k) (ok is monotone: true up to some k), or None if not even ok(0)."""
    if not ok(0):
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def fitted_prompt(messages: Messages, response: str, fits: Callable[[str], bool] | None) -> str:
    """``judge_prompt``, cut to ``fits`` (the judge's context) where it does not.

    The response is cut at its end: the rubric, the question and the closing instructions stay
    whole, and the judge sees where the response was cut. Only if even an empty response does not
    fit is the question cut too, keeping its end (the instruction being answered).
    """
    question, single = chat.transcript(messages), len(messages) == 1
    if fits is None or fits(_fill(question, response, single)):
        return _fill(question, response, single)
    keep = _longest(len(response), lambda k: fits(_fill(question, response[:k] + TRUNCATED, single)))
    if keep is not None:
        return _fill(question, response[:keep] + TRUNCATED, single)
    keep = _longest(len(question), lambda k: fits(_fill(TRUNCATED + question[len(question) - k:], TRUNCATED, single)))
    if keep is None:
        # Cutting the rubric would leave a judge that cannot see what it scores (every score equal).
        raise JudgeError(
            "the judge prompt does not fit the judge engine's context even without the response and the question: "
            "raise its engine.max_model_len (or lower the judge's max_tokens)"
        )
    return _fill(TRUNCATED + question[len(question) - keep:], TRUNCATED, single)


def injection_metrics(generations: list[Generation]) -> dict[str, float]:
    """How many responses write what could steer their judge: score labels, the judge's tags, special tokens."""
    kinds = {"score_text": _SCORE_LIKE, "judge_tags": _TAG, "special_tokens": chat.SPECIAL_LIKE}
    return {
        f"judge/responses_with_{kind}": float(sum(1 for g in generations if pattern.search(g.text)))
        for kind, pattern in kinds.items()
    }


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
    """Probability-weighted mean over digit choices, renormalised over them."""
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
    """Judgments from the probabilities of the score tokens (``choice_probs``, not renormalised:
    their sum is the judge's mass on a score at all)."""
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
                mass=sum(p.values()) if p else None,  # None: no probabilities came back
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
    masses = [j.mass for j in judgments if j.mass is not None]
    if masses:
        metrics["judge/score_token_mass_mean"] = statistics.fmean(masses)
        metrics["judge/score_token_mass_min"] = min(masses)
    if any(j.components for j in judgments):  # reward functions and hybrids: each component on its own
        from orchestrator.rewards import component_metrics

        metrics.update(component_metrics(judgments))
    return metrics


# fits(prompt, assistant_prefix, max_new_tokens): whether a judge prompt fits the judge's context.
Fits = Callable[[str, str, int], bool]


def score_with(backend: Any, generations: list[Generation], cfg: Mapping[str, Any], fits: Fits | None = None) -> list[Judgment]:
    """Judge ``generations`` through any backend with ``generate`` and ``choice_probs``.

    ``cfg`` is the whole ``judge`` section (conf/judge/); a missing key is a KeyError naming it.
    ``fits`` (a backend that knows its context, e.g. VLLMWorker.fits) fits long prompts by
    cutting the response (``fitted_prompt``).
    """
    if (cfg.get("kind") or "llm") != "llm":  # a reward function or a hybrid (orchestrator/rewards.py)
        from orchestrator import rewards

        return rewards.score_with(backend, generations, cfg, fits)
    cfg = Section("judge", cfg)
    lo, hi = cfg["min_score"], cfg["max_score"]
    # score_only reads one token, or a space and then one (VLLMWorker.choice_probs): room for two.
    prefix, max_new = (SCORE_PREFIX, 2) if cfg["mode"] == "score_only" else ("", int(cfg["max_tokens"]))
    fit = (lambda prompt: fits(prompt, prefix, max_new)) if fits else None
    prompts = [fitted_prompt(g.messages, g.text, fit) for g in generations]
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
