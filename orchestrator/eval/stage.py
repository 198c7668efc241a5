"""The eval stage for one round, given its workers: held-out answers, win rates against the start
and the previous evaluated round, IF accuracy and judge agreement.

Round 0 is the starting model. For round r the policy (serving the weights after round r) answers
each held-out and IF prompt once (generations.py, cached). Then:

- the fixed judge (``eval.judge``; it never changes over rounds) compares round r's answers with
  round 0's (``vs_start``) and with the latest earlier evaluated round's (``vs_prev``; the same
  pairs as vs_start when that is round 0), both orders per pair (pairwise.py), giving raw and
  length-controlled win rates with standard errors (compare.py, lc_winrate.py);
- IF prompt- and check-level accuracy (ifeval.py, strict; loose too with ``eval.if_loose``);
- judge reliability: the round's model as a judge (the Self-Rewarding judge of the next round)
  on the vs_start pairs, its agreement with the fixed judge and its parse rate; plus the round's
  own judge-stage ``judge/parse_rate`` when there is one;
- with ``eval.refine_steps`` = K > 0, chain-of-self-refinement answers (K refinements of each
  direct answer) judged against the start's and this round's direct answers (refined.py,
  ``eval/refined/*``); off by default.

Win rates are percent (0-100); accuracies, agreement and rates are fractions (0-1). At round 0
the vs_start win rates are 50 by construction (the model against itself).

Workers are anything with the ``EvalWorker`` methods (a Ray actor or a local object; see
``orchestrator.roles.call``). ``eval_stage`` writes only the answer cache; ``run_eval`` also
writes eval.jsonl / eval.metrics.json and skips a finished eval. The round loop's hook is loop.py.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from orchestrator.errors import OrchestratorError
from orchestrator.eval import ifeval
from orchestrator.eval.answer_cache import AnswerCache
from orchestrator.eval.compare import Comparison, compare, policy_as_judge, winrate_metrics
from orchestrator.eval.generations import HELD_OUT, IF, Key, Response, cached, generate_cached, has_responses, held_out_sets, wanted
from orchestrator.eval.refined import refined_eval
from orchestrator.section import Section
from orchestrator.store import RunStore
from orchestrator.types import Completion, Generation, GenerationRequest, Judgment, Prompt, Record

log = logging.getLogger(__name__)

STAGE = "eval"
# Stages in which a recipe's own judge scores (Self-Rewarding: "judgments"); their parse rate is reported.
JUDGE_STAGES = ("judgments", "judge")


class EvalWorker(Protocol):
    """What the stage needs from a worker (workers/vllm_worker.py ``VLLMWorker`` or an endpoint client)."""

    def generate(self, request: GenerationRequest) -> list[Completion]: ...

    def choice_probs(self, prompts: list[str], choices: list[str], assistant_prefix: str, chat: bool) -> list[dict[str, float] | None]: ...


class ScoringWorker(EvalWorker, Protocol):
    """The evaluated policy: also the Self-Rewarding judge (``agreement.method: pointwise``)."""

    def score(self, generations: list[Generation], judge_cfg: dict[str, Any]) -> list[Judgment]: ...


@dataclass
class EvalRecord(Record):
    """One line of ``eval.jsonl``: a judged pair (kind "pair") or an IF prompt's checks (kind "if")."""

    kind: str
    prompt_id: str
    comparison: str = ""  # "vs_start" / "vs_prev" for pairs
    baseline_round: int = -1
    preference: float | None = None  # fixed judge: P(this round's response is better)
    p_model_first: float | None = None
    p_model_second: float | None = None
    model_chars: int = 0
    baseline_chars: int = 0
    policy_preference: float | None = None  # the round's model as a judge (vs_start pairs)
    checks: list[bool] = field(default_factory=list)  # IF: one result per check (strict)
    passed: bool | None = None


def previous_round(store: RunStore, round_index: int) -> int:
    """The latest round before ``round_index`` with eval answers; 0 (the start) when there is none.
    Round 0's answers must exist: every round is compared with them."""
    start = store.round(0)
    if not has_responses(start):
        raise OrchestratorError(
            f"eval: round {round_index} is compared with the starting model, but round 0 has no eval answers "
            f"in {start.path}; evaluate round 0 first (the round loop does when eval.every > 0)"
        )
    return next((k for k in range(round_index - 1, 0, -1) if has_responses(store.round(k))), 0)


def pair_records(cmp: Comparison, policy_prefs: Sequence[float | None] | None) -> list[EvalRecord]:
    return [
        EvalRecord(
            kind="pair", prompt_id=pid, comparison=cmp.name, baseline_round=cmp.baseline_round,
            preference=v.preference, p_model_first=v.p_model_first, p_model_second=v.p_model_second,
            model_chars=len(cmp.mine[i]), baseline_chars=len(cmp.theirs[i]),
            policy_preference=policy_prefs[i] if policy_prefs else None,
        )
        for i, (pid, v) in enumerate(zip(cmp.prompt_ids, cmp.verdicts))
    ]


def if_results(responses: Mapping[str, str], items: Sequence[Mapping[str, Any]], loose: bool) -> tuple[list[EvalRecord], dict[str, float]]:
    """IF accuracy (strict, and loose with ``loose``) and one record per IF prompt."""
    metrics = {f"eval/{k}": v for k, v in ifeval.evaluate_if(responses, list(items)).items()}
    if loose:
        metrics.update({f"eval/{k}": v for k, v in ifeval.evaluate_if(responses, list(items), loose=True).items()})
    records = []
    for it in items:
        results = ifeval.check_response(it, responses[it["id"]])
        records.append(EvalRecord(kind="if", prompt_id=it["id"], checks=results, passed=all(results)))
    return records, metrics


def if_vs_start(store: RunStore, items: Sequence[Mapping[str, Any]], records: Sequence[EvalRecord]) -> dict[str, float]:
    """IF prompt accuracy now minus the start's on the same prompts, with a paired-bootstrap SE
    (``eval/if/vs_start/prompt_accuracy_delta``, ``..._delta_se``): the round-over-round measure of
    instruction following, whose noise the two accuracies' own SEs would overstate."""
    start = cached(store.round(0))
    if not all((IF, it["id"]) in start for it in items):
        return {}
    was = [all(ifeval.check_response(it, start[(IF, it["id"])].text or "")) for it in items]
    delta, se = ifeval.paired_delta([bool(r.passed) for r in records], was)
    return {"eval/if/vs_start/prompt_accuracy_delta": delta, "eval/if/vs_start/prompt_accuracy_delta_se": se}


def eval_stage(
    *,
    round_index: int,
    policy: ScoringWorker,
    fixed_judge: EvalWorker,
    store: RunStore,
    cfg: Mapping[str, Any],
    judge_cfg: Mapping[str, Any],
    train_prompts: Sequence[str | Prompt] = (),
    shared_answers: AnswerCache | None = None,
) -> tuple[list[EvalRecord], dict[str, float]]:
    """Evaluate the model that ``policy`` serves now as round ``round_index``; returns (records, metrics).

    Writes only the answer cache; the caller writes ``eval.jsonl`` (``run_eval``, or the round
    loop's ``Round.stage``). ``cfg``: the ``eval`` section; ``judge_cfg``: the ``judge`` section
    (the pointwise agreement judge); ``train_prompts``: every prompt the run trains on;
    ``shared_answers``: this model's greedy answers kept across runs (answer_cache.py).
    """
    t0 = time.perf_counter()
    ev = Section("eval", cfg)
    rdir = store.round(round_index)
    prompts, items = held_out_sets(ev, train_prompts)
    want = wanted(prompts, items)
    answers, generated, reused = generate_cached(policy, rdir, want, ev.sub("decoding"), shared=shared_answers)
    t_gen = time.perf_counter() - t0
    held_out = [answers[(HELD_OUT, p.id)] for p in prompts]
    answered = [answers[key] for key, _ in want]
    metrics: dict[str, float] = {
        "eval/prompts": float(len(prompts)),
        "eval/if_prompts": float(len(items)),
        "eval/generated": float(generated),
        "eval/answers_reused": float(reused),
        "eval/response_chars_mean": statistics.fmean(len(a.text) for a in held_out) if held_out else 0.0,
        "eval/response_tokens_mean": statistics.fmean(a.num_tokens for a in held_out) if held_out else 0.0,
        "eval/truncated_rate": sum(a.finish_reason == "length" for a in answered) / len(answered) if answered else 0.0,
    }
    records: list[EvalRecord] = []
    if items:
        if_records, if_metrics = if_results({it["id"]: answers[(IF, it["id"])].text for it in items}, items, bool(ev["if_loose"]))
        records += if_records
        metrics.update(if_metrics)
        if round_index > 0:
            metrics.update(if_vs_start(store, items, if_records))

    t1 = time.perf_counter()
    if round_index == 0:
        metrics.update({"eval/vs_start/winrate": 50.0, "eval/vs_start/winrate_se": 0.0,
                        "eval/vs_start/lc_winrate": 50.0, "eval/vs_start/lc_winrate_se": 0.0})
    else:
        pair_recs, pair_metrics = _win_rates(round_index, policy, fixed_judge, store, ev, judge_cfg, answers, [p.id for p in prompts])
        records += pair_recs
        metrics.update(pair_metrics)
    t_judge = time.perf_counter() - t1
    if int(ev["refine_steps"]) > 0:  # chain-of-self-refinement answers, judged as a second answer set
        t2 = time.perf_counter()
        refined_records, refined_metrics = refined_eval(
            round_index=round_index, policy=policy, fixed_judge=fixed_judge, store=store, ev=ev, direct=answers,
            prompts=prompts, items=items,
        )
        records += refined_records
        metrics.update(refined_metrics)
        metrics["time/eval_refine_s"] = time.perf_counter() - t2
    # The round's own judge stage (Self-Rewarding: "judgments"), when this round had one.
    rate = next((rdir.metrics(s)["judge/parse_rate"] for s in JUDGE_STAGES if "judge/parse_rate" in rdir.metrics(s)), None)
    if rate is not None:
        metrics["eval/judge_parse_rate"] = float(rate)
    metrics["time/eval_generate_s"] = t_gen
    metrics["time/eval_judge_s"] = t_judge
    return records, metrics


def _win_rates(
    round_index: int, policy: ScoringWorker, fixed_judge: EvalWorker, store: RunStore, ev: Section,
    judge_cfg: Mapping[str, Any], answers: Mapping[Key, Response], prompt_ids: list[str],
) -> tuple[list[EvalRecord], dict[str, float]]:
    """This round against the start and the previous evaluated round, and the policy as a judge."""
    prev = previous_round(store, round_index)
    vs_start = compare(fixed_judge, "vs_start", 0, answers, cached(store.round(0)), prompt_ids, ev.sub("pairwise"))
    metrics = winrate_metrics(vs_start, ev.sub("lc"))
    metrics["eval/prev_round"] = float(prev)
    policy_prefs = None
    agreement = ev.sub("agreement")
    if agreement["enabled"]:
        policy_prefs, judge_metrics = policy_as_judge(policy, vs_start, str(agreement["method"]), ev.sub("pairwise"), judge_cfg)
        metrics.update(judge_metrics)
    records = pair_records(vs_start, policy_prefs)
    if prev == 0:  # the same pairs: vs_prev is vs_start
        metrics.update({k.replace("/vs_start/", "/vs_prev/"): v for k, v in metrics.items() if "/vs_start/" in k})
    else:
        vs_prev = compare(fixed_judge, "vs_prev", prev, answers, cached(store.round(prev)), prompt_ids, ev.sub("pairwise"))
        metrics.update(winrate_metrics(vs_prev, ev.sub("lc")))
        records += pair_records(vs_prev, None)
    return records, metrics


def run_eval(*, round_index: int, store: RunStore, **stage_args: Any) -> dict[str, float]:
    """``eval_stage`` (``stage_args``: its other arguments) plus ``eval.jsonl`` / ``eval.metrics.json``;
    a finished eval is not redone. The round loop does the same through ``Round.stage``."""
    rdir = store.round(round_index)
    if rdir.has(STAGE):
        log.info("round %d: eval already done, reusing %s", round_index, rdir.metrics_file(STAGE))
        return rdir.metrics(STAGE)
    t0 = time.perf_counter()
    records, metrics = eval_stage(round_index=round_index, store=store, **stage_args)
    metrics["time/eval_s"] = time.perf_counter() - t0
    rdir.write(STAGE, records, metrics)
    return metrics


def summary_line(round_index: int, metrics: Mapping[str, float]) -> str:
    """One log line with the headline numbers."""

    def f(key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(metrics[key]) if key in metrics else "-"

    line = (
        f"round {round_index} eval: win rate vs start {f('eval/vs_start/winrate')} "
        f"(LC {f('eval/vs_start/lc_winrate')} ± {f('eval/vs_start/lc_winrate_se')}), "
        f"vs prev {f('eval/vs_prev/winrate')}, IF prompt acc {f('eval/if/prompt_accuracy', '{:.3f}')}, "
        f"judge agreement {f('eval/judge_agreement', '{:.3f}')}"
    )
    if "eval/refined/steps" in metrics:
        line += (
            f"; refined ({int(metrics['eval/refined/steps'])} steps) vs start {f('eval/refined/vs_start/winrate')}, "
            f"vs direct {f('eval/refined/vs_direct/winrate')}"
        )
    return line
