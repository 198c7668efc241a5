"""Worker faults with a real local Ray and real workers: the generation engine killed mid-generate
(the call is redone once on a fresh engine), a hung engine stopped by its timeout, the trainer
SIGKILLed mid-training (the retry resumes from its last saved step), a task that dies twice, a
worker that cannot be placed and an engine whose checkpoint fails its check: each ends in one line
naming the worker, its node and the resume command.

The workers hang at a named point (``workers.cores.hang_point``) so that the test can kill them in
the middle of a stage; the kills and timeouts are real."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from orchestrator.errors import OrchestratorError
from orchestrator.models import SEAL, checkpoint_fingerprint, seal_checkpoint
from orchestrator.roles import Role, WorkerFault, Workers, call, core_roles
from orchestrator.types import GenerationRequest
from workers.cores import HANG_ENV

pytestmark = pytest.mark.slow

FLAGS = ("gen_kill", "gen_hang_1", "gen_hang_2", "train_kill")


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flags")
    return {name: root / name for name in FLAGS}


@pytest.fixture(scope="module")
def cluster(flags):
    """A local Ray whose workers hang where the flags say (the environment is fixed when Ray starts)."""
    points = {"gen_kill": "generate:2", "gen_hang_1": "generate:3", "gen_hang_2": "generate:3", "train_kill": "train_saved:2"}
    old = os.environ.get(HANG_ENV)
    os.environ[HANG_ENV] = ",".join(f"{points[n]}@{flags[n]}" for n in FLAGS)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.pop(HANG_ENV) if old is None else os.environ.__setitem__(HANG_ENV, old)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("sealed") / "model"
    shutil.copytree(tiny_checkpoint, path)
    (path / SEAL).unlink(missing_ok=True)
    return str(path), seal_checkpoint(path)


def _workers(tmp_path: Path, *overrides: str, roles: list[Role] | None = None) -> Workers:
    from confs import composed

    cfg = composed(["model=local", "model.path=/unused", f"run_dir={tmp_path / 'run'}", "generation.engine.kv_cache_gib=0.25",
                    "generation.engine.max_model_len=512", *overrides])  # fmt: skip
    workers = Workers(roles or core_roles(cfg), seed=0, start_timeout_s=float(cfg.generation.start_timeout_s))
    workers.reserve(cfg)
    return workers


def _when(flag: Path, then, timeout_s: float = 600) -> threading.Thread:
    """Run ``then(pid)`` once a worker hangs at the point ``flag`` stands for."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not flag.exists() or not flag.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        then(int(flag.read_text()))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _assert_one_line(fault: WorkerFault, *parts: str) -> None:
    text = str(fault)
    assert "\n" not in text and "Traceback" not in text, text
    for part in parts:
        assert part in text, (part, text)


def test_generation_engine_killed_or_hung_mid_stage(cluster, flags, model, tmp_path, caplog):
    path, sha = model
    workers = _workers(tmp_path, "+cluster.timeouts.policy=30")
    request = GenerationRequest(prompts=["hello there", "what is two plus two"], n=2, max_tokens=8)
    try:
        engine = workers.serve("policy", path, sha)
        first = ray.get(engine.info.remote())["pid"]
        # ray.kill of the engine while it generates: the call is redone on a fresh engine.
        _when(flags["gen_kill"], lambda pid: ray.kill(workers.live["policy"]))
        out = call(engine, "generate", request)
        assert len(out) == 2 and all(len(c.texts) == 2 for c in out)
        assert flags["gen_kill"].exists()
        fresh = workers.live["policy"]
        assert ray.get(fresh.info.remote())["pid"] != first
        assert any("died during generate" in r.message and "redoing generate once" in r.message for r in caplog.records)

        # A hung engine: stopped at its timeout and replaced; the fresh one hangs as well: one line.
        t0 = time.monotonic()
        with pytest.raises(WorkerFault) as exc:
            # three prompts: the hang points for this call; the old handle: the call goes to the live engine
            call(engine, "generate", GenerationRequest(prompts=["a", "b", "c"], n=1, max_tokens=8))
        assert time.monotonic() - t0 >= 60
        _assert_one_line(
            exc.value, "the policy worker (VLLMWorker, generation) on ", "did not finish generate within 30s",
            "(cluster.timeouts.policy); it was stopped (after one retry on a fresh engine); rerun the same command with", f"run_dir={tmp_path / 'run'} resume=true",
        )  # fmt: skip
    finally:
        workers.stop_all()


def test_trainer_killed_mid_training_resumes_from_its_saved_step(cluster, flags, model, tmp_path, caplog):
    from test_checkpoint_integrity import _pairs, _train_cfg

    from workers.trainer import TrainerWorker

    path, sha = model
    workers = _workers(tmp_path)
    state = tmp_path / "state"
    _when(flags["train_kill"], lambda pid: os.kill(pid, signal.SIGKILL))  # as the OOM killer does
    result = workers.run(
        "trainer", TrainerWorker, "train", _pairs(6), path, str(tmp_path / "out"), _train_cfg(save_steps=2), 0, str(state), sha
    )
    assert flags["train_kill"].exists()
    assert result["metrics"]["train/resumed_from_step"] == 2.0 and result["steps"] == 6
    assert any("died during train" in r.message and "once more on a fresh worker" in r.message for r in caplog.records)
    assert checkpoint_fingerprint(tmp_path / "out")


class Crasher:
    def work(self) -> None:
        os._exit(3)


# The workers cannot import this test module: its classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_task_that_dies_twice_is_one_line(cluster, tmp_path):
    workers = _workers(tmp_path)
    with pytest.raises(WorkerFault) as exc:
        workers.run("trainer", Crasher, "work")
    _assert_one_line(exc.value, "the trainer worker (Crasher, train) on ", "died during work (",
                     "(after one retry on a fresh worker); rerun the same command with run_dir=", "resume=true")  # fmt: skip


def test_a_worker_no_node_can_place_is_one_line(cluster, tmp_path):
    role = Role("trainer", "task", "train", {"num_cpus": 1, "custom": {"train_node": 1}})
    workers = _workers(tmp_path, "generation.start_timeout_s=5", roles=[role])
    with pytest.raises(WorkerFault) as exc:
        workers.run("trainer", Crasher, "work")
    _assert_one_line(exc.value, "the trainer worker (train) could not be placed within 5s", "'train_node': 1",
                     "with train.resources that the live nodes have")  # fmt: skip


def test_an_engine_on_a_damaged_checkpoint_fails_to_start_in_one_line(cluster, model, tmp_path):
    path, sha = model
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    (damaged / "tokenizer_config.json").write_text("{}")
    workers = _workers(tmp_path)
    with pytest.raises(OrchestratorError) as exc:
        workers.serve("policy", str(damaged), sha)
    text = str(exc.value)
    assert "\n" not in text and "tokenizer_config.json has sha256" in text and str(damaged) in text
