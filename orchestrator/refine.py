"""Self-refinement: the refinement prompt, refinement chains and their metrics (EVOLVE, Zeng et al. 2025).

A *chain* is a prompt ``x``, the policy's direct answer ``y0`` and ``K`` refinements, each of the
previous one: ``y_k = policy(T_ref(x, y_{k-1}))``. Used by the EVOLVE recipe (training data) and by
the eval stage (chain-of-self-refinement answers, ``eval.refine_steps``).

The refinement prompt is a chat prompt in one of two formats (``evolve.refine_format``,
``eval.refine_format``):

- ``single_turn`` (default): the paper's ``T_ref(x, y)`` as we read it, one user turn that holds
  the question and the earlier answer and asks for a better answer. ``x``'s last user turn is
  replaced by ``template.format(prompt=<that turn>, response=y)``; earlier turns (a system
  message, an earlier exchange) are kept. The template must have both placeholders.
- ``multi_turn``: ``[*x, assistant: y, user: template]``: the earlier answer as the assistant's
  turn, then the template as a follow-up request (placeholders optional).

The paper's own refinement template was not reachable (algorithms.md 2.2, UNCONFIRMED); the
built-in templates below follow the spec's description ("the question plus an example response,
asking for a better, clearer, more accurate response"). A template of ``None`` means the built-in
one for the format.
"""

from __future__ import annotations

import statistics
import string
from dataclasses import dataclass
from typing import Sequence

from orchestrator import chat
from orchestrator.chat import Messages
from orchestrator.types import Generation, Judgment

FORMATS = ("single_turn", "multi_turn")
PLACEHOLDERS = ("prompt", "response")

# UNCONFIRMED (algorithms.md 2.2): the spec's reading of the paper's template, not the paper's text.
SINGLE_TURN_TEMPLATE = """Below is a question and an example response to it. Write a better response to the question: clearer, more accurate, more complete and more helpful than the example. Reply with the improved response only.

Question:
{prompt}

Example response:
{response}"""

MULTI_TURN_TEMPLATE = (
    "Improve your previous response: make it clearer, more accurate, more complete and more helpful. "
    "Reply with the improved response only."
)

BUILT_IN = {"single_turn": SINGLE_TURN_TEMPLATE, "multi_turn": MULTI_TURN_TEMPLATE}

# What an empty earlier answer reads as in a multi-turn prompt (a chat turn cannot be blank).
EMPTY_RESPONSE = "(empty response)"


def template_text(template: str | None, fmt: str) -> str:
    """The template to use: ``template``, or the built-in one for ``fmt`` when it is None."""
    if fmt not in FORMATS:
        raise ValueError(f"refinement format {fmt!r} is not one of {', '.join(FORMATS)}")
    return BUILT_IN[fmt] if template is None else str(template)


def template_problem(template: str | None, fmt: str) -> str | None:
    """Why ``template`` cannot be used with ``fmt`` (a sentence), or None when it can."""
    if fmt not in FORMATS:
        return f"the format must be one of {', '.join(FORMATS)}"
    text = template_text(template, fmt)
    if not text.strip():
        return "the template is empty"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        return f"it is not a str.format template ({exc}); write literal braces as {{{{ and }}}}"
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        return f"unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; use only {{prompt}} and {{response}}"
    if fmt == "single_turn":
        missing = [p for p in PLACEHOLDERS if p not in fields]
        if missing:
            return (
                f"a single_turn template holds the question and the earlier answer: it needs "
                f"{' and '.join('{' + p + '}' for p in missing)}"
            )
    return None


def refine_messages(messages: Messages, previous: str, template: str | None, fmt: str) -> Messages:
    """The prompt that asks the policy to refine ``previous``, its answer to ``messages``."""
    text = template_text(template, fmt)
    question = chat.last_user(messages)
    if fmt == "single_turn":
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        turn = text.format(prompt=question, response=previous)
        return chat.as_messages([*messages[:last], {"role": "user", "content": turn}])
    answer = previous if previous.strip() else EMPTY_RESPONSE
    follow_up = text.format(prompt=question, response=answer)
    return chat.as_messages([*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}])


@dataclass
class Chain:
    """One refinement chain: the prompt ``x`` and the answers y_0..y_K with the judge's scores."""

    prompt_id: str
    index: int  # the chain's index within its prompt (evolve.chains per prompt)
    messages: Messages  # x
    texts: list[str]  # y_0 .. y_K
    scores: list[float | None]  # the judge's score of each y_k as an answer to x (None: unscored)

    @property
    def steps(self) -> int:
        """K, the number of refinements."""
        return len(self.texts) - 1

    @property
    def gain(self) -> float | None:
        """score(y_K) - score(y_0), None unless both are scored."""
        first, last = self.scores[0], self.scores[-1]
        return None if first is None or last is None else last - first


def chain_metrics(chains: Sequence[Chain], prefix: str = "evolve/") -> dict[str, float]:
    """Mean judge score by step, refinement gain, the share of chains that improved or stayed the same.

    ``score_step_k``: mean score of y_k over the chains where it is scored; ``refine_gain``: mean of
    score(y_K) - score(y_0) over chains with both scored; ``improved_share``: the share of those with
    a positive gain; ``unchanged_share``: chains whose y_K is y_0 verbatim (the model only copied).
    """
    metrics: dict[str, float] = {f"{prefix}chains": float(len(chains))}
    if not chains:
        return metrics
    steps = max(c.steps for c in chains)
    for k in range(steps + 1):
        scored = [c.scores[k] for c in chains if k <= c.steps and c.scores[k] is not None]
        if scored:
            metrics[f"{prefix}score_step_{k}"] = statistics.fmean(scored)
    gains = [c.gain for c in chains if c.gain is not None]
    if gains:
        metrics[f"{prefix}refine_gain"] = statistics.fmean(gains)
        metrics[f"{prefix}improved_share"] = sum(g > 0 for g in gains) / len(gains)
    metrics[f"{prefix}unchanged_share"] = sum(c.texts[-1] == c.texts[0] for c in chains) / len(chains)
    return metrics


def build_chains(steps: Sequence[Sequence[Generation]], judgments: Sequence[Sequence[Judgment]]) -> list[Chain]:
    """The chains from the stage records: ``steps[k]`` holds y_k of every chain (step 0: the direct
    answers, whose messages are x), ``judgments[k]`` their scores; chains match by (prompt_id, index).
    A chain missing from a later step ends at the last step it has."""
    if len(judgments) != len(steps):
        raise ValueError(f"{len(steps)} steps of answers but {len(judgments)} steps of judgments")
    score = [{(j.prompt_id, j.index): j.score for j in step} for step in judgments]
    answer = [{g.key: g for g in step} for step in steps]
    chains = []
    for g in steps[0]:
        texts, scores = [], []
        for k in range(len(steps)):
            y = answer[k].get(g.key)
            if y is None:
                break
            texts.append(y.text)
            scores.append(score[k].get((g.prompt_id, g.index)))
        chains.append(Chain(g.prompt_id, g.index, g.messages, texts, scores))
    return chains
