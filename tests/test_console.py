"""The run's console (orchestrator/console.py): progress from workers to one line per stage, worker
output into RUN_DIR/logs/<role>.log, a failure's log tail, the round summary and the closing hints."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, write_checkpoint

from orchestrator import console as con
from orchestrator.errors import ConfigError
from orchestrator.types import Generation


def quiet_console(run_dir: Path, **kw) -> tuple[con.Console, io.StringIO]:
    out = io.StringIO()
    return con.Console(run_dir, stream=out, live=False, **kw), out


# -- worker side --------------------------------------------------------------------------------


def test_progress_text_has_count_rate_eta_and_loss():
    rec = {"what": "generate", "unit": "req", "done": 96, "total": 192, "started": 100.0, "updated": 130.0,
           "info": {"tok/s": 115.2}}
    text = con.progress_text(rec, width=10)
    assert text.split("  ")[:2] == ["generate", "━━━━━─────"]
    assert "96/192 req" in text and "3.20 req/s" in text and "ETA 0:30" in text and "115 tok/s" in text
    train = con.progress_text({"what": "train", "unit": "steps", "done": 32, "total": 32, "started": 0, "updated": 64,
                               "info": {"loss": 0.69312}}, width=0)
    assert train == "train  32/32 steps  0.50 steps/s  loss 0.6931"  # done: no ETA, no bar at width 0
    assert con.fmt_duration(3725) == "1:02:05" and con.fmt_duration(59.6) == "1:00"
    # A CPU DPO step takes minutes: time per step, not "0.00 steps/s" (a real round: 4 steps in 20:58).
    slow = con.progress_text({"what": "train", "unit": "steps", "done": 1, "total": 4, "started": 0, "updated": 284,
                              "info": {"loss": 1.4267}}, width=0)
    assert slow == "train  1/4 steps  4:44/step  ETA 14:12  loss 1.4267"


def test_progress_writes_the_file_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(con.PROGRESS_ENV, str(tmp_path / "progress" / "policy.json"))
    p = con.Progress("generate", 4, "req", min_interval_s=3600)
    p.update(1)  # throttled: within the interval, not the end
    assert json.loads((tmp_path / "progress" / "policy.json").read_text())["done"] == 0
    p.update(3)  # the last one is always written
    rec = json.loads((tmp_path / "progress" / "policy.json").read_text())
    assert rec["done"] == 4 and rec["total"] == 4 and rec["what"] == "generate"
    assert con.read_progress(tmp_path / "progress", since=rec["updated"] + 1) is None  # older than the stage
    assert con.read_progress(tmp_path / "progress", since=0)["role"] == "policy"
    monkeypatch.delenv(con.PROGRESS_ENV)
    con.Progress("x", 1).update(1)  # no file named: nothing written, nothing raised


def test_vllm_bar_works_inside_the_pinned_vllm_engine_loop(tmp_path, monkeypatch):
    """vLLM's own ``_run_engine`` (the pinned version's code) drives our ``use_tqdm``."""
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.outputs import RequestOutput

    monkeypatch.setenv(con.PROGRESS_ENV, str(tmp_path / "policy.json"))

    def output(i: int) -> RequestOutput:
        out = RequestOutput.__new__(RequestOutput)
        out.request_id, out.finished, out.prompt_token_ids = str(i), True, [1, 2, 3]
        out.outputs = [SimpleNamespace(token_ids=[7] * 5), SimpleNamespace(token_ids=[7] * 5)]  # n = 2 samples
        return out

    pending = [[output(0), output(1)], [output(2)]]
    engine = SimpleNamespace(get_num_unfinished_requests=lambda: 6, has_unfinished_requests=lambda: bool(pending),
                             step=lambda: pending.pop(0))
    outs = OfflineInferenceMixin._run_engine(SimpleNamespace(llm_engine=engine), RequestOutput, use_tqdm=con.vllm_progress("generate"))
    assert [o.request_id for o in outs] == ["0", "1", "2"]
    rec = json.loads((tmp_path / "policy.json").read_text())
    assert rec["done"] == 6 and rec["total"] == 6 and rec["info"]["tok/s"] > 0
    # vLLM's other bars get their iterable back untouched
    assert list(con.vllm_progress("generate")([1, 2], desc="Adding requests")) == [1, 2]


def test_trainer_callback_counts_steps_and_loss(tmp_path, monkeypatch):
    monkeypatch.setenv(con.PROGRESS_ENV, str(tmp_path / "trainer.json"))
    cb = con.trainer_progress()
    state = SimpleNamespace(max_steps=10, global_step=0)
    cb.on_train_begin(None, state, None)
    state.global_step = 3
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 0.6931, "learning_rate": 1e-5})
    cb.on_train_end(None, state, None)
    rec = json.loads((tmp_path / "trainer.json").read_text())
    assert (rec["done"], rec["total"], rec["unit"], rec["info"]["loss"]) == (3, 10, "steps", 0.6931)


ACTOR = textwrap.dedent("""
    import subprocess, sys
    from orchestrator.console import Progress, logged_actor_class

    class Worker:
        def __init__(self, word):
            print("init says", word)
            print("init warns", word, file=sys.stderr)
            subprocess.run(["sh", "-c", "echo engine process says hi"], check=True)
            Progress("generate", 2).update(2)

    cls = logged_actor_class(Worker, "policy", sys.argv[1], redirect=sys.argv[2] == "1")
    assert cls.__name__ == "Worker"
    cls("hello")
""")


@pytest.mark.parametrize("redirect", [True, False])
def test_actor_output_goes_to_its_role_log(tmp_path, redirect):
    """In a process of its own, as in a Ray worker: the actor's stdout, stderr and its child processes'."""
    proc = subprocess.run([sys.executable, "-c", ACTOR, str(tmp_path), "1" if redirect else "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "logs" / "policy.log"
    shown = proc.stdout + proc.stderr
    if redirect:
        text = log.read_text()
        assert "policy: Worker started in pid" in text
        for line in ("init says hello", "init warns hello", "engine process says hi"):
            assert line in text and line not in shown
    else:
        assert not log.exists() and "init says hello" in shown and "engine process says hi" in shown
    assert json.loads((tmp_path / "progress" / "policy.json").read_text())["done"] == 2


# -- driver side --------------------------------------------------------------------------------


def test_a_step_prints_progress_lines_and_a_final_line(tmp_path, monkeypatch):
    monkeypatch.setenv(con.PROGRESS_ENV, str(tmp_path / "progress" / "policy.json"))
    console, out = quiet_console(tmp_path, interval_s=0.0, refresh_s=0.05)
    with console.step(1, "generations") as step:
        p = con.Progress("generate", 8, "req", min_interval_s=0)
        for _ in range(4):
            p.update(1)
            time.sleep(0.1)
        time.sleep(0.3)
        step.note = "8 records"
        p.update(4)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("round 1  generations") and "/8 req" in line and "ETA" in line for line in lines[:-1])
    assert lines[-1].startswith("round 1  generations   done in 0:0") and "(8 records; generate  8/8 req" in lines[-1]


def test_a_live_console_redraws_one_line(tmp_path):
    out = io.StringIO()
    console = con.Console(tmp_path, stream=out, live=True, refresh_s=0.05)
    with console.step(2, "judgments"):
        time.sleep(0.3)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r\x1b[2K") >= 2  # redrawn in place, one final line
    assert text.rstrip("\n").split("\r\x1b[2K")[-1].startswith("round 2  judgments     done in")


def test_a_failure_shows_the_worker_logs_last_lines(tmp_path):
    console, out = quiet_console(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "policy.log").write_text("".join(f"line {i}\n" for i in range(100)) + "bar 10%\rbar 50%\rbar 90%\nValueError: no KV cache\n")
    with pytest.raises(RuntimeError):
        with console.step(1, "generations"):
            raise RuntimeError("engine died")
    console.failed()
    text = out.getvalue()
    assert "round 1  generations   FAILED after" in text
    assert f"last {con.TAIL_LINES} lines of {logs / 'policy.log'}" in text and f"(whole log: {logs / 'policy.log'})" in text
    assert "  line 99\n" in text and "  line 50\n" not in text
    assert "  bar 90%\n" in text and "bar 10%" not in text
    assert text.rstrip().splitlines()[-2] == "  ValueError: no KV cache"


def test_quiet_logs_keeps_warnings_on_the_console_and_everything_in_files(tmp_path):
    root = logging.getLogger()
    stream, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "driver.log")
    for h in (stream, file):
        h.setLevel(logging.INFO)
        root.addHandler(h)
    try:
        con.Console(tmp_path, workers="console").quiet_logs()
        assert stream.level == logging.INFO  # log.workers=console: as before
        con.Console(tmp_path).quiet_logs()
        assert stream.level == logging.WARNING and file.level == logging.INFO
        assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
    finally:
        for h in (stream, file):
            root.removeHandler(h)
            h.close()
        logging.getLogger("mlflow").setLevel(logging.NOTSET)


def test_log_workers_is_checked():
    from confs import composed

    with pytest.raises(ConfigError, match="log.workers='loud' is invalid"):
        con.Console.from_cfg(composed(["log.workers=loud"]), "/tmp/x")
    assert con.Console.from_cfg(composed(), "/tmp/x").workers_to_console is False


def test_the_controller_prints_a_line_per_stage_a_round_row_and_where_to_look(local_controller):
    from mlflow.tracking import MlflowClient

    ctl = local_controller()
    out = io.StringIO()
    ctl.console._stream, ctl.console._live = out, False
    with ctl.round(1) as rnd:
        rnd.stage("generations", Generation, lambda: ([Generation("p", "q", 0, "a", 1), Generation("p", "q", 1, "b", 1)],
                                                       {"gen/tokens_mean": 1.0}))
        rnd.checkpoint("policy", "train", lambda o: {**write_checkpoint(o), "train/loss": 0.5})
    ctl.console.finished(ctl.tracker, "FINISHED")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("round 1  generations   done in 0:0") and lines[0].endswith("(2 records)")
    assert lines[1].startswith("round 1  train         done in")
    header, row = lines[2].split(), lines[3].split()
    assert header[:2] == ["round", "status"] and row[:2] == ["1", "done"] and row[-1] == "0.5000"
    assert lines[4] == f"run finished: {ctl.store.root}"
    command = next(line for line in lines if "MLflow UI:" in line)
    uri = command.split("--backend-store-uri ")[1]
    assert uri == f"sqlite:///{ctl.store.root / 'mlflow.db'}"
    assert MlflowClient(uri).get_run(ctl.tracker.parent_id).info.run_name.startswith(ctl.cfg.tracking.experiment)
    page = next(line for line in lines if "then open" in line)
    assert page.endswith(f"#/experiments/{ctl.tracker.experiment_id}/runs/{ctl.tracker.parent_id}?workflowType=machine_learning")
    assert any(f"orchestrate-report {ctl.store.root}" in line for line in lines)


def test_a_resumed_round_says_what_it_reused(local_controller):
    def run(ctl):
        out = io.StringIO()
        ctl.console._stream, ctl.console._live = out, False
        with ctl.round(1) as rnd:
            rnd.stage("generations", Generation, lambda: ([Generation("p", "q", 0, "a", 1)], {}))
            rnd.checkpoint("policy", "train", write_checkpoint)
        return out.getvalue().splitlines()

    first = run(local_controller())
    assert first[0].startswith("round 1  generations   done in")
    again = run(local_controller("resume=true"))
    assert again[:2] == ["round 1  generations already done: 1 records reused", "round 1  checkpoint policy already built: reused"]


def test_a_stopped_stage_says_stopped_not_failed(tmp_path):
    """Ctrl-C and SIGTERM (a KeyboardInterrupt by then) stop a stage; they are not its failure."""
    console, out = quiet_console(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with console.step(1, "train"):
            raise KeyboardInterrupt
    text = out.getvalue()
    assert "round 1  train         stopped after" in text and "FAILED" not in text
