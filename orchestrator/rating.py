"""ALMA's judge (Yasunaga et al. 2024; algorithms.md 3.2.3): the rating prompt, real-valued scores,
training targets and accuracy on held-out human ratings.

The judge is a model fine-tuned to answer ``RATING_PROMPT`` with ``Rating: [[N]]``, N a whole
number from 0 to 10 (the paper's "vanilla" judge: no reasoning before the rating). Its score for a
response is real-valued: with p(s) the judge's probability of writing the rating s after
``Rating: [[``, renormalised over s = 0..10,

    score = sum_s s * p(s)                                        (e.g. 9.21)

Tokenization (``score_tokens``, checked per tokenizer, a clear error when it does not hold): each
rating 0..9 must be one token right after the prefix, tokenized the same inside the whole answer
as on its own (so the probabilities read at scoring time are those of the trained target). "10" is
either one token too, or the tokens "1" then "0" (SmolLM2's and Llama-2's digit-by-digit
tokenizers): then one more decoding step after ``Rating: [[1`` splits the probability of the token
"1" between the rating 1 (the answer closes: ``]]``) and the rating 10 (it goes on with "0"):
p(10) = P(1) * q(0) / (q(0) + q(close)) and p(1) = P(1) * q(close) / (q(0) + q(close)).

The rating runs inside the judge's engine (``VLLMWorker.rate`` calls ``rate_with`` with its
tokenizer); the rest (prompts, targets, accuracy, the stage body) runs anywhere.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from orchestrator import chat
from orchestrator.chat import Messages
from orchestrator.errors import JudgeError
from orchestrator.judging import expected_score, judgment_metrics
from orchestrator.types import Demonstration, Generation, Judgment

# Paraphrase of the paper's App. A.2 (its exact wording was not reachable: UNCONFIRMED): an impartial
# judge, the MT-Bench criteria, a 0-10 rating only, in the [[rating]] format; then the two sections.
RATING_PROMPT = """Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user prompt displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Be as objective as possible. Output only your rating of the response on a scale of 0 to 10, strictly in this format: "[[rating]]", for example: "Rating: [[3]]".

# Prompt:
{prompt}

# Response:
{response}"""

PREFIX = "Rating: [["  # the judge's answer up to the rating: where the score tokens are read
CLOSE = "]]"
MAX_RATING = 10
RATINGS = tuple(str(s) for s in range(MAX_RATING + 1))
TRUNCATED = "\n[... truncated]"
MODE = "rating"  # Judgment.mode of these judgments


# A rating in the judge's own format ("[[7]]") written inside the prompt or the response: a small
# judge copies it, so it is shown with its brackets defused ("[7]").
_RATING_LIKE = re.compile(r"\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")


def defused(text: str) -> str:
    return _RATING_LIKE.sub(r"[\1]", text)


def rating_messages(messages: Messages, response: str) -> Messages:
    """The judge's prompt for ``response`` to the prompt ``messages``, one user turn; a rating in the
    judge's format written in either is shown defused (``defused``)."""
    return chat.user(RATING_PROMPT.format(prompt=defused(chat.transcript(messages)), response=defused(response)))


def target(rating: float) -> str:
    """The judge's training answer for a rating (rounded to a whole number, clipped to 0..10)."""
    return f"{PREFIX}{min(MAX_RATING, max(0, round(rating)))}{CLOSE}"


def judge_example(prompt_id: str, messages: Messages, response: str, rating: float, source: str) -> Demonstration:
    """An SFT example for the judge: the rating prompt for ``response``, answered with ``rating``."""
    return Demonstration(prompt_id=prompt_id, messages=rating_messages(messages, response), response=target(rating),
                         score=float(rating), source=source)


def training_examples(rated: Sequence[Demonstration], source: str) -> list[Demonstration]:
    """The judge's SFT examples from rated responses (their ``score`` the rating; unrated ones left out)."""
    return [judge_example(d.prompt_id, d.messages, d.response, d.score, source) for d in rated if d.score is not None]


def as_generations(rated: Sequence[Demonstration]) -> list[Generation]:
    """Rated responses as the generations a judge scores (one per prompt id, index 0)."""
    return [Generation(prompt_id=d.prompt_id, messages=d.messages, index=0, text=d.response, num_tokens=0, source=d.source)
            for d in rated]


def split_by_prompt(
    rated: Sequence[Demonstration], heldout_fraction: float, rng: random.Random
) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, held out): ``heldout_fraction`` of the distinct prompts (at least one, and at least
    one left to train on), every response to a prompt on the same side. Raises ValueError when
    there are fewer than two prompts."""
    groups: dict[str, list[Demonstration]] = {}
    for d in rated:
        groups.setdefault(" ".join(chat.last_user(d.messages).lower().split()), []).append(d)
    keys = sorted(groups)
    if len(keys) < 2:
        raise ValueError(f"the rated seed has {len(keys)} distinct prompt(s); at least 2 are needed "
                         "(one to train, one held out)")
    n_out = min(len(keys) - 1, max(1, round(heldout_fraction * len(keys))))
    out = set(rng.sample(keys, n_out))
    return ([d for k in keys if k not in out for d in groups[k]], [d for k in keys if k in out for d in groups[k]])


# -- scoring (in the judge's engine) ---------------------------------------------------------------
@dataclass(frozen=True)
class ScoreTokens:
    """How a tokenizer writes the ratings after ``PREFIX``: whether "10" is one token, and the text of
    the first token of ``CLOSE`` (what follows a finished rating)."""

    ten_is_one_token: bool
    close: str


def score_tokens(tokenizer: Any) -> ScoreTokens:
    """Check that ``tokenizer`` writes every rating as ``rate_with`` reads it (module docstring): the
    trained answer ``Rating: [[s]]`` (``chat.encode_pair``, as the judge is trained) starts with the
    scoring prefix's ids (``chat.encode`` with ``assistant_prefix``, as it is scored) followed by
    the rating's own tokens. ValueError naming the rating otherwise."""
    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    probe = chat.user("?")
    prefix = chat.encode(tokenizer, probe, assistant_prefix=PREFIX)[len(chat.encode(tokenizer, probe)):]
    close = ""
    for s in RATINGS:
        digits = enc(s)
        _, reply = chat.encode_pair(tokenizer, probe, target(int(s)))
        if reply[: len(prefix) + len(digits)] != prefix + digits:
            raise ValueError(f"the judge's tokenizer merges the rating {s!r} with the text around it in {target(int(s))!r}; "
                             "its probability cannot be read after the prefix")
        if s != "10" and len(digits) != 1:
            raise ValueError(f"the judge's tokenizer writes the rating {s!r} as {len(digits)} tokens; each of 0-9 must be one")
        if s == "1":
            close = tokenizer.decode(reply[len(prefix) + 1: len(prefix) + 2])  # what the trained answer writes after "1"
    ten = enc("10")
    if len(ten) != 1 and ten != enc("1") + enc("0"):
        raise ValueError(f"the judge's tokenizer writes the rating '10' as {len(ten)} tokens, not as '1' then '0'")
    return ScoreTokens(ten_is_one_token=len(ten) == 1, close=close)


def distribution(first: dict[str, float] | None, second: dict[str, float] | None, close: str) -> dict[str, float] | None:
    """p(s), s = "0".."10", renormalised: from the first step's probabilities of the ratings (keys
    "0".."9", and "10" when it is one token) and, when "10" is two tokens, the second step's
    probabilities of "0" and ``close`` after "1". None when the judge put no probability on any rating."""
    if not first:
        return None
    p = {s: float(first.get(s, 0.0)) for s in RATINGS[:10]}
    if "10" in first:
        p["10"] = float(first["10"])
    else:
        q0, qc = (float(second.get("0", 0.0)), float(second.get(close, 0.0))) if second else (0.0, 0.0)
        share = q0 / (q0 + qc) if q0 + qc > 0 else 0.0
        p["10"], p["1"] = p["1"] * share, p["1"] * (1.0 - share)
    total = sum(p.values())
    if not (total > 0 and math.isfinite(total)):
        return None
    return {s: v / total for s, v in p.items()}


def fitted(tokenizer: Any, messages: Messages, response: str, room: int) -> str:
    """``response``, its end cut (and marked) so that its rating prompt leaves ``room`` tokens of the
    engine's context unexceeded; the rubric and the question stay whole."""
    def length(text: str) -> int:
        return len(chat.encode(tokenizer, rating_messages(messages, text), assistant_prefix=PREFIX + "1"))

    if length(response) <= room:
        return response
    ids = tokenizer.encode(response, add_special_tokens=False)
    keep = max(0, room - length(TRUNCATED) - 8)  # 8: slack for tokens merging differently once cut
    while keep > 0 and length(tokenizer.decode(ids[:keep]) + TRUNCATED) > room:
        keep -= 8
    return tokenizer.decode(ids[:max(keep, 0)]) + TRUNCATED


def rate_with(backend: Any, tokenizer: Any, generations: Sequence[Generation], room: int) -> list[Judgment]:
    """Each generation's real-valued rating by the judge ``backend`` (``choice_probs`` as
    VLLMWorker's: per prompt, each choice's next-token probability after ``assistant_prefix``)."""
    plan = score_tokens(tokenizer)
    prompts = [rating_messages(g.messages, fitted(tokenizer, g.messages, g.text, room)) for g in generations]
    first = backend.choice_probs(prompts, list(RATINGS if plan.ten_is_one_token else RATINGS[:10]), assistant_prefix=PREFIX)
    second = [None] * len(prompts)
    if not plan.ten_is_one_token:
        second = backend.choice_probs(prompts, ["0", plan.close], assistant_prefix=PREFIX + "1")
    out = []
    for g, p1, p2 in zip(generations, first, second, strict=True):
        dist = distribution(p1, p2, plan.close)
        score = expected_score(dist)
        out.append(Judgment(prompt_id=g.prompt_id, index=g.index, score=score, samples=[score],
                            raw=[json.dumps(dist)] if dist else [], mode=MODE, mass=sum(p1.values()) if p1 else 0.0))
    return out


# -- the stage body and the accuracy (anywhere) -----------------------------------------------------
Call = Callable[..., Any]


def rate(
    call: Call, judge: Any, generations: list[Generation], max_unscored_rate: float, prefix: str = "judge/"
) -> tuple[list[Judgment], dict[str, float]]:
    """The judge's ratings of ``generations`` and their metrics (``prefix``...); a JudgeError when more
    than ``max_unscored_rate`` of them got no score."""
    judgments: list[Judgment] = call(judge, "rate", generations)
    metrics = judgment_metrics(judgments)
    if generations and metrics["judge/parse_failure_rate"] > max_unscored_rate:
        raise JudgeError(
            f"the ALMA judge put no probability on any rating 0-10 for {metrics['judge/parse_failure_rate']:.0%} of the "
            f"responses (alma.judge.max_unscored_rate={max_unscored_rate}); is the judge checkpoint trained?"
        )
    return judgments, {prefix + k.removeprefix("judge/"): v for k, v in metrics.items()}


def argmax_rating(j: Judgment) -> float | None:
    """The judge's most probable rating (the integer score the paper's table compares with)."""
    if not j.raw:
        return None
    dist = json.loads(j.raw[0])
    return float(max(dist, key=lambda s: (dist[s], -int(s))))


def accuracy(rated: Sequence[Demonstration], judgments: Sequence[Judgment], prefix: str) -> dict[str, float]:
    """How well a judge's scores agree with human ratings of the same responses.

    ``pair_accuracy``: over every two responses to the same prompt with different human ratings, the
    share the judge orders the same way (a tie counts half; the paper's RewardBench-style accuracy);
    ``pair_accuracy_int`` the same with the judge's most probable whole rating instead of its
    real-valued score; ``mae`` the mean absolute difference from the human rating.
    """
    by_key = {(j.prompt_id, j.index): j for j in judgments}
    scored = [(d, by_key.get((d.prompt_id, 0))) for d in rated]
    groups: dict[str, list[tuple[float, Judgment]]] = {}
    for d, j in scored:
        if j is not None and j.score is not None and d.score is not None:
            groups.setdefault(chat.last_user(d.messages), []).append((d.score, j))
    real, whole = [], []
    for items in groups.values():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (ha, ja), (hb, jb) = items[a], items[b]
                if ha == hb:
                    continue
                sign = 1 if ha > hb else -1
                for out, sa, sb in ((real, ja.score, jb.score), (whole, argmax_rating(ja), argmax_rating(jb))):
                    out.append(0.5 if sa == sb else float((sa - sb) * sign > 0))
    errors = [abs(j.score - h) for items in groups.values() for h, j in items]
    metrics = {f"{prefix}rated": float(len(errors)), f"{prefix}pairs": float(len(real))}
    if real:
        metrics[f"{prefix}pair_accuracy"] = statistics.fmean(real)
        metrics[f"{prefix}pair_accuracy_int"] = statistics.fmean(whole)
    if errors:
        metrics[f"{prefix}mae"] = statistics.fmean(errors)
    return metrics
