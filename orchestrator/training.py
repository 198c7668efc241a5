"""Training a round's checkpoint on the trainer role (workers/trainer.py), as a named checkpoint:
DPO on preference pairs (``train_dpo``) or supervised fine-tuning on demonstrations (``train_sft``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
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
    base_sha256 = None if base else ctl.checkpoint_sha256(rnd.index - 1)
    base = base or ctl.model_path(rnd.index - 1)
    state = train_state_dir(rnd, name)

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
                to_plain(ctl.cfg.train), int(ctl.cfg.seed) + rnd.index, str(state), base_sha256,
            )
        )
        return {
            **result.metrics, **released,
            "train/steps": float(result.steps), "train/pairs": float(result.num_pairs), "train/worker_s": result.wall_s,
        }

    path = rnd.checkpoint(name, "train", build)
    drop_train_state(state)  # published: the saved steps are of no use any more
    return path


def train_state_dir(rnd: Round, name: str) -> Path:
    """Where the training of round checkpoint ``name`` saves its steps (train.save_steps): in the run
    dir, so a retry on another node finds them too."""
    return rnd.dir.path / "train_state" / name


def drop_train_state(state: Path) -> None:
    shutil.rmtree(state, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another checkpoint's training state is still there
        state.parent.rmdir()


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
    state = train_state_dir(rnd, name)

    def build(out: Path) -> dict[str, float]:
        if not examples:
            raise OrchestratorError(f"round {rnd.index}: no demonstrations to train checkpoint {name!r} on")
        released = ctl.workers.release_for("trainer")
        result = TrainResult.from_dict(
            ctl.workers.run("trainer", TrainerWorker, "sft", [e.to_dict() for e in examples], base, str(out), cfg, seed, str(state))
        )
        metrics = {**result.metrics, "train/steps": float(result.steps), "train/worker_s": result.wall_s}
        return {**{prefix + k.removeprefix("train/"): v for k, v in metrics.items()}, **released}

    path = rnd.checkpoint(name, stage, build)
    drop_train_state(state)
    return path
