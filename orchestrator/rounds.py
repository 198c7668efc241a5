"""The steps of a Self-Rewarding round, each a resumable stage, for recipes to call in order.

Self-Rewarding (recipes/self_reward.py) calls them one by one, so it reads like its paper's box;
recipes that make their preference data the same way and differ after it (ExPO extrapolates the
trained checkpoint) call ``self_rewarding_pairs``. Each step is one ``Round.stage`` around a body
from ``orchestrator.stages``; none knows which recipe runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

from orchestrator import eval as evaluation
from orchestrator import plugins, stages
from orchestrator.config import to_plain
from orchestrator.controller import Controller, Round
from orchestrator.data import load_prompts
from orchestrator.roles import call
from orchestrator.types import Generation, Judgment, Pair, Prompt


def prompt_pool(ctl: Controller) -> list[Prompt]:
    """The run's prompt file (``data.prompts``), once none of the held-out eval prompts is in it."""
    pool = load_prompts(ctl.cfg.data.prompts)
    evaluation.preflight(ctl.cfg, pool)
    return pool


def prompts(rnd: Round, policy: Any, pool: list[Prompt]) -> list[Prompt]:
    """``data.prompts_per_round`` pool prompts unused in earlier rounds, plus new ones the policy
    writes by few-shot Self-Instruct (stage ``prompts``)."""
    ctl, t = rnd.ctl, rnd.index

    def make() -> tuple[list[Prompt], dict[str, float]]:
        used, earlier = ctl.used_prompts(before=t)
        return stages.round_prompts(
            call, policy, pool, used, earlier, to_plain(ctl.cfg.data), ctl.rng(t, "draw"), ctl.rng(t, "self_instruct"), t
        )

    return rnd.stage("prompts", Prompt, make)


def responses(rnd: Round, policy: Any, prompts: list[Prompt]) -> list[Generation]:
    """``generation.n`` samples per prompt from the policy (stage ``generations``)."""
    cfg = to_plain(rnd.ctl.cfg.generation)
    return rnd.stage("generations", Generation, lambda: stages.generate_responses(call, policy, prompts, cfg))


def judgments(rnd: Round, generations: list[Generation]) -> list[Judgment]:
    """The round's judge scores every sample (``judge.*``; stage ``judgments``)."""
    ctl = rnd.ctl
    cfg = to_plain(ctl.cfg.judge)
    return rnd.stage("judgments", Judgment, lambda: stages.judge_responses(call, ctl.judge(rnd.index), generations, cfg))


def pairs(rnd: Round, generations: list[Generation], judgments: list[Judgment]) -> list[Pair]:
    """Per prompt (highest, lowest) mean score, ties dropped (stage ``pairs``), then the chosen pair
    filters in order; returns the pairs to train on (stage ``train_pairs``)."""
    made = rnd.stage("pairs", Pair, lambda: stages.make_pairs(generations, judgments))
    return plugins.filter_pairs(rnd, made)


def self_rewarding_pairs(rnd: Round, pool: list[Prompt]) -> tuple[list[Pair], list[Generation]]:
    """A Self-Rewarding round's preference data: M_t writes prompts, answers each N times and (as
    the judge, unless ``judge.model`` names another) scores its answers; (best, worst) pairs,
    filtered. Returns the pairs to train on and the generations."""
    policy = rnd.ctl.policy(rnd.index)
    gens = responses(rnd, policy, prompts(rnd, policy, pool))
    return pairs(rnd, gens, judgments(rnd, gens)), gens


def finish(rnd: Round, generations: list[Generation], artifacts: Sequence[str] = ("pairs", "train_pairs")) -> None:
    """The round's artifacts (the stage files named in ``artifacts``, a sample of generations) and,
    when due, its eval."""
    ctl = rnd.ctl
    ctl.log_round_artifacts(rnd, list(artifacts), generations[: int(ctl.cfg.tracking.sample_generations)])
    evaluation.evaluate(rnd)
