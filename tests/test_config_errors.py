"""Every config error is raised before anything is written: no run dir, no manifest. And resume
compares only the keys both configs have, so new code keys with defaults never block a resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from orchestrator.errors import ConfigError

# (override, words the one-line error must contain): the list first, then the counts and
# flags that int()/bool() used to read silently.
BAD = [
    ("+filter.name=upo", ["filter.name", "filters=[name"]),
    ("eval.pairwise.mode=bogus", ["eval.pairwise.mode='bogus'", "soft, hard"]),
    ("eval.judge.model=/nonexistent", ["eval.judge.model=/nonexistent", "no such directory"]),
    ("eval.prompts=/nonexistent", ["eval.prompts='/nonexistent'", "no such file"]),
    ("generation.release_for_training=bogus", ["generation.release_for_training='bogus'", "one of"]),
    ("generation.max_tokens=1024", ["generation.max_tokens=1024", "max_model_len"]),
    ("train.epochs=0.5", ["train.epochs=0.5", "whole number"]),
    ("judge.min_score=5", ["judge.min_score=5", "below judge.max_score"]),
    ("rounds=true", ["rounds=True", "whole number"]),
    ("seed=1.5", ["seed=1.5", "whole number"]),
    ("generation.n=2.5", ["generation.n=2.5", "whole number >= 2"]),
    ("judge.samples=true", ["judge.samples=True", "whole number"]),
    ("tracking.sample_generations=-1", ["tracking.sample_generations=-1"]),
    ("resume=maybe", ["resume='maybe'", "true or false"]),
    ("generation.start_timeout_s=0", ["generation.start_timeout_s=0", "> 0"]),
    ("data.self_instruct.rouge_l_max=2", ["data.self_instruct.rouge_l_max=2", "(0, 1]"]),
    ("train.dropout=1", ["train.dropout=1", "[0, 1)"]),
    ("experiment_name=null", ["experiment_name=None", "non-empty"]),
    ("train.save_steps=0", ["train.save_steps=0", "whole number >= 1"]),
    ("train.bf16=fast", ["train.bf16='fast'", "true, false or auto"]),
    ("generation.engine.block_size=40", ["generation.engine.block_size=40", "multiple of 16"]),
    ("cluster.timeouts.engine=-1", ["cluster.timeouts.engine=-1", "seconds >= 0"]),
    ("+generation.resources.custom.CPU=1", ["generation.resources.custom.CPU=1", "num_cpus"]),
    ("+train.resources.custom.train_node=true", ["train.resources.custom.train_node=True", "amount >= 0"]),
    ("judge=function", ["judge.function=None", "pkg.module:function"]),
    ("+judge.kind=bogus", ["judge.kind='bogus'", "one of"]),
]


def config(tmp_path, tiny_checkpoint, *overrides):
    from confs import composed

    # max_model_len 1024 as in the tiny runs, so generation.max_tokens=1024 is "at" it
    return composed(["model=local", f"model.path={tiny_checkpoint}", "generation.engine.max_model_len=1024", *overrides,
                     f"run_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("override, words", BAD, ids=[o for o, _ in BAD])
def test_bad_value_fails_before_anything_is_written(tmp_path, tiny_checkpoint, override, words):
    from orchestrator.cli import checked

    with pytest.raises(ConfigError) as failed:
        checked(config(tmp_path, tiny_checkpoint, override))  # what `orchestrate` checks first
    message = str(failed.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "run").exists()


def test_the_default_config_passes(tmp_path, tiny_checkpoint):
    from orchestrator.cli import checked

    checked(config(tmp_path, tiny_checkpoint))


@pytest.mark.parametrize("override", ["+filter.name=upo", "eval.judge.model=/nonexistent", "rounds=true"])
def test_through_the_real_cli_no_run_dir_is_left(tmp_path, tiny_checkpoint, override):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "model=local", f"model.path={tiny_checkpoint}", override, f"run_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not run_dir.exists(), list(run_dir.rglob("*"))  # not even Hydra's log folder


def test_a_config_error_on_resume_keeps_the_run(tmp_path, tiny_checkpoint):
    """The clean-up of Hydra's folder after a config error never touches a folder that holds a run."""
    run_dir = tmp_path / "run"
    (run_dir / "hydra").mkdir(parents=True)
    (run_dir / "hydra" / "cli.log").write_text("an earlier start's log\n")
    (run_dir / "manifest.json").write_text(json.dumps({"config": {}, "rounds": {}, "status": "failed"}))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "model=local", f"model.path={tiny_checkpoint}", "rounds=true",
         "resume=true", f"run_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "rounds=True" in proc.stderr
    assert (run_dir / "manifest.json").exists() and "an earlier start's log" in (run_dir / "hydra" / "cli.log").read_text()


def open_run(run_dir, *overrides):
    from orchestrator.controller import Controller
    from orchestrator.recipes import get_recipe
    from orchestrator.submit import compose_config

    cfg = compose_config([f"run_dir={run_dir}", *overrides])
    ctl = Controller(cfg, get_recipe(cfg.recipe).roles(cfg), overrides)
    ctl.open_store()
    return ctl


def test_resume_ignores_keys_the_code_added_or_dropped_since(tmp_path):
    """A run started by older code: its manifest lacks keys the code has now (they take their
    defaults) and has one the code no longer reads. Neither is a change the user made."""
    run_dir = tmp_path / "run"
    open_run(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["config"]["judge"]["max_parse_failure_rate"]
    del manifest["config"]["generation"]["engine"]
    manifest["config"]["train"]["retired_knob"] = 3
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    ctl = open_run(run_dir, "resume=true")
    assert ctl.store.manifest["status"] == "running"
    with pytest.raises(ConfigError, match=r"changed config \(train.beta\)"):  # what the user set still counts
        open_run(run_dir, "resume=true", "train.beta=0.05")
    with pytest.raises(ConfigError, match=r"changed config \(train.new_knob\)"):  # a key the user adds is a change too
        open_run(run_dir, "resume=true", "+train.new_knob=1")
    with pytest.raises(ConfigError, match=r"changed config \(generation.engine.max_model_len\)"):
        open_run(run_dir, "resume=true", "generation.engine.max_model_len=4096")
