"""``orchestrate``: run an experiment (``orchestrate +experiment=self_reward rounds=10``).

Errors a user can fix print as one ``error:`` line and exit with status 2; anything else prints
its traceback and exits with status 1. Both, and every log line, have the config's secrets masked
(orchestrator/redact.py). Ctrl-C and SIGTERM (``kill``, ``ray job stop``) mark the run KILLED in
its manifest and MLflow and exit with 130 / 143.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestrator import signals
from orchestrator.config import CONF_DIR, resolve_run_dir, validate
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.redact import guard, redact_text
from orchestrator.roles import Role

log = logging.getLogger("orchestrator")


def checked(cfg: DictConfig) -> tuple[ModuleType, list[Role]]:
    """Every check that needs no model and no Ray: config values, the recipe, its worker roles and
    plug-ins. Runs before anything is written, so a typo costs seconds, not a round."""
    from orchestrator.recipes import get_recipe

    validate(cfg)
    recipe = get_recipe(cfg.recipe)
    return recipe, recipe.roles(cfg)


def run(cfg: DictConfig) -> None:
    from orchestrator.controller import Controller

    recipe, roles = checked(cfg)
    if cfg.cluster.name == "ray_job":
        from orchestrator.submit import submit_run

        submit_run(cfg, sys.argv[1:])
        return
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    ctl = Controller(cfg, roles, overrides)
    with ctl.session():
        print(f"run dir: {ctl.store.root}  (continue a stopped run with: run_dir={ctl.store.root} resume=true)", flush=True)
        recipe.run(ctl)
    print(f"done: {int(cfg.rounds)} rounds in {ctl.store.root}; MLflow: {ctl.tracker.display_uri}", flush=True)


def guard_config(cfg: DictConfig) -> None:
    """Remember the config's secrets and redact every log handler, stdout and stderr, before
    anything is logged or printed."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a missing value: validate() reports it; its other values still count
        plain = OmegaConf.to_container(cfg, resolve=False)
    guard(plain, streams=True)


def report_failures(fn, cfg: DictConfig) -> None:
    """``fn(cfg)`` with its failures printed redacted: a fixable one as one ``error:`` line (exit
    2), anything else as a traceback (exit 1; Hydra would print it with a library's message as it
    is, and MLflow's name the tracking URI, credentials included)."""
    guard_config(cfg)
    try:
        fn(cfg)
    except OrchestratorError as exc:
        log.debug("failure", exc_info=True)
        if isinstance(exc, ConfigError):
            drop_empty_run_dir(cfg)
        print(f"error: {redact_text(str(exc))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        how = signals.stopped_by()
        print(f"stopped by {how}: the run is marked killed; continue it with{resume_hint(cfg)} resume=true",
              file=sys.stderr, flush=True)
        sys.exit(signals.exit_status(how))
    except Exception:
        print(redact_text(traceback.format_exc()), file=sys.stderr, flush=True)
        sys.exit(1)


def resume_hint(cfg: DictConfig) -> str:
    try:
        return f" run_dir={resolve_run_dir(cfg)}"
    except Exception:  # the stop came before the config was complete
        return ""


def drop_empty_run_dir(cfg: DictConfig) -> None:
    """A config error leaves no run dir behind: Hydra made RUN_DIR/hydra for its log before any of
    our code ran. Only this job's log file and then empty folders are removed, and only where no run
    lives (no manifest): a resume's or an unrelated folder's files are never touched."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    run_root = hydra_dir.parent
    if (run_root / "manifest.json").exists():
        return
    job_log = hydra_dir / f"{HydraConfig.get().job.name}.log"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == job_log:
            handler.close()
            logging.getLogger().removeHandler(handler)
    job_log.unlink(missing_ok=True)
    for folder in (hydra_dir, run_root):
        try:
            folder.rmdir()
        except OSError:  # not empty (or not ours): leave it
            return


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    report_failures(run, cfg)


def main() -> None:
    # Weights and data come from local paths only; never let a library reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    signals.install()
    _hydra_main()


if __name__ == "__main__":
    main()
