"""Two Ray nodes on this machine, started with ``ray start``: a head offering ``gen_node`` (generation
and the driver) and a worker node offering ``train_node`` (training). Round 1 trains on the worker
node and its checkpoint reaches the head's engine through ``storage.path``, sealed and checked
(sha256); in round 2 the worker node is killed while its trainer runs: the job stops with one line
naming the trainer, and resumes on the head alone (``resume=true``, training resources the head has).

Only the processes of these two nodes are stopped (never a bare ``ray stop``: other Rays run here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, kill_group, tiny_overrides
from test_submit import VENV_BIN, _free_ports, _session_processes

from orchestrator.models import verify_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Node:
    """One ``ray start`` node: its session id (its processes) and the markers in their command lines."""

    def __init__(self, sid: int, markers: list[str]):
        self.sid, self.markers = sid, markers

    def kill(self, sig: int = signal.SIGKILL) -> None:
        import psutil

        procs = _session_processes(self.sid, self.markers)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)


def _ray_start(args: list[str], env: dict[str, str], temp_dir: str) -> Node:
    ports = _free_ports(7)
    cmd = [
        str(VENV_BIN / "ray"), "start", *args, "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    node = Node(proc.pid, [temp_dir, f"--node-manager-port={ports[0]}"])
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        node.kill()
        pytest.fail("ray start did not return within 240 s")
    if proc.returncode != 0:
        node.kill()
        pytest.fail(f"ray start failed:\n{out[-3000:]}")
    return node


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # `ray start` turns token auth on when ~/.ray/auth_token exists; these nodes are reached without one.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT), **extra)
    return env


def _orchestrate(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The real CLI in its own process group, joining the two nodes (conftest.orchestrate, with ``env``)."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**env, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before training round 2 (exit {proc.returncode}):\n{proc.stdout.read()[-5000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"no trainer reached round 2 within {timeout_s:.0f} s")
        time.sleep(1)


def test_two_nodes_handover_node_death_and_resume(tiny_checkpoint, tmp_path):
    shared = tmp_path / "shared"  # storage.path: "every node" reads it (one machine here)
    flag = tmp_path / "trainer_round2"
    head_dir = tempfile.mkdtemp(prefix="rayh2", dir="/tmp")  # short: Ray's unix sockets live here
    worker_dir = tempfile.mkdtemp(prefix="rayw2", dir="/tmp")
    gcs = _free_ports(1)[0]
    nodes: list[Node] = []
    proc = None
    try:
        nodes.append(_ray_start(["--head", f"--port={gcs}", "--num-cpus=3", "--num-gpus=0", "--include-dashboard=false",
                                 '--resources={"gen_node": 2}'], _env(), head_dir))  # fmt: skip
        # The worker node's trainers hang in round 2 (base: round 1's checkpoint) until the node is killed.
        nodes.append(_ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--num-gpus=0", '--resources={"train_node": 1}'],
                                _env(ORCHESTRATOR_HANG_AT=f"train_base:policy@{flag}"), worker_dir))  # fmt: skip
        run_env = _env(RAY_ADDRESS=f"127.0.0.1:{gcs}")
        args = tiny_overrides(tiny_checkpoint, Path("run2n"), rounds=2) + [
            f"storage.path={shared}", "eval.every=0", "generation.start_timeout_s=300",  # an engine start on a loaded 2-core host takes > 60 s
            "+generation.resources.custom.gen_node=1", "+train.resources.custom.train_node=1",
        ]  # fmt: skip
        proc = _orchestrate(args, run_env)
        _wait_for(flag, proc, 1500)
        nodes[1].kill()  # the worker node dies while its trainer runs
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 2, out[-5000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in out.split(errors[0])[1], out[-5000:]
        assert "the trainer worker" in errors[0] and "resume=true" in errors[0], errors[0]
        assert "died during train" in out  # the first loss, then the retry that no node can place
        run_dir = shared / "run2n"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        round1 = manifest["rounds"]["1"]
        assert round1["status"] == "done"
        ckpt = round1["checkpoints"]["policy"]
        assert verify_checkpoint(ckpt["path"], ckpt["sha256"]) == ckpt["sha256"]  # written on the worker node, sealed
        driver_log = (run_dir / "hydra" / "cli.log").read_text()  # the driver's INFO lines (the console is quiet)
        assert "gen_node" in driver_log and "train_node" in driver_log  # where each worker ran (logged with its node)

        # Resume on the survivor: training resources the head has.
        resumed = _orchestrate(args[:-1] + ["train.resources.custom={}", "resume=true"], run_env)
        out2, _ = resumed.communicate(timeout=1500)
        assert resumed.returncode == 0, out2[-5000:]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["rounds"]["2"]["status"] == "done"
        assert "round 1: done already" in (run_dir / "hydra" / "cli.log").read_text()
        ckpt2 = manifest["rounds"]["2"]["checkpoints"]["policy"]
        verify_checkpoint(ckpt2["path"], ckpt2["sha256"])
    finally:
        if proc is not None and proc.poll() is None:
            kill_group(proc)
        for node in reversed(nodes):
            node.kill(signal.SIGTERM)
            node.kill()
