"""Bad input gives one clear ``error:`` line and exit status 2, before anything is written."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_cli(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def error_line(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override, words",
    [
        ("generation.n=1", ["generation.n=1", "at least 2"]),
        ("judge.mode=vibes", ["judge.mode", "score_only"]),
        ("train.method=qlora", ["train.method", "one of full, lora"]),
        ("train.loss=ipo", ["train.loss", "one of dpo"]),
        ("train.micro_batch_size=3", ["train.batch_size=16", "multiple of train.micro_batch_size (3)"]),
        ("train.epochs=0.5", ["train.epochs=0.5", "whole number"]),  # was a silent no-op round
        ("rounds=0", ["rounds=0"]),
        ("rounds=true", ["rounds=True", "whole number"]),
        ("train.beta=abc", ["train.beta", "number"]),
        ("judge.min_score=6", ["judge.min_score=6", "below judge.max_score"]),
        ("generation.max_tokens=2048", ["generation.max_tokens=2048", "max_model_len"]),
        ("generation.release_for_training=bogus", ["generation.release_for_training='bogus'", "sleep"]),
        ("generation.engine.kv_cache_gib=0", ["generation.engine.kv_cache_gib=0", "> 0 GiB"]),
        ("filters=[rip]", None),  # the control: a valid plug-in passes validation
    ],
)
def test_bad_config_value(tmp_path, tiny_checkpoint, override, words):
    from confs import composed

    from orchestrator.cli import checked
    from orchestrator.errors import ConfigError

    cfg = composed(["model=local", f"model.path={tiny_checkpoint}", override, f"run_dir={tmp_path / 'run'}"])
    if words is None:
        checked(cfg)  # passes
        return
    with pytest.raises(ConfigError) as failed:
        checked(cfg)  # what `orchestrate` checks before it writes anything or starts Ray
    for word in words:
        assert word in str(failed.value)
    assert not (tmp_path / "run").exists()


def test_a_bad_config_value_through_the_real_cli(tmp_path, tiny_checkpoint):
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", "train.epochs=0.5", f"run_dir={tmp_path / 'run'}"))
    assert "train.epochs=0.5" in line
    assert not (tmp_path / "run" / "manifest.json").exists()  # only Hydra's own log is there


def test_missing_model_path(tmp_path):
    line = error_line(run_cli("model=local", f"model.path={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}"))
    assert "model.path" in line and "no such directory" in line
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_empty_and_malformed_prompt_files(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", f"data.prompts={empty}", f"run_dir={tmp_path / 'r1'}"))
    assert "data.prompts" in line and "no prompts" in line

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n{not json\n")
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", f"data.prompts={bad}", f"run_dir={tmp_path / 'r2'}"))
    assert "line 2" in line and "not valid JSON" in line

    missing = tmp_path / "missing.jsonl"
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", f"data.prompts={missing}", f"run_dir={tmp_path / 'r3'}"))
    assert "data.prompts" in line


def test_resume_without_a_run(tmp_path, tiny_checkpoint):
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", "resume=true", f"run_dir={tmp_path / 'none'}"))
    assert "resume=true" in line and "no run" in line


def test_hydra_logs_follow_storage_path(tmp_path, tiny_checkpoint):
    """A relative run_dir lives under storage.path, Hydra's own log dir included (not under the cwd)."""
    name = f"storage-test-{tmp_path.name}"
    shared = tmp_path / "shared"
    # A failure after the config checks (a config error removes Hydra's folder: no run dir is left)
    (shared / name / "run").mkdir(parents=True)
    (shared / name / "run" / "manifest.json").write_text("{")
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", "resume=true", f"storage.path={shared}",
                              f"run_dir={name}/run"))
    assert "manifest.json is damaged" in line
    assert (shared / name / "run" / "hydra").is_dir()
    assert not (ROOT / name).exists()
