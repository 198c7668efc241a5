"""The eval stage in the round loop: the fixed judge as a worker role, which rounds are evaluated,
and the hook a recipe calls at the end of each round (``evaluate(rnd)``)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from orchestrator.config import to_plain
from orchestrator.controller import Controller, Round
from orchestrator.data import load_prompts
from orchestrator.eval.config import START
from orchestrator.eval.plot import plot_run
from orchestrator.eval.stage import STAGE, EvalRecord, eval_stage, summary_line
from orchestrator.eval.answer_cache import answer_cache
from orchestrator.models import check_checkpoint_dir, checkpoint_fingerprint
from orchestrator.roles import ENGINE_EXECUTION_KEYS, Role, endpoint_resumable, vllm_role
from orchestrator.section import Section
from orchestrator.types import Prompt

log = logging.getLogger(__name__)

JUDGE = "eval_judge"


def roles(cfg: DictConfig) -> list[Role]:
    """The fixed eval judge, when eval is on: an endpoint client, or a vLLM engine of its own.

    The engine takes ``generation.engine`` with ``eval.judge.engine`` over it (a small KV cache).
    """
    if int(cfg.eval.every) <= 0:
        return []
    judge = cfg.eval.judge
    if judge.endpoint.base_url:
        return [Role(JUDGE, "endpoint", "eval.judge", to_plain(judge.resources), endpoint=to_plain(judge.endpoint),
                     resumable=endpoint_resumable("eval.judge"))]
    return [vllm_role(JUDGE, "eval.judge", cfg, engine=judge_engine(cfg), resources=judge.resources)]


def judge_engine(cfg: DictConfig) -> dict[str, Any]:
    """The fixed judge's engine settings: ``generation.engine`` with ``eval.judge.engine`` over it."""
    return {**to_plain(cfg.generation.engine), **to_plain(cfg.eval.judge.engine)}


def judge_checkpoint(model: str, start: str) -> str:
    """The fixed judge's weights: ``start`` (the starting model's path) for "start", else the local
    checkpoint ``eval.judge.model`` names (checked)."""
    return start if model == START else str(check_checkpoint_dir(model, what="eval.judge.model"))


def eval_due(round_index: int, every: int, total_rounds: int) -> bool:
    """Whether round ``round_index`` is evaluated: never with every=0; otherwise round 0 (the
    starting model), every ``every``-th round and the last round."""
    if every <= 0:
        return False
    return round_index == 0 or round_index % every == 0 or round_index == total_rounds


def training_prompts(ctl: Controller, up_to: int) -> list[Prompt]:
    """The run's prompt pool (``data.prompts``) and every prompt of rounds 1..``up_to``."""
    used, _ = ctl.used_prompts(before=up_to + 1)
    return load_prompts(ctl.cfg.data.prompts) + used


def fixed_judge(ctl: Controller) -> Any:
    """The eval judge's worker, started on first use: the same model every round."""
    judge = ctl.cfg.eval.judge
    if judge.endpoint.base_url:
        return ctl.workers.serve(JUDGE)
    return ctl.workers.serve(JUDGE, judge_checkpoint(str(judge.model), ctl.model_path(0)))


def computing(engine: dict[str, Any]) -> dict[str, Any]:
    """The engine settings that can change what it computes (the answer cache's key): a new or changed
    setting of how it runs (threads, batch size, sampler plug-in) keeps the answers."""
    return {k: v for k, v in engine.items() if k not in ENGINE_EXECUTION_KEYS}


def model_fingerprint(ctl: Controller, index: int) -> str | None:
    """The identity of the policy after round ``index`` for the shared answer cache: the manifest's
    checksum, or for the starting model the fingerprint of its files."""
    return ctl.checkpoint_sha256(index) if index > 0 else checkpoint_fingerprint(ctl.model_path(0))


def evaluate(rnd: Round) -> None:
    """The end of round ``rnd.index`` (after training): evaluate the new policy when it is due.

    Evaluates round 0 first if it has not been (in its own MLflow child run, round_000), then the
    policy after this round (``ctl.policy(t + 1)``; the next round's ``ctl.policy(t + 1)`` is then
    a no-op). Both go through ``Round.stage``: resumable, metrics on the round's child run and the
    parent with step=round. Writes and logs RUN_DIR/eval_metrics.png. The judge's worker is
    stopped after the last round.
    """
    ctl = rnd.ctl
    total = int(ctl.cfg.rounds)
    if not eval_due(rnd.index, int(ctl.cfg.eval.every), total):
        return

    def run(index: int) -> tuple[list[EvalRecord], dict[str, float]]:
        ev = Section("eval", to_plain(ctl.cfg.eval))
        return eval_stage(
            round_index=index, policy=ctl.policy(index + 1), fixed_judge=fixed_judge(ctl), store=ctl.store,
            cfg=ev, judge_cfg=to_plain(ctl.cfg.judge), train_prompts=training_prompts(ctl, rnd.index),
            shared_answers=answer_cache(ev, model_fingerprint(ctl, index), computing(to_plain(ctl.cfg.generation.engine))),
        )

    start = Round(ctl, 0)
    if not start.dir.has(STAGE) or STAGE not in start.state.get("logged", []):
        start.stage(STAGE, EvalRecord, lambda: run(0))
        ctl.tracker.end_round(0)
        log.info(summary_line(0, start.dir.metrics(STAGE)))
    rnd.stage(STAGE, EvalRecord, lambda: run(rnd.index))
    log.info(summary_line(rnd.index, rnd.dir.metrics(STAGE)))
    png = plot_run(ctl.store.root)
    if png is not None:
        ctl.tracker.log_artifact(png)
    if rnd.index >= total:
        ctl.workers.stop(JUDGE)
