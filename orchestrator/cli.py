"""``orchestrate``: run an experiment (``orchestrate +experiment=self_reward rounds=10``).

Errors a user can fix print as one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys

from types import ModuleType

import hydra
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, validate
from orchestrator.errors import OrchestratorError
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
    ctl = Controller(cfg, roles)
    with ctl.session():
        print(f"run dir: {ctl.store.root}  (continue a stopped run with: run_dir={ctl.store.root} resume=true)", flush=True)
        recipe.run(ctl)
    print(f"done: {int(cfg.rounds)} rounds in {ctl.store.root}; MLflow: {ctl.tracker.uri}", flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except OrchestratorError as exc:
        log.debug("failure", exc_info=True)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    # Weights and data come from local paths only; never let a library reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _hydra_main()


if __name__ == "__main__":
    main()
