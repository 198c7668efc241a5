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
        ("train.method=qlora", ["train.method", "full or lora"]),
        ("rounds=0", ["rounds=0"]),
        ("train.beta=abc", ["train.beta", "number"]),
    ],
)
def test_bad_config_value(tmp_path, tiny_checkpoint, override, words):
    line = error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", override, f"run_dir={tmp_path / 'run'}"))
    for word in words:
        assert word in line
    assert not (tmp_path / "run" / "manifest.json").exists()


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
    error_line(run_cli("model=local", f"model.path={tiny_checkpoint}", "rounds=0", f"storage.path={shared}", f"run_dir={name}/run"))
    assert (shared / name / "run" / "hydra").is_dir()
    assert not (ROOT / name).exists()
