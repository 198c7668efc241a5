"""Self-Rewarding Language Models (Yuan et al. 2024), one iteration M_t -> M_{t+1} per round.

    for t = 1 .. rounds:
        prompts     <- unused seed prompts + Self-Instruct prompts written by M_t
        generations <- N samples per prompt from M_t              (N=4, T=0.7, top_p=0.9)
        judgments   <- M_t judges each sample, K samples averaged (additive 5-point prompt)
        pairs       <- per prompt (highest, lowest) mean score; ties dropped
        pairs       <- pair filters, in order (none by default)
        M_{t+1}     <- DPO(M_t, pairs), reference model M_t      (beta=0.1)
        M_{t+1}     <- checkpoint transforms, in order (none by default)
        evaluate M_{t+1} on held-out prompts

Every stage's output is a JSONL file in the round's directory; a rerun with resume=true skips
the stages whose files exist.
"""

from __future__ import annotations

from orchestrator import eval as evaluation
from orchestrator import plugins, rounds
from orchestrator.controller import Controller
from orchestrator.roles import Role, core_roles
from orchestrator.training import train_dpo


def roles(cfg) -> list[Role]:
    return core_roles(cfg) + evaluation.roles(cfg) + plugins.roles(cfg)


def run(ctl: Controller) -> None:
    pool = rounds.prompt_pool(ctl)  # refuses held-out eval prompts among the training prompts

    for t in ctl.pending_rounds():
        with ctl.round(t) as rnd:
            policy = ctl.policy(t)  # M_t
            prompts = rounds.prompts(rnd, policy, pool)  # unused seed prompts + Self-Instruct by M_t
            generations = rounds.responses(rnd, policy, prompts)  # N samples per prompt
            judgments = rounds.judgments(rnd, generations)  # M_t judges each sample
            pairs = rounds.pairs(rnd, generations, judgments)  # (highest, lowest); pair filters
            train_dpo(rnd, pairs)  # M_{t+1}: the round's "policy" checkpoint
            plugins.apply_transforms(rnd)
            rounds.finish(rnd, generations)  # artifacts; evaluate M_{t+1} on held-out prompts
