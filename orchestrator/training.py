"""Training a round's checkpoint on the trainer role (workers/trainer.py), as a named checkpoint:
DPO on preference pairs (``train_dpo``) or supervised fine-tuning on demonstrations (``train_sft``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from orchestrator.config import to_plain
from orchestrator.controller import POLICY, Round
from orchestrator.errors import OrchestratorError
from orchestrator.types import Demonstration, Pair, TrainResult

log = logging.getLogger(__name__)


def train_dpo(rnd: Round, pairs: list[Pair], *, base: str | None = None, name: str = POLICY) -> str:
    """DPO from ``base`` (default: the policy that started the round, also the reference) on
    ``pairs``; the result is the round's checkpoint ``name``. Returns its path."""
    from workers.trainer import TrainerWorker

    ctl = rnd.ctl
    base = base or ctl.model_path(rnd.index - 1)

    def build(out: Path) -> dict[str, float]:
        if not pairs:
            raise OrchestratorError(
                f"round {rnd.index}: no preference pairs to train on (every prompt tied, was unscored or was "
                f"filtered out); see {rnd.dir.metrics_file('pairs')} and {rnd.dir.metrics_file('train_pairs')}"
            )
        released = ctl.workers.release_for("trainer")
        result = TrainResult.from_dict(
            ctl.workers.run(
                "trainer", TrainerWorker, "train", [p.to_dict() for p in pairs], base, str(out),
                to_plain(ctl.cfg.train), int(ctl.cfg.seed) + rnd.index,
            )
        )
        return {
            **result.metrics, **released,
            "train/steps": float(result.steps), "train/pairs": float(result.num_pairs), "train/worker_s": result.wall_s,
        }

    return rnd.checkpoint(name, "train", build)


def train_sft(
    rnd: Round,
    examples: list[Demonstration],
    *,
    base: str,
    name: str = POLICY,
    stage: str = "train",
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
    prefix: str = "train/",
) -> str:
    """Supervised fine-tuning of ``base`` on ``examples``; the result is the round's checkpoint
    ``name``, its build metrics the stage ``stage``, named ``<prefix>...`` (several trainings in one
    round keep their metrics apart). The ``train`` section with ``overrides`` merged over it gives
    the trainer's settings; the seed defaults to ``seed + round``. Returns the checkpoint's path."""
    from workers.trainer import TrainerWorker

    ctl = rnd.ctl
    cfg = to_plain(OmegaConf.merge(ctl.cfg.train, dict(overrides or {})))
    seed = int(ctl.cfg.seed) + rnd.index if seed is None else int(seed)

    def build(out: Path) -> dict[str, float]:
        if not examples:
            raise OrchestratorError(f"round {rnd.index}: no demonstrations to train checkpoint {name!r} on")
        released = ctl.workers.release_for("trainer")
        result = TrainResult.from_dict(
            ctl.workers.run("trainer", TrainerWorker, "sft", [e.to_dict() for e in examples], base, str(out), cfg, seed)
        )
        metrics = {**result.metrics, "train/steps": float(result.steps), "train/worker_s": result.wall_s}
        return {**{prefix + k.removeprefix("train/"): v for k, v in metrics.items()}, **released}

    return rnd.checkpoint(name, stage, build)
