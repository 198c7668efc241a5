"""``orchestrate-eval model.path=CHECKPOINT``: evaluate one checkpoint against the starting model.

The same metrics as the per-round eval stage, in a run directory of its own (default
``outputs/eval/<timestamp>``): round 0 is the baseline (the config's model without ``model.path``,
i.e. the embedded default, or ``eval.baseline=PATH``), round 1 the checkpoint. Win rates of the
checkpoint against the baseline (raw and length-controlled, by the fixed judge ``eval.judge``), IF
accuracy of both, and the checkpoint-as-judge's agreement with the fixed judge. MLflow gets a
parent run with round_000 / round_001 child runs, as for training runs; ``orchestrate-report`` reads
the directory. Any other key of the config can be overridden as for ``orchestrate``
(``eval.max_prompts=32``, ``eval.judge.model=/path/to/judge``, ``run_dir=...``, ``resume=true``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import hydra
from omegaconf import DictConfig, open_dict

from orchestrator import eval as evaluation
from orchestrator.cli import report_failures
from orchestrator.config import CONF_DIR, to_plain, validate
from orchestrator.controller import POLICY, Controller
from orchestrator.data import load_prompts
from orchestrator.errors import ConfigError
from orchestrator.models import resolve_model_path
from orchestrator.report import collect, format_table
from orchestrator.roles import core_roles

log = logging.getLogger("orchestrator")

# Added to the command line unless the user sets them.
DEFAULT_OVERRIDES = {"run_dir": "outputs/eval/${now:%Y-%m-%d_%H-%M-%S.%f}", "rounds": "1"}


def _baseline_path(cfg: DictConfig) -> str:
    spec = cfg.eval.baseline
    if spec:
        return resolve_model_path(
            {"name": "baseline", "path": str(spec), "gguf": None, "cache_dir": cfg.model.cache_dir}, what="eval.baseline"
        )
    if not cfg.model.gguf:
        raise ConfigError(
            "orchestrate-eval: no baseline to compare with; set eval.baseline=/path/to/starting/checkpoint "
            "(the default baseline is the embedded model, which this model config does not have)"
        )
    return resolve_model_path({**to_plain(cfg.model), "path": None}, what="model")


def run(cfg: DictConfig) -> Path:
    """Evaluate ``model.path`` as round 1 of a one-round run whose starting model is the baseline."""
    validate(cfg)
    if not cfg.model.get("path"):
        raise ConfigError("orchestrate-eval needs the checkpoint to evaluate: model.path=/path/to/checkpoint")
    evaluation.preflight(cfg, load_prompts(cfg.data.prompts))
    # Both models are checked before the run directory is made.
    checkpoint = resolve_model_path(cfg.model)
    baseline = _baseline_path(cfg)
    policy = [role for role in core_roles(cfg) if role.name == "policy"]
    ctl = Controller(cfg, policy + evaluation.roles(cfg))
    with ctl.session():
        ctl.start_model = baseline
        ctl.store.manifest["start_model"] = {"path": baseline}
        ctl.store.manifest["eval_checkpoint"] = {"path": checkpoint}
        ctl.store.save()
        print(f"run dir: {ctl.store.root}\nevaluating {checkpoint}\nagainst   {baseline}", flush=True)
        # The checkpoint is round 1's policy, so the round loop's hook evaluates it against round 0.
        with ctl.round(1) as rnd:
            rnd.adopt(POLICY, checkpoint)
            evaluation.evaluate(rnd)
    print(format_table(collect(ctl.store.root)), flush=True)
    return ctl.store.root


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        # One evaluated round, whatever eval.every says (it schedules evals in training runs).
        cfg.rounds = 1
        cfg.eval.every = 1
    # Failures and log lines with the config's secrets masked, as for ``orchestrate``.
    report_failures(run, cfg)


def with_defaults(args: Sequence[str]) -> list[str]:
    """The command line with DEFAULT_OVERRIDES added for keys the user did not set."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")}
    return list(args) + [f"{k}={v}" for k, v in DEFAULT_OVERRIDES.items() if k not in given]


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0] if sys.argv else "orchestrate-eval", *with_defaults(args)]
    _hydra_main()


if __name__ == "__main__":
    main()
