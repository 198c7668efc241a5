"""Chain-of-self-refinement in the eval stage (``eval.refine_steps`` = K > 0; EVOLVE's inference
strategy): the evaluated model refines its own direct answer K times, each step answering the
refinement prompt built from the previous step's answer (orchestrator/refine.py), greedy with
``eval.decoding``. Step k's answers are cached in ``eval_refine_<k>.jsonl`` (keyed by prompt and
refinement prompt, like ``eval_generations.jsonl``), so a resumed eval redoes nothing, and a changed
earlier answer is refined anew.

The final answers y_K form a second answer set, judged by the fixed judge against the starting
model's direct answers (``eval/refined/vs_start/*``, beside the direct ``eval/vs_start/*``) and
against this round's own direct answers (``eval/refined/vs_direct/*``: does refining help this
model?); with ``eval.refine_if`` the IF prompts are refined too and checked (``eval/refined/if/*``).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Mapping, Sequence

from orchestrator.chat import Messages
from orchestrator.eval.compare import compare, winrate_metrics
from orchestrator.eval.generations import HELD_OUT, IF, Key, Response, cached, generate_cached, wanted
from orchestrator.refine import refine_messages
from orchestrator.section import Section
from orchestrator.store import RunStore
from orchestrator.types import Prompt

PREFIX = "eval/refined/"


def refine_file(step: int) -> str:
    return f"eval_refine_{step}.jsonl"


def refine_chain(
    policy: Any, store: RunStore, round_index: int, want: Sequence[tuple[Key, Messages]], direct: Mapping[Key, Response],
    ev: Section,
) -> tuple[dict[Key, Response], int]:
    """y_K for every wanted prompt, refining ``direct`` answers step by step (each step cached).

    Returns the final answers, as Responses to the original prompt (so they compare with other
    rounds' direct answers), and how many answers were generated now.
    """
    rdir = store.round(round_index)
    template, fmt = ev["refine_template"], str(ev["refine_format"])
    previous = {key: direct[key] for key, _ in want}
    generated = 0
    for step in range(1, int(ev["refine_steps"]) + 1):
        prompts = [(key, refine_messages(msgs, previous[key].text, template, fmt)) for key, msgs in want]
        answers, n, _ = generate_cached(policy, rdir, prompts, ev.sub("decoding"), file=refine_file(step))
        generated += n
        previous = {key: answers[key] for key, _ in want}
    return {key: dataclasses.replace(previous[key], messages=msgs) for key, msgs in want}, generated


def refined_eval(
    *, round_index: int, policy: Any, fixed_judge: Any, store: RunStore, ev: Section, direct: Mapping[Key, Response],
    prompts: Sequence[Prompt], items: Sequence[Mapping[str, Any]],
) -> tuple[list[Any], dict[str, float]]:
    """The refined answers of round ``round_index``, judged and checked: (eval records, metrics)."""
    from orchestrator.eval.stage import if_results, pair_records  # stage.py imports this module

    items = list(items) if ev["refine_if"] else []
    final, generated = refine_chain(policy, store, round_index, wanted(prompts, items), direct, ev)
    held_out = [final[(HELD_OUT, p.id)] for p in prompts]
    answered = list(final.values())
    metrics: dict[str, float] = {
        f"{PREFIX}steps": float(ev["refine_steps"]),
        f"{PREFIX}generated": float(generated),
        f"{PREFIX}response_chars_mean": statistics.fmean(len(a.text) for a in held_out) if held_out else 0.0,
        f"{PREFIX}response_tokens_mean": statistics.fmean(a.num_tokens for a in held_out) if held_out else 0.0,
        f"{PREFIX}truncated_rate": sum(a.finish_reason == "length" for a in answered) / len(answered) if answered else 0.0,
        # the share of held-out prompts whose y_K is the direct answer verbatim (refining changed nothing)
        f"{PREFIX}unchanged_rate": (
            sum(a.text == direct[a.key].text for a in held_out) / len(held_out) if held_out else 0.0
        ),
    }
    ids = [p.id for p in prompts]
    pairwise, lc = ev.sub("pairwise"), ev.sub("lc")
    vs_start = compare(fixed_judge, "refined/vs_start", 0, final, cached(store.round(0)), ids, pairwise)
    metrics.update(winrate_metrics(vs_start, lc))
    records = pair_records(vs_start, None)
    if round_index == 0:  # the start's direct answers are this round's: the same pairs
        metrics.update({k.replace("/vs_start/", "/vs_direct/"): v for k, v in metrics.items() if "/refined/vs_start/" in k})
    else:
        vs_direct = compare(fixed_judge, "refined/vs_direct", round_index, final, direct, ids, pairwise)
        metrics.update(winrate_metrics(vs_direct, lc))
        records += pair_records(vs_direct, None)
    if items:
        if_records, if_metrics = if_results({it["id"]: final[(IF, it["id"])].text for it in items}, items, bool(ev["if_loose"]))
        metrics.update({PREFIX + k.removeprefix("eval/"): v for k, v in if_metrics.items()})
        records += [dataclasses.replace(r, kind="refined_if") for r in if_records]
    return records, metrics
