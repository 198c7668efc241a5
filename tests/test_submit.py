"""Submission to a Ray cluster (orchestrator/submit.py).

Fast tests check how a config and the command-line overrides become a Ray job (entrypoint,
runtime_env, run dir) and the one-line errors. The ``slow`` tests start a real Ray head on
127.0.0.1 (own temp dir and ports, so it never meets a ``ray.init()`` of another test), submit
jobs through the project's submission path and stop the head's own processes afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray.job_submission  # noqa: F401  (imported here, not under capsys: Ray's log handler keeps the stream)
import yaml
from omegaconf import OmegaConf

from orchestrator import redact, submit
from orchestrator.config import resolve_run_dir
from orchestrator.errors import ConfigError
from orchestrator.submit import (
    SubmitError,
    build_entrypoint,
    build_runtime_env,
    compose_config,
    job_overrides,
    submit_run,
)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(autouse=True)
def _no_ray_env(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    yield
    redact.forget_all()  # submit_run remembers each config's secrets for the text it prints


# Planted secrets (tests/test_secrets.py scans a run's own outputs for the same kind).
MLFLOW_PW, JUDGE_PW, QUERY_KEY, ENV_VALUE = "s3cr3t-planted-mlflow", "pw-planted-judge", "qk-planted-judge", "env-planted-apikey"
PLANTED = (MLFLOW_PW, JUDGE_PW, QUERY_KEY, ENV_VALUE)
SECRET_URI = f"http://alice:{MLFLOW_PW}@mlflow.internal:5000"
SECRET_JUDGE = f"http://bob:{JUDGE_PW}@judge.internal:8000/v1?api_key={QUERY_KEY}"


def assert_clean(label: str, text: str) -> None:
    found = [p for p in PLANTED if p in text]
    assert not found, f"{label} holds planted secret(s) {found}"


def planted_user_overrides(address: str, run_dir) -> list[str]:
    return [
        "rounds=1", f"tracking.uri={SECRET_URI}", f"judge.endpoint.base_url='{SECRET_JUDGE}'", "cluster=ray_job",
        f"cluster.address={address}", f"+cluster.runtime_env.env_vars.API_KEY={ENV_VALUE}", f"run_dir={run_dir}",
    ]


# ------------------------------------------------------------------------------------------
# fast: config -> job


def test_job_overrides_replace_cluster_and_run_dir():
    user = [
        "+experiment=self_reward",
        "rounds=10",
        "cluster=ray_job",
        "cluster.address=http://head:8265",
        "+cluster.extra=1",
        "++cluster.follow=true",
        "run_dir=outputs/x",
        "--config-name",
        "config",
        "clusters_note=1",
    ]
    out = job_overrides(user, "/shared/runs/x")
    assert out == [
        "+experiment=self_reward",
        "rounds=10",
        "--config-name",
        "config",
        "clusters_note=1",
        "cluster=local",
        "run_dir=/shared/runs/x",
    ]


def test_run_dir_with_spaces_is_quoted_for_hydra_and_shell():
    out = job_overrides(["generation.n=2"], "/tmp/my runs/it's")
    entry = build_entrypoint("python -m orchestrator.cli", out)
    argv = shlex.split(entry)
    assert argv[:3] == ["python", "-m", "orchestrator.cli"]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(argv[-1])
    assert parsed.key_or_group == "run_dir" and parsed.value() == "/tmp/my runs/it's"


def test_resolve_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(OmegaConf.create({"run_dir": "outputs/a"})) == str(tmp_path / "outputs/a")
    assert resolve_run_dir(OmegaConf.create({"run_dir": "/abs/a/../b"})) == "/abs/b"
    cfg = OmegaConf.create({"run_dir": "outputs/a", "storage": {"path": "/shared"}})
    assert resolve_run_dir(cfg) == "/shared/outputs/a"
    cfg = OmegaConf.create({"run_dir": "/elsewhere/a", "storage": {"path": "/shared"}})
    assert resolve_run_dir(cfg) == "/elsewhere/a"


def test_runtime_env_defaults_and_extras():
    cfg = compose_config(["cluster=ray_job"])
    env = build_runtime_env(cfg, "/shared/r", "rounds: 2\n")
    assert env["working_dir"] == str(ROOT)
    assert ".git/" in env["excludes"] and "outputs/" in env["excludes"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert env["env_vars"]["ORCHESTRATOR_RUN_DIR"] == "/shared/r"
    assert env["env_vars"]["ORCHESTRATOR_SUBMITTED_CONFIG"] == "rounds: 2\n"
    assert "pip" not in env

    OmegaConf.update(cfg, "cluster.runtime_env.pip", ["rich"], merge=False)
    OmegaConf.update(cfg, "cluster.runtime_env.env_vars", {"HF_HOME": "/shared/hf"}, merge=False)
    OmegaConf.update(cfg, "cluster.runtime_env.extra_excludes", ["bench/"], merge=False)
    OmegaConf.update(cfg, "cluster.runtime_env.extra", {"env_vars": {"A": "1"}, "config": {"setup_timeout_seconds": 900}}, merge=False)
    env = build_runtime_env(cfg, "/shared/r", "")
    assert env["pip"] == ["rich"]
    assert env["env_vars"]["HF_HOME"] == "/shared/hf" and env["env_vars"]["A"] == "1"
    assert "bench/" in env["excludes"] and ".env" in env["excludes"]
    assert env["config"] == {"setup_timeout_seconds": 900}

    OmegaConf.update(cfg, "cluster.runtime_env.working_dir", "s3://bucket/project.zip", merge=False)
    env = build_runtime_env(cfg, "/shared/r", "")
    assert env["working_dir"] == "s3://bucket/project.zip" and "excludes" not in env

    OmegaConf.update(cfg, "cluster.runtime_env.working_dir", "/does/not/exist", merge=False)
    with pytest.raises(ConfigError, match="working_dir"):
        build_runtime_env(cfg, "/shared/r", "")


def test_secrets_travel_in_the_job_environment_only(monkeypatch, capsys):
    """The job record (entrypoint, metadata, the config copy) holds no secret; the job's
    environment holds the values, and the job's Hydra resolves them back."""
    user = planted_user_overrides("http://head:8265", "/shared/r")
    cfg = compose_config(user)
    job = submit.build_job(cfg, user)
    env = job["runtime_env"]["env_vars"]
    assert_clean("entrypoint", job["entrypoint"])
    assert_clean("metadata", json.dumps(job["metadata"]))
    assert_clean("submitted config", env["ORCHESTRATOR_SUBMITTED_CONFIG"])
    assert "API_KEY: '***'" in env["ORCHESTRATOR_SUBMITTED_CONFIG"] and "http://***@mlflow.internal:5000" in env["ORCHESTRATOR_SUBMITTED_CONFIG"]
    assert "+cluster.runtime_env.env_vars.API_KEY=***" in json.loads(job["metadata"]["orchestrator.overrides"])
    assert env["API_KEY"] == ENV_VALUE
    assert {env["ORCHESTRATOR_SECRET_1"], env["ORCHESTRATOR_SECRET_2"]} == {SECRET_URI, SECRET_JUDGE}
    argv = shlex.split(job["entrypoint"])
    assert "tracking.uri=${oc.env:ORCHESTRATOR_SECRET_1}" in argv
    for name in ("ORCHESTRATOR_SECRET_1", "ORCHESTRATOR_SECRET_2"):
        monkeypatch.setenv(name, env[name])
    in_job = compose_config(argv[3:])
    assert in_job.tracking.uri == SECRET_URI and in_job.judge.endpoint.base_url == SECRET_JUDGE

    class Client:
        def submit_job(self, **kw):
            return kw["submission_id"]

    monkeypatch.setattr(submit, "connect", lambda address, timeout_s=10.0: Client())
    submit_run(cfg, user)
    out = capsys.readouterr()
    assert "entrypoint:" in out.out and "${oc.env:ORCHESTRATOR_SECRET_1}" in out.out
    assert_clean("stdout", out.out)
    assert_clean("stderr", out.err)


def test_secret_files_are_never_uploaded():
    cfg = compose_config(["cluster=ray_job"])
    OmegaConf.update(cfg, "cluster.runtime_env.excludes", [], merge=False)  # even with the list emptied
    excludes = build_runtime_env(cfg, "/shared/r", "")["excludes"]
    for pattern in (".env", ".env.*", "*.pem", "*.key", ".netrc", ".git-credentials", "id_rsa*", ".aws/", ".ray/"):
        assert pattern in excludes


def test_missing_address_is_a_clear_error():
    cfg = compose_config(["cluster=ray_job", "run_dir=/tmp/x"])
    with pytest.raises(SubmitError, match="cluster.address"):
        submit_run(cfg, ["cluster=ray_job"])


def test_ray_client_address_is_refused():
    with pytest.raises(SubmitError, match="Ray Client address"):
        submit.normalize_address("ray://head:10001")
    assert submit.normalize_address("head:8265") == "http://head:8265"


def test_cli_unreachable_address_exits_2_with_one_line(capsys):
    (port,) = _free_ports(1)
    t0 = time.monotonic()
    rc = submit.main(["status", "some-job", "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert time.monotonic() - t0 < 30
    assert err.startswith("orchestrate-submit: error: cannot reach the Ray job API") and err.count("\n") == 1


def test_cli_missing_address_exits_2(capsys):
    rc = submit.main(["list"])
    assert rc == 2 and "no Ray cluster address" in capsys.readouterr().err


def test_cli_run_composes_the_same_config(monkeypatch):
    seen = {}

    def fake_submit_run(cfg, overrides, follow=None, **kw):
        seen.update(cfg=cfg, overrides=list(overrides), follow=follow)
        return "job-1"

    monkeypatch.setattr(submit, "submit_run", fake_submit_run)
    rc = submit.main(["run", "--address", "http://h:8265", "--follow", "--", "+experiment=self_reward", "rounds=3", "cluster=local"])
    assert rc == 0
    cfg = seen["cfg"]
    assert cfg.cluster.name == "ray_job" and cfg.cluster.address == "http://h:8265"
    assert cfg.rounds == 3 and cfg.experiment_name == "self_reward"
    assert seen["overrides"] == ["+experiment=self_reward", "rounds=3", "cluster=local"]
    assert seen["follow"] is True


class _TokenAPI:
    """A stand-in job API on 127.0.0.1 that wants ``Authorization: Bearer secret``."""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.headers.get("authorization") != "Bearer secret":
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b"Unauthorized: Missing authentication token")
                    return
                body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_plain_http_to_remote():
    assert submit.plain_http_to_remote("http://10.0.0.5:8265") and submit.plain_http_to_remote("http://head:8265")
    for local in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://head:8265"):
        assert not submit.plain_http_to_remote(local)


def test_token_over_plain_http_to_another_machine_warns(monkeypatch, capsys):
    monkeypatch.setattr(submit, "_token_headers", lambda: {"authorization": "Bearer secret"})
    with _TokenAPI() as address:
        submit.connect(address)  # 127.0.0.1: the token never leaves this machine
        assert "warning" not in capsys.readouterr().err
        monkeypatch.setattr(submit, "plain_http_to_remote", lambda address: True)  # as for http://head:8265
        submit.connect(address)
    err = capsys.readouterr().err
    assert err.startswith("warning: sending the Ray auth token to http://127.0.0.1:") and "plain http" in err and "Bearer" not in err


def test_token_auth_cluster(monkeypatch):
    with _TokenAPI() as address:
        monkeypatch.setattr(submit, "_token_headers", lambda: {})
        with pytest.raises(SubmitError, match="token authentication and no local token"):
            submit.connect(address)
        monkeypatch.setattr(submit, "_token_headers", lambda: {"authorization": "Bearer wrong"})
        with pytest.raises(SubmitError, match="local token was refused"):
            submit.connect(address)
        monkeypatch.setattr(submit, "_token_headers", lambda: {"authorization": "Bearer secret"})
        client = submit.connect(address)
        assert client._headers.get("authorization") == "Bearer secret"


def test_cli_run_bad_override_exits_2(capsys):
    rc = submit.main(["run", "--address", "http://h:8265", "--", "no_such_group=x"])
    assert rc == 2 and capsys.readouterr().err.startswith("orchestrate-submit: error:")


# ------------------------------------------------------------------------------------------
# slow: a real Ray head on 127.0.0.1


def _session_processes(sid: int, markers: list[str]):
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = os.getsid(proc.pid) == sid
            if not mine:
                args = proc.info["cmdline"] or []
                mine = any(m in a if m.startswith("/") else a.endswith(m) for a in args for m in markers)
            if mine:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_head(sid: int, markers: list[str]) -> None:
    """Stop only this head's processes (``ray stop`` would stop every Ray on the machine)."""
    import psutil

    procs = _session_processes(sid, markers)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = alive + _session_processes(sid, markers)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class RayHead:
    def __init__(self, address: str, temp_dir: str):
        self.address = address
        self.temp_dir = temp_dir

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)


@pytest.fixture(scope="module")
def ray_head():
    import requests

    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix sockets live here
    gcs, dash, client, agent, agent_grpc, metrics, renv = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The job's `python` must be this interpreter (its packages), as on a real cluster image.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token auth on for `ray start` whenever ~/.ray/auth_token exists (any local
    # ray.init() writes one); this head is reached without one, whatever ran before.
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head",
        f"--port={gcs}", f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
        "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={renv}",
    ]  # fmt: skip
    # this head's processes: its session, plus anything naming its temp dir or GCS port
    markers = [temp_dir, f":{gcs}", f"--port={client}"]
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = proc.pid
    try:
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"ray start did not return within 180 s:\n{output[-3000:]}")
        if proc.returncode != 0:
            pytest.fail(f"ray start failed (exit {proc.returncode}):\n{output[-3000:]}")
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 90
        last = None
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{address}/api/version", timeout=5).ok and requests.get(f"{address}/api/jobs/", timeout=5).ok:
                    break
            except requests.RequestException as exc:
                last = exc
            time.sleep(1)
        else:
            pytest.fail(f"the Ray head's job API at {address} did not answer within 90 s ({last})")
        yield RayHead(address, temp_dir)
    finally:
        _stop_head(sid, markers)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait(client, job_id, statuses, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in statuses:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)[-4000:]}")


# The stand-in for `orchestrate` used to test the submission mechanics: it records what the job
# got (argv, cwd, environment, which copy of the project it imports) into the run dir.
FAKE_ORCHESTRATE = """
import json, os, sys, pathlib, orchestrator
run_dir = pathlib.Path(os.environ["ORCHESTRATOR_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
cwd = pathlib.Path.cwd()
(run_dir / "job.json").write_text(json.dumps({
    "argv": sys.argv[1:], "cwd": str(cwd), "files": sorted(p.name for p in cwd.iterdir()),
    "orchestrator_file": orchestrator.__file__,
    "env": {k: os.environ.get(k) for k in ("PYTHONUNBUFFERED", "ORCHESTRATOR_SUBMITTED_CONFIG", "RAY_ADDRESS", "MY_VAR")},
}))
print("FAKE-ORCHESTRATE ran with", " ".join(sys.argv[1:]))
"""


@pytest.mark.slow
def test_submit_mechanics_on_a_real_head(ray_head, tmp_path, capsys):
    run_dir = tmp_path / "run"
    user = ["rounds=1", "generation.n=2", "cluster=ray_job", f"cluster.address={ray_head.address}", f"run_dir={run_dir}"]
    cfg = compose_config(user)
    OmegaConf.update(cfg, "cluster.address", ray_head.address, merge=False)
    OmegaConf.update(cfg, "cluster.runtime_env.env_vars", {"MY_VAR": "42"}, merge=False)
    t0 = time.monotonic()
    job_id = submit_run(cfg, user, command=f"python -c {shlex.quote(FAKE_ORCHESTRATE)}", follow=True)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert f"Submitted Ray job {job_id}" in out and f"run dir:    {run_dir}" in out
    assert "FAKE-ORCHESTRATE ran with" in out  # followed logs
    assert f"Job {job_id} SUCCEEDED" in out
    client = ray_head.client()
    assert str(client.get_job_status(job_id)) == "SUCCEEDED"
    assert "FAKE-ORCHESTRATE" in client.get_job_logs(job_id)

    got = json.loads((run_dir / "job.json").read_text())
    assert got["argv"] == ["rounds=1", "generation.n=2", "cluster=local", f"run_dir={run_dir}"]
    # the project travelled as the working dir, without what is excluded, and is what runs
    assert {"orchestrator", "conf", "pyproject.toml"} <= set(got["files"]) and ".git" not in got["files"]
    assert got["orchestrator_file"].startswith(got["cwd"])
    assert got["env"]["PYTHONUNBUFFERED"] == "1" and got["env"]["MY_VAR"] == "42" and got["env"]["RAY_ADDRESS"]
    submitted = yaml.safe_load(got["env"]["ORCHESTRATOR_SUBMITTED_CONFIG"])
    assert submitted["rounds"] == 1 and submitted["run_dir"] == str(run_dir)
    print(f"submit+follow of a trivial job took {took:.1f} s", file=sys.stderr)

    # the CLI's views of the same job
    assert submit.main(["status", job_id, "--address", ray_head.address]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert submit.main(["list", "--address", ray_head.address]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and str(run_dir) in listing
    assert submit.main(["logs", job_id, "--address", ray_head.address]) == 0
    assert "FAKE-ORCHESTRATE" in capsys.readouterr().out
    assert submit.main(["status", "no-such-job", "--address", ray_head.address]) == 2


# The stand-in job for the secrets test: composes its config from its own argv as `orchestrate`
# would (the ${oc.env:...} overrides resolve from the job's environment) and records what it got.
SECRETS_JOB = """
import json, os, pathlib, sys
from orchestrator.submit import compose_config
cfg = compose_config(sys.argv[1:])
run_dir = pathlib.Path(cfg.run_dir)
run_dir.mkdir(parents=True, exist_ok=True)
cwd = pathlib.Path.cwd()
(run_dir / "job.json").write_text(json.dumps({
    "tracking_uri": cfg.tracking.uri, "judge_url": cfg.judge.endpoint.base_url, "api_key": os.environ.get("API_KEY"),
    "files": sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file()),
}))
print("SECRETS-JOB ran")
"""


@pytest.mark.slow
def test_secrets_reach_the_job_and_nothing_else(ray_head, tmp_path, capsys):
    """Through a real head: no secret in the job record (entrypoint, metadata, runtime_env's config
    copy), its logs or what submission printed; the job still gets every real value; secret files
    of the working dir stay behind."""
    work = tmp_path / "project"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", "*.egg-info", ".pytest_cache"))
    for name in (".env", "conf/.env.local", "deploy.pem", ".ray/auth_token"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(f"API_KEY={ENV_VALUE}\n")
    (work / "notes.txt").write_text("not a secret\n")
    run_dir = tmp_path / "run"
    user = planted_user_overrides(ray_head.address, run_dir)
    cfg = compose_config(user)
    OmegaConf.update(cfg, "cluster.runtime_env.working_dir", str(work), merge=False)
    job_id = submit_run(cfg, user, command=f"python -c {shlex.quote(SECRETS_JOB)}", follow=True)
    out = capsys.readouterr()
    assert f"Job {job_id} SUCCEEDED" in out.out, out.out[-3000:]

    got = json.loads((run_dir / "job.json").read_text())
    assert got["tracking_uri"] == SECRET_URI and got["judge_url"] == SECRET_JUDGE and got["api_key"] == ENV_VALUE
    assert "notes.txt" in got["files"] and "orchestrator/submit.py" in got["files"]
    assert not {".env", "conf/.env.local", "deploy.pem", ".ray/auth_token"} & set(got["files"])

    info = ray_head.client().get_job_info(job_id)
    assert_clean("entrypoint", info.entrypoint)
    assert_clean("metadata", json.dumps(info.metadata))
    assert_clean("submitted config", info.runtime_env["env_vars"]["ORCHESTRATOR_SUBMITTED_CONFIG"])
    assert_clean("job logs", ray_head.client().get_job_logs(job_id))
    assert_clean("stdout", out.out)
    assert_clean("stderr", out.err)
    assert submit.main(["status", job_id, "--address", ray_head.address]) == 0
    assert submit.main(["list", "--address", ray_head.address]) == 0
    assert_clean("orchestrate-submit status/list", capsys.readouterr().out)


@pytest.mark.slow
def test_stop_a_running_job(ray_head, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = compose_config(["cluster=ray_job", f"run_dir={run_dir}"])
    OmegaConf.update(cfg, "cluster.address", ray_head.address, merge=False)
    OmegaConf.update(cfg, "cluster.submission_id", f"stop-me-{os.getpid()}", merge=False)
    job_id = submit_run(cfg, [], command="python -c 'import time; print(\"sleeping\", flush=True); time.sleep(600)'")
    assert job_id == f"stop-me-{os.getpid()}"
    client = ray_head.client()
    _wait(client, job_id, {"RUNNING"}, 120)
    capsys.readouterr()
    assert submit.main(["stop", job_id, "--address", ray_head.address, "--wait", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert f"Job {job_id} STOPPED" in out
    assert str(client.get_job_status(job_id)) == "STOPPED"
    # stopping again is not an error; the id cannot be reused
    assert submit.main(["stop", job_id, "--address", ray_head.address]) == 0
    assert "was not running (STOPPED)" in capsys.readouterr().out
    with pytest.raises(SubmitError, match="submitting"):
        submit_run(cfg, [], command="true")


@pytest.mark.slow
def test_submit_tiny_experiment_one_round(ray_head, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    user = [
        "model=local", f"model.path={model}", "rounds=1", "data.prompts_per_round=4",
        "data.self_instruct.num_prompts=0", "generation.n=2", "generation.max_tokens=16",
        # a short context and a small KV cache (a share of host memory on CPU)
        "generation.engine.max_model_len=1024", "generation.engine.kv_cache_gib=0.25",
        "eval.every=0", "cluster=ray_job", f"run_dir={run_dir}",
    ]  # fmt: skip
    cfg = compose_config(user)
    OmegaConf.update(cfg, "cluster.address", ray_head.address, merge=False)
    t0 = time.monotonic()
    job_id = submit_run(cfg, user)
    client = ray_head.client()
    status = _wait(client, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, 900)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    print(f"tiny 1-round job {status} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "done: 1 rounds" in logs  # the driver's own output, through the job's logs
    rnd = run_dir / "rounds" / "round_001"
    assert rnd.is_dir(), logs[-4000:]
    for stage in ("prompts", "generations", "judgments", "pairs"):
        assert (rnd / f"{stage}.jsonl").exists(), f"missing {stage}.jsonl\n{logs[-4000:]}"
    assert (rnd / "checkpoints" / "policy" / "config.json").exists()

    from mlflow.tracking import MlflowClient

    ml = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = {r.info.run_name: r for e in ml.search_experiments() for r in ml.search_runs([e.experiment_id])}
    parent_id = json.loads((run_dir / "manifest.json").read_text())["mlflow"]["parent_run_id"]
    assert ml.get_run(parent_id).info.status == "FINISHED"
    child = runs["round_001"]
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent_id
    assert "train/loss" in child.data.metrics
