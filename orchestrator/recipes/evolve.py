"""EVOLVE (Zeng et al. 2025, arXiv 2502.05605; v1/v2 "ARIES"): self-refinement-driven data
collection and preference training, one iteration M_t -> M_{t+1} per round (algorithms.md 2).

    for t = 1 .. rounds:
        prompts       <- unused seed prompts + Self-Instruct prompts written by M_t  (as Self-Rewarding)
        y_0           <- M_t(x), evolve.chains samples per prompt, T=0.7, top_p=0.9   generations
        for k = 1 .. K (evolve.refine_steps, 3):
            y_k       <- M_t(T_ref(x, y_{k-1}))        the chain of self-refinement  refine_k
        s_0 .. s_K    <- the judge scores each y_k as an answer to x                  judgments, judgments_k
        per chain     (y_w, y_l) <- judge: best vs worst score (ties dropped)
                                    rule:  (y_K, y_0), kept if s_K - s_0 >= evolve.rule_min_gain
        pairs         <- direct (x; y_w, y_l)            weight evolve.loss_weights.direct
                       + refine (T_ref(x, y_l); y_w, y_l) weight evolve.loss_weights.refine
        pairs         <- pair filters, in order (none by default)
        M_{t+1}       <- DPO(M_t, pairs), reference M_t: one run over both kinds, each pair's loss
                         times its weight, so the loss is  w_d * DPO_direct + w_r * DPO_refine
        M_{t+1}       <- checkpoint transforms, in order (none by default)
        evaluate M_{t+1}: direct answers and K-step chain-of-self-refinement answers (eval.refine_steps)

Every stage is a JSONL file in the round's directory (refine_1, refine_2, ... one per step, so a
run killed mid-chain resumes at the step); per-round metrics ``evolve/score_step_k``,
``evolve/refine_gain``, ``evolve/improved_share``, ``evolve/pairs_direct`` / ``evolve/pairs_refine``.

Departures and UNCONFIRMED choices (the paper's full text was not reachable; check against it):

- Refinement template (``evolve.template``, ``evolve.refine_format``; UNCONFIRMED): one user turn
  T_ref(x, y) holding the question and the earlier answer ("example response") and asking for a
  better, clearer, more accurate answer (orchestrator/refine.py SINGLE_TURN_TEMPLATE), as the
  spec reads the paper; ``refine_format=multi_turn`` puts y as an assistant turn and the template
  as a follow-up request instead.
- Loss (``evolve.loss_weights``; UNCONFIRMED): the spec's reading L = L_DPO(x; y_w, y_l) +
  L_DPO(T_ref(x, y_l); y_w, y_l), weights 1 and 1 ("possibly weighted"). The trainer averages
  ``weight * loss`` over all pairs, so with one pair of each kind per chain the loss is half the
  sum (AdamW makes that constant factor immaterial); both kinds train in the same run.
- Selection (``evolve.selection``; UNCONFIRMED details): ``judge`` (default; the paper's "reward
  model scoring", which reviewers say built its data) or ``rule`` (the paper's rule-based
  selection as recalled: final refinement chosen, initial answer rejected) with our consistency
  check: kept only if the judge does not score y_K below y_0 (``evolve.rule_min_gain=0``; null
  turns the check off, unscored ends are still dropped). Both drop pairs of identical texts.
- The scorer is the ``judge`` role (default: the policy itself with Self-Rewarding's 5-point
  prompt, as in Self-Rewarding), not the paper's external reward model; ``judge.model=PATH`` or
  ``judge.endpoint.base_url`` gives a fixed scorer.
- One chain per prompt (``evolve.chains``); ``generation.n`` is not used by this recipe.
- No refinement-aware SFT stage (the paper's stage 1): the starting model is already
  instruction-tuned; rounds are the paper's stage 2 (iterative preference training).
- Prompts are Self-Rewarding's (seed pool + Self-Instruct by the policy), not UltraFeedback.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestrator import eval as evaluation
from orchestrator import plugins, refine, rounds, stages
from orchestrator.config import check, number, to_plain
from orchestrator.controller import Controller
from orchestrator.pairs import KINDS, SELECTIONS, chain_pairs, pair_metrics
from orchestrator.roles import Role, call, core_roles
from orchestrator.training import train_dpo
from orchestrator.types import Generation, Judgment, Pair


def validate(cfg: DictConfig) -> None:
    """The ``evolve`` section's values (ConfigError naming the key); run before anything is written."""
    check("evolve" in cfg and OmegaConf.is_dict(cfg.evolve), "evolve", cfg.get("evolve"), "the recipe's section; use +experiment=evolve")
    ev = cfg.evolve
    whole = lambda key: number(cfg, key).is_integer() and not isinstance(OmegaConf.select(cfg, key), bool)  # noqa: E731
    check(number(cfg, "evolve.refine_steps") >= 1 and whole("evolve.refine_steps"), "evolve.refine_steps", ev.refine_steps,
          "a whole number >= 1 (refinements of each answer)")
    check(
        2 * number(cfg, "generation.max_tokens") < number(cfg, "generation.engine.max_model_len"),
        "generation.max_tokens", cfg.generation.max_tokens,
        "twice it must stay below generation.engine.max_model_len: a refinement prompt holds an earlier answer, then the new one",
    )
    check(number(cfg, "evolve.chains") >= 1 and whole("evolve.chains"), "evolve.chains", ev.chains, "a whole number >= 1 (chains per prompt)")
    check(ev.selection in SELECTIONS, "evolve.selection", ev.selection, f"one of {', '.join(SELECTIONS)}")
    if ev.rule_min_gain is not None:
        number(cfg, "evolve.rule_min_gain")
    check(ev.refine_format in refine.FORMATS, "evolve.refine_format", ev.refine_format, f"one of {', '.join(refine.FORMATS)}")
    problem = refine.template_problem(ev.template, str(ev.refine_format))
    check(problem is None, "evolve.template", ev.template, str(problem))
    weights = ev.loss_weights
    check(OmegaConf.is_dict(weights) and set(weights) == set(KINDS), "evolve.loss_weights", to_plain(weights),
          f"a weight for each pair kind: {', '.join(KINDS)}")
    for kind in KINDS:
        w = number(cfg, f"evolve.loss_weights.{kind}")
        check(w >= 0 and w == w and w != float("inf"), f"evolve.loss_weights.{kind}", weights[kind], "a finite number >= 0")
    check(any(float(weights[k]) > 0 for k in KINDS), "evolve.loss_weights", to_plain(weights), "at least one weight > 0")


def roles(cfg) -> list[Role]:
    validate(cfg)
    return core_roles(cfg) + evaluation.roles(cfg) + plugins.roles(cfg)


def make_pairs(chains: list[refine.Chain], ev: dict[str, Any]) -> tuple[list[Pair], dict[str, float]]:
    """The pairs stage: both kinds of pairs from the round's chains, with the chain metrics."""
    template, fmt = ev["template"], str(ev["refine_format"])
    min_gain = None if ev["rule_min_gain"] is None else float(ev["rule_min_gain"])
    pairs, dropped = chain_pairs(
        chains, str(ev["selection"]), ev["loss_weights"],
        lambda x, y: refine.refine_messages(x, y, template, fmt), rule_min_gain=min_gain,
    )
    selected = len({(p.prompt_id, p.meta["chain"]) for p in pairs})
    metrics = pair_metrics(pairs, dropped, len(chains))
    metrics["pairs/kept_rate"] = selected / len(chains) if chains else 0.0  # the share of chains that gave pairs
    metrics.update(refine.chain_metrics(chains))
    for kind in KINDS:
        metrics[f"evolve/pairs_{kind}"] = float(sum(p.meta["kind"] == kind for p in pairs))
    return pairs, metrics


def run(ctl: Controller) -> None:
    cfg = ctl.cfg
    ev = to_plain(cfg.evolve)
    gen_cfg = to_plain(cfg.generation)
    template, fmt, K = ev["template"], str(ev["refine_format"]), int(ev["refine_steps"])
    pool = rounds.prompt_pool(ctl)  # refuses held-out eval prompts among the training prompts

    for t in ctl.pending_rounds():
        with ctl.round(t) as rnd:
            policy = ctl.policy(t)  # M_t
            prompts = rounds.prompts(rnd, policy, pool)  # unused seed prompts + Self-Instruct by M_t
            questions = {p.id: p.messages for p in prompts}  # x

            # y_0: the direct answers, evolve.chains per prompt
            steps = [rnd.stage(
                "generations", Generation,
                lambda: stages.generate_responses(call, policy, prompts, {**gen_cfg, "n": int(ev["chains"])}),
            )]
            # y_k = M_t(T_ref(x, y_{k-1})): one stage per step, so a killed run resumes at the step
            for k in range(1, K + 1):
                steps.append(rnd.stage(
                    f"refine_{k}", Generation,
                    lambda prev=steps[-1], k=k: stages.refine_responses(
                        call, policy, prev, questions, template, fmt, gen_cfg, prefix=f"refine/{k}/"),
                ))
            # s_k: every step judged as an answer to x (step 0's file and metrics are Self-Rewarding's)
            judgments = []
            for k, answers in enumerate(steps):
                name, prefix = ("judgments", "judge/") if k == 0 else (f"judgments_{k}", f"judge/refine_{k}/")
                judgments.append(rnd.stage(
                    name, Judgment,
                    lambda a=answers, p=prefix: stages.judge_answers(call, ctl.judge(t), a, questions, to_plain(cfg.judge), p),
                ))
            chains = refine.build_chains(steps, judgments)
            pairs = rnd.stage("pairs", Pair, lambda: make_pairs(chains, ev))
            pairs = plugins.filter_pairs(rnd, pairs)  # -> train_pairs
            train_dpo(rnd, pairs)  # M_{t+1}: the round's "policy" checkpoint, both kinds in one DPO run
            plugins.apply_transforms(rnd)
            rounds.finish(rnd, steps[-1])  # artifacts (a sample of final refinements); evaluate M_{t+1}
