"""SIGTERM (``kill``, ``ray job stop``) on a real run: the driver marks the run KILLED in its
manifest and in MLflow (the parent run and the open round's child run), exits promptly, and
resume=true finishes the run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import kill_group, orchestrate, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wait_for(path, proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (rc={proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.2)


def test_sigterm_marks_the_run_killed_then_resume_finishes(tmp_path, tiny_checkpoint):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_checkpoint, run_dir, rounds=1) + ["eval.every=0"]
    proc = orchestrate(args)
    round1 = run_dir / "rounds" / "round_001"
    try:
        wait_for(round1 / "generations.jsonl", proc, timeout=1200)  # mid-round: judging is next
        t0 = time.time()
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `kill PID` would
        out, _ = proc.communicate(timeout=180)
        took = time.time() - t0
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert took < 120, took
    assert "stopped by SIGTERM" in out and "resume=true" in out and "Traceback" not in out, out[-4000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "killed"
    assert manifest["rounds"]["1"]["status"] != "done"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    parent = manifest["mlflow"]["parent_run_id"]
    child = manifest["rounds"]["1"]["mlflow_run_id"]
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"
    assert not (run_dir / "run.lock").exists()  # released on the way out

    generations = round1 / "generations.jsonl"
    before = (generations.read_bytes(), generations.stat().st_mtime_ns)
    resumed = orchestrate(args + ["resume=true"])
    out, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, out[-5000:]
    assert (generations.read_bytes(), generations.stat().st_mtime_ns) == before  # reused, not redone
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["rounds"]["1"]["status"] == "done"
    assert client.get_run(parent).info.status == "FINISHED" and client.get_run(child).info.status == "FINISHED"
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    assert len(runs) == 2, [r.info.run_name for r in runs]  # the parent and round_001, nothing duplicated
