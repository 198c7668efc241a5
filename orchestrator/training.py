"""Training a round's checkpoint on the trainer role (workers/trainer.py), as a named checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.config import to_plain
from orchestrator.controller import POLICY, Round
from orchestrator.errors import OrchestratorError
from orchestrator.types import Pair, TrainResult

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
