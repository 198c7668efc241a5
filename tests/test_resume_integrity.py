"""Resume trusts only what it can check: a damaged stage file or manifest stops the run with one
line saying what to delete; a stage made from inputs that have since been redone is redone, with
every later stage of its round; a kill at any point between write and rename loses nothing; a
full disk keeps the previous file. Real files, real MLflow, real processes; no Ray (see
test_crash_points_e2e below for the real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, kill_group, orchestrate, tiny_overrides, write_checkpoint
from orchestrator.chat import user
from orchestrator.controller import Round
from orchestrator.store import CRASH_ENV, CRASH_EXIT, MANIFEST_PREV, StorageError
from orchestrator.types import Prompt


def prompts(n: int, tag: str = "") -> list[Prompt]:
    return [Prompt(id=f"p{i}{tag}", messages=user(f"question {i} {tag}")) for i in range(n)]


def three_stages(ctl, ran: list[str], tag: str = "", checkpoint: bool = False) -> Round:
    """Round 1 of a toy recipe: stages a -> b -> c (and optionally a checkpoint), recording which bodies ran."""
    rnd = Round(ctl, 1)

    def body(name: str, n: int, t: str):
        def make():
            ran.append(name)
            return prompts(n, t), {f"toy/{name}": float(n)}
        return make

    rnd.stage("a", Prompt, body("a", 16, tag))
    rnd.stage("b", Prompt, body("b", 8, ""))
    rnd.stage("c", Prompt, body("c", 4, ""))
    if checkpoint:
        rnd.checkpoint("policy", "train", lambda out: (ran.append("train"), write_checkpoint(out, float(bool(tag))))[1])
    return rnd


@pytest.fixture
def finished(local_controller, tmp_path):
    """A run dir whose round 1 has stages a, b, c (16, 8, 4 records) and a policy checkpoint."""
    ctl = local_controller()
    three_stages(ctl, [], checkpoint=True)
    return tmp_path / "run"


def resume(local_controller, run_dir: Path):
    return local_controller("resume=true", run_dir=run_dir)


def truncate_lines(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:7]))


def mid_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 3])


DAMAGE = {
    "truncated at a line boundary": (truncate_lines, "7 of 16 records"),
    "empty": (lambda p: p.write_text(""), "0 of 16 records"),
    "truncated mid-line": (mid_line, "of 16 records"),
    "edited in place": (lambda p: p.write_text(p.read_text().replace("question", "qu3stion")), "sha256 differs"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_stage_file_stops_resume_with_one_line(finished, local_controller, how):
    damage, words = DAMAGE[how]
    target = finished / "rounds" / "round_001" / "a.jsonl"
    damage(target)
    with pytest.raises(StorageError) as failed:
        resume(local_controller, finished)
    line = str(failed.value)
    assert "\n" not in line and words in line and f"{target} is damaged" in line and "delete it" in line

    target.unlink()  # what the line says to do: then the stage and the later ones are redone
    ran: list[str] = []
    three_stages(resume(local_controller, finished), ran, checkpoint=True)
    # a's new content is the same (deterministic toy), so b, c and the checkpoint are reused
    assert ran == ["a"]


def test_the_real_cli_reports_a_damaged_file_in_one_line(finished, tiny_checkpoint):
    target = finished / "rounds" / "round_001" / "b.jsonl"
    mid_line(target)  # before: a traceback from the JSON parser
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "model=local", f"model.path={tiny_checkpoint}", f"run_dir={finished}", "resume=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{target} is damaged" in errors[0] and "delete it" in errors[0]


def test_a_truncated_manifest_names_its_previous_version(finished, local_controller):
    manifest = finished / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(StorageError) as failed:
        resume(local_controller, finished)
    line = str(failed.value)
    assert "\n" not in line and f"{manifest} is damaged" in line and MANIFEST_PREV in line

    (finished / MANIFEST_PREV).replace(manifest)  # the fix the line gives
    ctl = resume(local_controller, finished)
    assert ctl.store.manifest["mlflow"] == good["mlflow"]


def test_a_stage_made_from_other_inputs_is_redone_with_every_later_one(finished, local_controller):
    before = {name: (finished / "rounds" / "round_001" / f"{name}.jsonl").read_bytes() for name in "bc"}
    sha = json.loads((finished / "manifest.json").read_text())["rounds"]["1"]["checkpoints"]["policy"]["sha256"]

    ran: list[str] = []
    three_stages(resume(local_controller, finished), ran, checkpoint=True)
    assert ran == []  # nothing changed: everything reused

    (finished / "rounds" / "round_001" / "a.jsonl").unlink()  # e.g. generations redone...
    ran = []
    ctl = resume(local_controller, finished)
    three_stages(ctl, ran, tag="new", checkpoint=True)  # ...and they come out different
    assert ran == ["a", "b", "c", "train"]  # old judgments (b, c) and the trained policy are not mixed in
    assert {name: (finished / "rounds" / "round_001" / f"{name}.jsonl").read_bytes() for name in "bc"} == before
    assert ctl.store.manifest["rounds"]["1"]["checkpoints"]["policy"]["sha256"] != sha
    assert {"a", "b", "c", "train"} <= set(ctl.store.manifest["rounds"]["1"]["logged"])


def test_a_stage_written_just_before_its_meta_is_trusted_and_gets_one(finished, local_controller):
    meta = finished / "rounds" / "round_001" / "b.meta.json"
    want = json.loads(meta.read_text())
    meta.unlink()  # a kill between the data file's rename and its meta
    ran: list[str] = []
    three_stages(resume(local_controller, finished), ran, checkpoint=True)
    assert ran == [] and json.loads(meta.read_text()) == want


CRASH = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    from pathlib import Path
    from conftest import make_controller
    from test_resume_integrity import three_stages
    ctl = make_controller(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
    three_stages(ctl, [], checkpoint=True)
    """
)


@pytest.mark.parametrize("point", ["before_rename:b.jsonl", "written:b", "before_rename:manifest.json#6", "published:policy"])
def test_a_kill_at_each_point_resumes_to_the_same_result(tmp_path, tiny_checkpoint, local_controller, point):
    reference = tmp_path / "reference"
    three_stages(local_controller(run_dir=reference), [], checkpoint=True)

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CRASH, tiny_checkpoint, str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, CRASH_ENV: point})
    assert proc.returncode == CRASH_EXIT, proc.stdout + proc.stderr  # died at the point, as a SIGKILL would

    ran: list[str] = []
    ctl = resume(local_controller, run_dir)
    three_stages(ctl, ran, checkpoint=True)
    rdir = run_dir / "rounds" / "round_001"
    for name in "abc":
        assert (rdir / f"{name}.jsonl").read_bytes() == (reference / "rounds" / "round_001" / f"{name}.jsonl").read_bytes()
    assert not list(rdir.glob(".*.tmp")) and not list((rdir / "checkpoints").glob(".*"))  # the killed writer's temps are gone
    assert "train" not in ran or point != "published:policy"  # a published checkpoint is never trained again

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    parent = ctl.store.manifest["mlflow"]["parent_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    assert sorted(r.info.run_name for r in runs if r.info.run_id != parent) == ["round_001"]  # no duplicate child run
    child = ctl.store.manifest["rounds"]["1"]["mlflow_run_id"]
    for name in "abc":
        assert len(client.get_metric_history(child, f"toy/{name}")) == 1, name  # each stage's metrics logged once


EFBIG = textwrap.dedent(
    """
    import resource, sys
    from omegaconf import OmegaConf
    from orchestrator import signals
    from orchestrator.chat import user
    from orchestrator.cli import report_failures
    from orchestrator.store import RunStore
    from orchestrator.types import Prompt
    store = RunStore(sys.argv[1])
    store.create({"rounds": 1}, "rounds: 1\\n")
    rdir = store.round(1)
    rdir.write("generations", [Prompt(id="small", messages=user("q"))], {"gen/n": 1.0}, "inputs-1")
    signals.install()  # as orchestrate does: SIGXFSZ ignored, so the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    big = [Prompt(id=f"p{i}", messages=user("x" * 1000)) for i in range(200)]

    def write(cfg):
        if sys.argv[2] == "stage":
            rdir.write("generations", big, {"gen/n": 200.0}, "inputs-1")
        else:
            store.manifest["notes"] = "x" * 100000
            store.save()

    report_failures(write, OmegaConf.create({}))
    """
)


@pytest.mark.parametrize("what", ["stage", "manifest"])
def test_a_file_size_limit_keeps_the_previous_file(tmp_path, what):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", EFBIG, str(run_dir), what], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "EFBIG" in errors[0] and "is unchanged" in errors[0]

    from orchestrator.store import RunStore

    store = RunStore(run_dir)
    store.load()  # the manifest and every stage file still check out
    assert "notes" not in store.manifest
    assert [p.id for p in store.round(1).read("generations", Prompt)] == ["small"]
    assert not [p for p in run_dir.rglob(".*.tmp")]


@pytest.mark.e2e
@pytest.mark.slow
def test_crash_points_e2e(tmp_path, tiny_checkpoint, monkeypatch):
    """The real CLI on the tiny model, killed between the judgments file's write and rename, then
    between the policy checkpoint's publish and the manifest: each resume redoes only what was
    lost; one MLflow child run for the round; the run finishes."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_checkpoint, run_dir, rounds=1) + ["eval.every=0"]
    round1 = run_dir / "rounds" / "round_001"

    for point in ("before_rename:judgments.jsonl", "published:policy"):
        monkeypatch.setenv(CRASH_ENV, point)
        proc = orchestrate(args + (["resume=true"] if (run_dir / "manifest.json").exists() else []))
        out, _ = proc.communicate(timeout=1500)
        kill_group(proc)  # its Ray workers, as after a SIGKILL of the driver
        assert proc.returncode == CRASH_EXIT, out[-4000:]
        if point.startswith("before_rename"):
            assert not (round1 / "judgments.jsonl").exists() and list(round1.glob(".judgments.jsonl.*.tmp"))
            generations = (round1 / "generations.jsonl").read_bytes(), (round1 / "generations.jsonl").stat().st_mtime_ns
        else:
            assert (round1 / "checkpoints" / "policy" / "config.json").exists()
            assert "policy" not in json.loads((run_dir / "manifest.json").read_text())["rounds"]["1"].get("checkpoints", {})
            trained = (round1 / "checkpoints" / "policy" / "model.safetensors").stat().st_mtime_ns

    monkeypatch.delenv(CRASH_ENV)
    proc = orchestrate(args + ["resume=true"])
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-5000:]
    assert ((round1 / "generations.jsonl").read_bytes(), (round1 / "generations.jsonl").stat().st_mtime_ns) == generations
    assert (round1 / "checkpoints" / "policy" / "model.safetensors").stat().st_mtime_ns == trained  # not trained twice
    assert not list(round1.glob(".*.tmp"))

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["rounds"]["1"]["status"] == "done"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    parent = manifest["mlflow"]["parent_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    assert sorted(r.info.run_name for r in runs if r.info.run_id != parent) == ["round_001"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for metric in ("gen/tokens_per_s", "judge/score_mean", "pairs/kept"):
        history = client.get_metric_history(parent, metric)
        assert [h.step for h in history] == [1], (metric, history)
