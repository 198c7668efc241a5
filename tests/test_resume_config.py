"""Which config changes a resumed run accepts: how the work runs may change, what it computes may not."""

from __future__ import annotations

import pytest

from orchestrator.controller import Controller
from orchestrator.errors import ConfigError
from orchestrator.recipes import get_recipe
from orchestrator.submit import compose_config


def open_run(run_dir, *overrides):
    cfg = compose_config([f"run_dir={run_dir}", *overrides])
    ctl = Controller(cfg, get_recipe(cfg.recipe).roles(cfg), overrides)
    ctl.open_store()
    return ctl


@pytest.mark.parametrize(
    "change",
    [
        ["rounds=5"],
        ["generation.engine.gpu_memory_utilization=0.1", "train.micro_batch_size=1"],  # after an out-of-memory kill
        ["generation.resources.num_gpus=0.5", "train.resources.num_gpus=0.5", "generation.release_for_training=sleep"],
        ["eval.judge.engine.gpu_memory_utilization=0.02", "generation.engine.cpu_bind=auto", "storage.path=/shared"],
    ],
)
def test_resume_accepts_changes_to_how_the_work_runs(tmp_path, change):
    open_run(tmp_path / "run")
    ctl = open_run(tmp_path / "run", "resume=true", *change)
    assert ctl.store.manifest["status"] == "running"


@pytest.mark.parametrize("change", ["train.beta=0.05", "generation.n=8", "train.batch_size=32", "eval.max_prompts=8", "seed=1"])
def test_resume_refuses_changes_to_what_it_computes(tmp_path, change):
    open_run(tmp_path / "run")
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"changed config \({key}\)"):
        open_run(tmp_path / "run", "resume=true", change)
