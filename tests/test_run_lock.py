"""One writer per run directory: a live holder refuses a second one with one line naming it, a
dead holder's lock is named and taken over, and no run is ever overwritten."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from orchestrator.store import LOCK, RunLock, RunLocked, RunStore, StorageError

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from orchestrator.store import RunLock
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    if sys.argv[2] == "die":
        import os
        os._exit(0)  # as a SIGKILL would: no release
    time.sleep(600)
    """
)


def hold_lock(run_dir: Path, then: str = "sleep") -> subprocess.Popen:
    """A real second process that takes the run dir's lock and keeps it (or dies holding it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), then], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(tmp_path):
    proc = hold_lock(tmp_path / "run")
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_a_second_writer_naming_it(tmp_path, holder):
    with pytest.raises(RunLocked) as refused:
        RunLock(tmp_path / "run").acquire()
    line = str(refused.value)
    assert "\n" not in line
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line and "in use" in line


def test_the_cli_refuses_a_second_writer_with_one_line(tmp_path, tiny_checkpoint, holder):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *tiny_overrides(tiny_checkpoint, run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"pid {holder.pid}" in errors[0] and str(run_dir) in errors[0]
    assert not (run_dir / "manifest.json").exists()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == holder.pid  # the holder's lock is untouched


def test_a_dead_holders_lock_is_named_and_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    dead = hold_lock(run_dir, then="die")
    dead.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == dead.pid  # left behind, as after a SIGKILL

    store = RunStore(run_dir)
    with caplog.at_level(logging.WARNING), store.locked():
        held = json.loads((run_dir / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
        with pytest.raises(RunLocked):  # held now: a second open of the same run dir is refused too
            RunLock(run_dir).acquire()
    assert f"taking over the lock of pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    assert not (run_dir / LOCK).exists()  # released: removed
    RunLock(run_dir).acquire()  # and free again


def test_create_never_overwrites_a_run(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create({"rounds": 2}, "rounds: 2\n")
    manifest = (tmp_path / "run" / "manifest.json").read_bytes()
    with pytest.raises(StorageError, match="already holds a run; add resume=true"):
        RunStore(tmp_path / "run").create({"rounds": 5}, "rounds: 5\n")
    assert (tmp_path / "run" / "manifest.json").read_bytes() == manifest
    assert (tmp_path / "run" / "config.yaml").read_text() == "rounds: 2\n"


def test_checkpoint_temp_folders_are_unique_and_leftovers_go(tmp_path):
    rnd = RunStore(tmp_path / "run").round(1)
    first = rnd.checkpoint_tmp("policy")
    first.mkdir()
    second = rnd.checkpoint_tmp("policy")  # a killed build's folder is removed: the run lock makes it ours
    assert second != first and not first.exists()
    assert second.name.startswith(".policy.tmp-") and second.parent == rnd.path / "checkpoints"


def test_default_run_dirs_of_one_second_differ():
    from confs import composed

    dirs = {str(composed().run_dir) for _ in range(3)}
    assert len(dirs) == 3, dirs
