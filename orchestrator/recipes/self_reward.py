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
from orchestrator import plugins, stages
from orchestrator.config import to_plain
from orchestrator.controller import Controller
from orchestrator.data import load_prompts
from orchestrator.roles import Role, call, core_roles
from orchestrator.training import train_dpo
from orchestrator.types import Generation, Judgment, Pair, Prompt


def roles(cfg) -> list[Role]:
    return core_roles(cfg) + evaluation.roles(cfg) + plugins.roles(cfg)


def run(ctl: Controller) -> None:
    cfg = ctl.cfg
    pool = load_prompts(cfg.data.prompts)
    seed_texts = [p.text for p in pool]
    evaluation.preflight(cfg, pool)  # refuse held-out eval prompts among the training prompts

    for t in ctl.pending_rounds():
        with ctl.round(t) as rnd:
            policy = ctl.policy(t)  # M_t

            def make_prompts() -> tuple[list[Prompt], dict[str, float]]:
                used, earlier = ctl.used_prompts(before=t)
                drawn, wrapped = stages.draw_prompts(pool, {p.id for p in used}, int(cfg.data.prompts_per_round), ctl.rng(t, "draw"))
                new, metrics = stages.self_instruct(
                    call, policy, seed_texts, [p.text for p in earlier], seed_texts + [p.text for p in used],
                    to_plain(cfg.data.self_instruct), ctl.rng(t, "self_instruct"), t,
                )
                metrics.update({"prompts/seed": len(drawn), "prompts/self_instruct": len(new), "prompts/pool_wrapped": float(wrapped)})
                return drawn + new, metrics

            prompts = rnd.stage("prompts", Prompt, make_prompts)
            generations = rnd.stage(
                "generations", Generation, lambda: stages.generate_responses(call, policy, prompts, to_plain(cfg.generation))
            )
            judgments = rnd.stage(
                "judgments", Judgment, lambda: stages.judge_responses(call, ctl.judge(t), generations, to_plain(cfg.judge))
            )
            pairs = rnd.stage("pairs", Pair, lambda: stages.make_pairs(generations, judgments))
            pairs = plugins.filter_pairs(rnd, pairs)  # -> train_pairs
            train_dpo(rnd, pairs)  # M_{t+1}: the round's "policy" checkpoint
            plugins.apply_transforms(rnd)
            ctl.log_round_artifacts(rnd, ["pairs", "train_pairs"], generations[: int(cfg.tracking.sample_generations)])
            evaluation.evaluate(rnd)
