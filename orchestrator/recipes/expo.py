"""ExPO: model extrapolation (Zheng et al. 2024; algorithms.md 4) on iterative Self-Rewarding DPO.

    for t = 1 .. rounds:
        pairs       <- Self-Rewarding's data from M_t: prompts, N samples, M_t judges, (best, worst)
        theta_1     <- DPO(M_t, pairs), reference M_t                    the round's "policy" checkpoint
        theta_0     <- M_t (anchor=prev) or the starting model M_1 (anchor=start)
        for alpha in {0} + alphas:                                         (0.1, 0.3, 0.5, 1.0)
            theta_alpha <- theta_1 + alpha * (theta_1 - theta_0)          every parameter
            score(alpha) <- mean judge score of theta_alpha's answers to held-out dev prompts
        alpha*      <- argmax_alpha score(alpha)      (ties: the smaller; or a fixed alpha)
        M_{t+1}     <- theta_{alpha*}                                      the round's "expo" checkpoint
        evaluate M_{t+1} on held-out prompts

The paper's part is the formula and choosing alpha by the mean score of each candidate's answers to
a development set; it extrapolates once, from an SFT model to its DPO/RLHF-aligned version (there
anchor=start, and the final model is not trained further). Ours: one extrapolation per round, whose
result the next round trains from (``anchor=prev`` extrapolates just the round's update); a judge
(the fixed eval judge by default) in place of the paper's reward model; alpha = 0 always among the
candidates. The ExPO step is the ``expo`` checkpoint transform (orchestrator/transforms/expo.py,
knobs in conf/transforms/expo.yaml), which any recipe can also run (``transforms=[expo]``).
"""

from __future__ import annotations

from orchestrator import eval as evaluation
from orchestrator import plugins, rounds
from orchestrator.config import to_plain
from orchestrator.controller import Controller
from orchestrator.errors import ConfigError
from orchestrator.roles import Role, core_roles
from orchestrator.training import train_dpo

TRANSFORM = "expo"


def roles(cfg) -> list[Role]:
    node = to_plain(cfg.get("transform") or {}).get(TRANSFORM)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"recipe=expo extrapolates with the {TRANSFORM} transform, which is not chosen: keep +experiment=expo's "
            f"transforms=[{TRANSFORM}] (other transforms may come before or after it)"
        )
    return core_roles(cfg) + evaluation.roles(cfg) + plugins.roles(cfg)


def run(ctl: Controller) -> None:
    pool = rounds.prompt_pool(ctl)  # refuses held-out eval prompts among the training prompts

    for t in ctl.pending_rounds():
        with ctl.round(t) as rnd:
            pairs, generations = rounds.self_rewarding_pairs(rnd, pool)  # M_t writes, answers, judges
            train_dpo(rnd, pairs)  # theta_1: the round's "policy" checkpoint
            plugins.apply_transforms(rnd)  # ExPO: the "expo" checkpoint, alpha searched on dev prompts
            rounds.finish(rnd, generations)  # artifacts; evaluate M_{t+1} on held-out prompts
