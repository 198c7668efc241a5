"""Kill a real run mid-round (SIGKILL to its process group) and resume it with resume=true."""

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import kill_group, orchestrate, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wait_for(path: Path, proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.2)


def test_kill_mid_round_then_resume(tmp_path, tiny_checkpoint):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_checkpoint, run_dir) + ["eval.every=0"]
    proc = orchestrate(args)
    round1 = run_dir / "rounds" / "round_001"
    # pairs.jsonl is written just before training starts: kill during round 1's training.
    wait_for(round1 / "pairs.jsonl", proc, timeout=900)
    kill_group(proc)
    assert not (round1 / "checkpoints" / "policy").exists(), "the kill came too late to be mid-round"

    before = {name: (round1 / name).read_bytes() for name in ("prompts.jsonl", "generations.jsonl", "judgments.jsonl", "pairs.jsonl")}
    mtimes = {name: (round1 / name).stat().st_mtime_ns for name in before}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent_id = manifest["mlflow"]["parent_run_id"]
    child1 = manifest["rounds"]["1"]["mlflow_run_id"]

    # same command without resume=true is refused rather than overwriting the run
    refused = orchestrate(args)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "resume=true" in out

    resumed = orchestrate(args + ["resume=true"])
    out, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, out[-5000:]
    assert "generations already done" in out

    # finished stages were reused byte for byte, not redone
    for name, data in before.items():
        assert (round1 / name).read_bytes() == data
        assert (round1 / name).stat().st_mtime_ns == mtimes[name]
    assert (round1 / "checkpoints" / "policy" / "model.safetensors").exists()
    assert (run_dir / "rounds" / "round_002" / "checkpoints" / "policy" / "model.safetensors").exists()

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["mlflow"]["parent_run_id"] == parent_id
    assert manifest["rounds"]["1"]["mlflow_run_id"] == child1

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id])
    assert len(runs) == 3, [r.info.run_name for r in runs]  # one parent, two rounds: nothing duplicated
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert client.get_run(child1).info.status == "FINISHED"
    # metrics logged before the kill are not logged a second time on resume
    history = client.get_metric_history(parent_id, "gen/tokens_per_s")
    assert sorted(h.step for h in history) == [1, 2]
