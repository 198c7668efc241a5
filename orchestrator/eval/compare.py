"""A round's answers against a baseline round's: the fixed judge's verdicts, the win rates (raw and
length-controlled) and the round's own model as a judge on the same pairs (its agreement with the
fixed judge and its parse rate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator import chat
from orchestrator.chat import Messages
from orchestrator.eval import lc_winrate, pairwise
from orchestrator.eval.generations import HELD_OUT, Key, Response
from orchestrator.roles import call
from orchestrator.types import Generation


def judge_instructions(messages: Sequence[Messages]) -> list[str]:
    """What the judges read as the instruction: the prompt's conversation."""
    return [chat.transcript(m) for m in messages]


@dataclass
class Comparison:
    """The fixed judge on this round's answers (``mine``) against a baseline round's (``theirs``)."""

    name: str  # "vs_start" / "vs_prev": the metric prefix eval/<name>/
    baseline_round: int
    prompt_ids: list[str]
    messages: list[Messages]
    mine: list[str]
    theirs: list[str]
    verdicts: list[pairwise.PairVerdict]

    @property
    def instructions(self) -> list[str]:
        return judge_instructions(self.messages)

    def subset(self, idx: Sequence[int]) -> Comparison:
        def pick(xs: list[Any]) -> list[Any]:
            return [xs[i] for i in idx]

        return Comparison(
            self.name, self.baseline_round, pick(self.prompt_ids), pick(self.messages), pick(self.mine),
            pick(self.theirs), pick(self.verdicts),
        )


def compare(
    judge: Any, name: str, baseline_round: int, ours: Mapping[Key, Response], theirs: Mapping[Key, Response],
    prompt_ids: Sequence[str], pairwise_cfg: Mapping[str, Any],
) -> Comparison:
    """Judge the held-out prompts both rounds answered for the same prompt (a changed prompt is left out)."""
    keys = [(HELD_OUT, pid) for pid in prompt_ids]
    keys = [k for k in keys if k in ours and k in theirs and ours[k].messages == theirs[k].messages]
    messages, mine, base = [ours[k].messages for k in keys], [ours[k].text for k in keys], [theirs[k].text for k in keys]
    verdicts = pairwise.judge_pairs(judge, judge_instructions(messages), mine, base, pairwise_cfg)
    return Comparison(name, baseline_round, [pid for _, pid in keys], messages, mine, base, verdicts)


def winrate_metrics(cmp: Comparison, lc: Mapping[str, Any]) -> dict[str, float]:
    """``eval/<name>/``: pairs, the judge's valid and identical rates, its position consistency and
    bias (``pairwise.position_stats``), raw and LC win rates with SEs."""
    prefix, verdicts = f"eval/{cmp.name}/", cmp.verdicts
    keep = [i for i, v in enumerate(verdicts) if v.preference is not None]
    metrics: dict[str, float] = {
        f"{prefix}pairs": float(len(verdicts)),
        f"{prefix}judge_valid_rate": len(keep) / len(verdicts) if verdicts else 0.0,
        f"{prefix}identical_rate": sum(v.identical for v in verdicts) / len(verdicts) if verdicts else 0.0,
        **{prefix + k: v for k, v in pairwise.position_stats(verdicts).items()},
    }
    if not keep:
        return metrics
    res = lc_winrate.lc_winrate(
        [verdicts[i].preference for i in keep],
        [len(cmp.mine[i]) for i in keep],
        [len(cmp.theirs[i]) for i in keep],
        penalty=str(lc["penalty"]),
        C=float(lc["C"]),
        se_method=str(lc["se"]),
        bootstrap=int(lc["bootstrap"]),
        seed=int(lc["seed"]),
    )
    for key in ("winrate", "winrate_se", "lc_winrate", "lc_winrate_se", "glm_phi"):
        metrics[prefix + key] = res[key]
    return metrics


def _policy_preferences(
    policy: Any, cmp: Comparison, method: str, pairwise_cfg: Mapping[str, Any], judge_cfg: Mapping[str, Any]
) -> tuple[list[float | None], float | None]:
    """The round's model as a judge on ``cmp``'s pairs: (its preferences, its parse rate)."""
    if method == "pairwise":
        verdicts = pairwise.judge_pairs(policy, cmp.instructions, cmp.mine, cmp.theirs, pairwise_cfg)
        valid = [v for v in verdicts if not v.identical]
        rate = (sum(v.orders for v in valid) / (2 * len(valid))) if valid else None
        return [v.preference for v in verdicts], rate
    # pointwise: the recipe's own judge scores each answer; the higher score wins.
    gens = []
    for pid, msgs, a, b in zip(cmp.prompt_ids, cmp.messages, cmp.mine, cmp.theirs):
        gens.append(Generation(prompt_id=pid, messages=msgs, index=0, text=a, num_tokens=0, source="eval"))
        gens.append(Generation(prompt_id=pid, messages=msgs, index=1, text=b, num_tokens=0, source="eval"))
    scores = [j.score for j in call(policy, "score", gens, dict(judge_cfg))]
    rate = sum(s is not None for s in scores) / len(scores)
    return pairwise.pointwise_preferences(scores[0::2], scores[1::2]), rate


def policy_as_judge(
    policy: Any, cmp: Comparison, method: str, pairwise_cfg: Mapping[str, Any], judge_cfg: Mapping[str, Any]
) -> tuple[list[float | None], dict[str, float]]:
    """The round's model (the next round's Self-Rewarding judge) on the pairs whose answers differ.

    Returns its preference per pair of ``cmp`` (None for identical answers, which nobody judges)
    and the metrics: agreement with the fixed judge, the pairs it is measured on, the parse rate.
    """
    judged = [i for i, v in enumerate(cmp.verdicts) if not v.identical]
    prefs: list[float | None] = [None] * len(cmp.verdicts)
    if not judged:
        return prefs, {}
    subset = cmp.subset(judged)
    got, rate = _policy_preferences(policy, subset, method, pairwise_cfg, judge_cfg)
    for i, p in zip(judged, got):
        prefs[i] = p
    agree, n_agree = pairwise.agreement([v.preference for v in subset.verdicts], got)
    metrics = {"eval/judge_agreement_pairs": float(n_agree)}
    if agree is not None:
        metrics["eval/judge_agreement"] = agree
    if rate is not None:
        metrics["eval/policy_judge_parse_rate"] = rate
    return prefs, metrics
