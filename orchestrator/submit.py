"""Submit a run to a Ray cluster with Ray's Job Submission API, and follow, inspect or stop it.

``orchestrate ... cluster=ray_job cluster.address=http://HEAD:8265`` (or ``orchestrate-submit run``)
does not run the experiment here: :func:`submit_run` sends a Ray job whose entrypoint is the same
command with the same overrides, ``cluster=local`` (inside a job, ``ray.init()`` joins the job's
cluster) and an absolute ``run_dir``::

    python -m orchestrator.cli +experiment=self_reward rounds=10 cluster=local run_dir=/shared/runs/x

The job's ``runtime_env`` carries the project (``working_dir``: this checkout, .gitignore,
``cluster.runtime_env.excludes`` and ``SECRET_EXCLUDES`` left out), ``PYTHONUNBUFFERED=1``, the
run dir (``ORCHESTRATOR_RUN_DIR``) and the submitter's resolved config as YAML with its secrets
masked (``ORCHESTRATOR_SUBMITTED_CONFIG``, for the record: the job composes its own), plus
``cluster.runtime_env.{pip,env_vars,extra}``.

Secrets: the job record (entrypoint, metadata, the config copy) is readable by anyone who can
reach the job API, and the entrypoint and metadata show in ``ray job list`` and the dashboard.
An override whose value holds a secret (``tracking.uri=http://user:pass@host``, an ``?api_key=``)
therefore reaches the job through its environment instead: the entrypoint says
``tracking.uri=${oc.env:ORCHESTRATOR_SECRET_1}`` and ``runtime_env.env_vars`` holds the value,
like ``cluster.runtime_env.env_vars``. The runtime_env is part of the job record too; on a cluster
with token authentication only token holders read it. Values set on the nodes themselves (the
image, the node's environment) never enter the record at all.

A relative ``run_dir`` is placed under ``storage.path`` when that is set (storage every node can
read), else under the current directory, which is only right when this machine and the cluster
share that disk (a one-machine cluster, or a shared home).

``orchestrate-submit`` wraps the same calls::

    orchestrate-submit run [--address A] [--follow] -- +experiment=self_reward rounds=10
    orchestrate-submit status JOB [--address A]
    orchestrate-submit logs JOB [--address A] [--follow]
    orchestrate-submit stop JOB [--address A] [--wait]
    orchestrate-submit list [--address A]

``--address`` defaults to ``$RAY_API_SERVER_ADDRESS`` (then ``$RAY_ADDRESS`` when it is an
http(s) address), like ``ray job``. Exit codes: 0 ok (a followed job SUCCEEDED), 1 a followed or
awaited job ended FAILED/STOPPED or timed out, 2 a usage, config or connection error (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from orchestrator.config import CONF_DIR, resolve_run_dir, to_plain
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.redact import guard, redact_config, redact_override, redact_text

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = "python -m orchestrator.cli"
# Never uploaded with a local working_dir, whatever cluster.runtime_env.excludes says: files that
# usually hold credentials (dotenv files, keys, netrc, cloud credentials, Ray's own token).
SECRET_EXCLUDES = (
    ".env", ".env.*", "*.env", ".envrc", ".netrc", "_netrc", ".git-credentials", ".pypirc",
    "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*",
    ".aws/", ".gcp/", ".azure/", ".ssh/", ".ray/", "auth_token", "credentials.json", "secrets.*",
)
# The environment variables that carry secret override values to a job (see the module docstring).
SECRET_ENV_PREFIX = "ORCHESTRATOR_SECRET_"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Hydra command-line flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_OVERRIDE_KEY = re.compile(r"^(?:~|\+\+|\+)?([^=~]+?)(?:@[^=]*)?(?:=|$)")


class SubmitError(OrchestratorError):
    """The cluster cannot be reached or refused a request (the message says which and why)."""


class JobEndedError(OrchestratorError):
    """A followed job ended without succeeding."""

    def __init__(self, job_id: str, status: str, message: str = ""):
        self.job_id, self.status = job_id, status
        super().__init__(f"job {job_id} ended {status}" + (f": {message}" if message else ""))


# --------------------------------------------------------------------------------------------
# config -> job


def _select(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return default if value is None or value == "???" else value


def normalize_address(address: str | None) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; a missing address falls back to the environment."""
    if not address or address == "???":
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
        env_addr = os.environ.get("RAY_ADDRESS", "")
        if not address and env_addr.startswith(("http://", "https://")):
            address = env_addr
    address = str(address).strip().rstrip("/")
    if not address:
        raise SubmitError(
            "no Ray cluster address: set cluster.address=http://HEAD:8265 (or --address, or "
            "RAY_API_SERVER_ADDRESS) to the head's dashboard / job API"
        )
    if address.startswith("ray://"):
        raise SubmitError(
            f"{address} is a Ray Client address; jobs are submitted to the dashboard's job API, "
            "e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def hydra_value(value: str) -> str:
    """``value`` as Hydra reads it back unchanged on the command line (quoted when needed)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_override(f"k={value}")
        if parsed.value() == value:
            return value
    except Exception:
        pass
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str | None:
    """``+cluster.address=x`` -> ``cluster.address``; ``None`` for flags."""
    if override.startswith("-"):
        return None
    m = _OVERRIDE_KEY.match(override)
    return m.group(1).strip() if m else None


def job_overrides(overrides: Sequence[str], run_dir: str) -> list[str]:
    """The overrides the job runs with: the user's, less every ``cluster``/``run_dir`` one, plus
    ``cluster=local`` and the absolute ``run_dir``."""
    out: list[str] = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _FLAGS_WITH_VALUE and i + 1 < len(args):
            out += [arg, args[i + 1]]
            i += 2
            continue
        key = override_key(arg)
        if key is not None and (key in ("cluster", "run_dir") or key.startswith("cluster.")):
            i += 1
            continue
        out.append(arg)
        i += 1
    return out + ["cluster=local", f"run_dir={hydra_value(run_dir)}"]


def build_entrypoint(command: str, overrides: Sequence[str]) -> str:
    return " ".join([command.strip()] + [shlex.quote(o) for o in overrides])


def secrets_to_env(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Overrides whose value holds a secret, moved out of the command line: ``k=http://u:p@h``
    becomes ``k=${oc.env:ORCHESTRATOR_SECRET_N}`` (Hydra resolves it in the job) and the value goes
    to the returned environment variables. Flags and other overrides are kept as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: list[str] = []
    env: dict[str, str] = {}
    for override in overrides:
        if override.startswith("-") or "=" not in override or redact_override(override) == override:
            out.append(override)
            continue
        try:
            value = parser.parse_override(override).value()
        except Exception:
            raise ConfigError(f"override {redact_override(override)} does not parse (quote a value that holds = or ?)") from None
        if not isinstance(value, str):
            raise ConfigError(
                f"override {redact_override(override)} holds a secret inside a list or dict; give it as a key of "
                "its own (e.g. judge.endpoint.base_url=...) so it can travel in the job's environment"
            )
        name = f"{SECRET_ENV_PREFIX}{len(env) + 1}"
        env[name] = value
        out.append(f"{override.split('=', 1)[0]}=${{oc.env:{name}}}")
    return out, env


def resolved_config_yaml(cfg: Any, run_dir: str) -> str:
    """The submitter's config, resolved (falls back to unresolved if a value cannot resolve), with
    its secrets masked: the job composes its own config, so this copy is only a record."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation only the job can resolve
        print(f"note: config not fully resolvable here ({redact_text(str(exc))}); sending it unresolved", file=sys.stderr)
        data = OmegaConf.to_container(cfg, resolve=False)
    data["run_dir"] = run_dir
    return OmegaConf.to_yaml(OmegaConf.create(redact_config(data)))


def default_submission_id(cfg: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(_select(cfg, "experiment_name", "run"))).strip("-") or "run"
    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def build_runtime_env(cfg: Any, run_dir: str, config_yaml: str) -> dict[str, Any]:
    renv = to_plain(_select(cfg, "cluster.runtime_env", {})) or {}
    working_dir = renv.get("working_dir")
    if not working_dir:
        working_dir = str(PROJECT_ROOT)
    elif "://" not in str(working_dir):
        working_dir = os.path.abspath(os.path.expanduser(str(working_dir)))
        if not os.path.isdir(working_dir):
            raise ConfigError(f"cluster.runtime_env.working_dir: {working_dir} is not a directory")
    env: dict[str, Any] = {"working_dir": str(working_dir)}
    excludes = list(renv.get("excludes") or []) + list(renv.get("extra_excludes") or [])
    if "://" not in str(working_dir):
        # gitignore-style patterns; .gitignore is honoured as well, but a secret file need not be in it.
        env["excludes"] = list(dict.fromkeys([str(e) for e in excludes] + list(SECRET_EXCLUDES)))
    env_vars = {
        "PYTHONUNBUFFERED": "1",
        "ORCHESTRATOR_RUN_DIR": run_dir,
        "ORCHESTRATOR_SUBMITTED_CONFIG": config_yaml,
    }
    env_vars.update({str(k): str(v) for k, v in (renv.get("env_vars") or {}).items()})
    env["env_vars"] = env_vars
    if renv.get("pip"):
        env["pip"] = renv["pip"]
    for key, value in (renv.get("extra") or {}).items():
        if key in env and isinstance(env[key], dict) and isinstance(value, dict):
            env[key].update(value)
        else:
            env[key] = value
    return env


# --------------------------------------------------------------------------------------------
# talking to the cluster


def _token_headers() -> dict[str, str]:
    """The local Ray auth token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``) as an HTTP header, or ``{}``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True) or {})
    except Exception:
        return {}


def plain_http_to_remote(address: str) -> bool:
    """Whether ``address`` is plain http to a host other than this machine: a token sent there
    crosses the network in clear text."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not resolved here, so not known to be this machine
        return True


def connect(address: str | None, timeout_s: float = 10.0):
    """A ``JobSubmissionClient`` for ``address``, or a one-line :class:`SubmitError`.

    A cluster with Ray token authentication answers 401 without a token; the local token is then
    sent (as ``ray job`` does with ``RAY_AUTH_MODE=token``), with a warning when it goes over
    plain http to another machine.
    """
    import requests

    address = normalize_address(address)
    hint = (
        "check the address (the head's dashboard port, usually 8265) and that the head runs "
        "with the dashboard on a reachable interface (ray start --head --dashboard-host=PRIVATE_IP)"
    )
    headers: dict[str, str] = {}
    try:
        r = requests.get(f"{address}/api/version", timeout=timeout_s)
        if r.status_code in (401, 403):
            headers = _token_headers()
            if headers:
                if plain_http_to_remote(address):
                    print(
                        f"warning: sending the Ray auth token to {redact_text(address)} over plain http: anyone on the network "
                        "path can read it and run code on the cluster. Use https (a TLS proxy in front of the "
                        "dashboard), an SSH tunnel to 127.0.0.1, or keep the port on a private network",
                        file=sys.stderr,
                    )
                r = requests.get(f"{address}/api/version", timeout=timeout_s, headers=headers)
    except requests.exceptions.RequestException as exc:
        reason = type(exc).__name__
        raise SubmitError(f"cannot reach the Ray job API at {address} ({reason}); {hint}") from None
    if r.status_code in (401, 403):
        have = "the local token was refused" if headers else "no local token was found"
        raise SubmitError(
            f"the Ray cluster at {address} uses token authentication and {have}: put the cluster's "
            "token in $RAY_AUTH_TOKEN or ~/.ray/auth_token (see `ray get-auth-token`)"
        )
    if r.status_code != 200:
        raise SubmitError(f"the Ray job API at {address} answered HTTP {r.status_code} to /api/version; {hint}")

    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers or None)
    except Exception as exc:  # ConnectionError, RuntimeError (version), ...
        raise SubmitError(f"cannot use the Ray job API at {address}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(redact_text(str(exc)).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def _call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OrchestratorError:
        raise
    except Exception as exc:
        raise SubmitError(f"{what}: {_one_line(exc)}") from None


def wait_for_status(client, job_id: str, statuses: Iterable[str] = TERMINAL, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job's status is one of ``statuses``; returns it (or the last seen on timeout)."""
    wanted = {str(s) for s in statuses}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(_call(f"status of job {job_id}", lambda: client.get_job_status(job_id)))
        if status in wanted or (deadline is not None and time.monotonic() >= deadline):
            return status
        time.sleep(poll_s)


def follow_logs(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the stream closed early: fall back to polling
        print(f"note: log stream ended early ({_one_line(exc)}); waiting for the job to end", file=sys.stderr)
    return wait_for_status(client, job_id, TERMINAL, timeout_s=None)


def _commands(job_id: str, address: str) -> list[tuple[str, str]]:
    return [
        ("follow", f"orchestrate-submit logs {job_id} --address {address} --follow   (or: ray job logs {job_id} --address {address} --follow)"),
        ("status", f"orchestrate-submit status {job_id} --address {address}   (or: ray job status {job_id} --address {address})"),
        ("stop", f"orchestrate-submit stop {job_id} --address {address}   (or: ray job stop {job_id} --address {address})"),
    ]


def build_job(cfg: Any, overrides: Sequence[str], command: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for this run.

    No secret in the entrypoint, the metadata or the config copy: secret override values travel
    in ``runtime_env.env_vars`` (``secrets_to_env``), the rest is masked (orchestrator/redact.py).
    """
    run_dir = resolve_run_dir(cfg)
    entry_overrides, secret_env = secrets_to_env(job_overrides(overrides, run_dir))
    entrypoint = build_entrypoint(command or _select(cfg, "cluster.command", DEFAULT_COMMAND), entry_overrides)
    runtime_env = build_runtime_env(cfg, run_dir, resolved_config_yaml(cfg, run_dir))
    runtime_env["env_vars"].update(secret_env)
    submission_id = str(_select(cfg, "cluster.submission_id") or _select(cfg, "cluster.job_id") or default_submission_id(cfg))
    metadata = {
        "orchestrator.run_dir": run_dir,
        "orchestrator.experiment": str(_select(cfg, "experiment_name", "")),
        "orchestrator.overrides": json.dumps([redact_override(o) for o in overrides]),
    }
    user_metadata = to_plain(_select(cfg, "cluster.metadata", {})) or {}
    metadata.update({str(k): str(v) for k, v in redact_config({str(k): str(v) for k, v in user_metadata.items()}).items()})
    job: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id, "runtime_env": runtime_env, "metadata": metadata}
    for key in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources"):
        value = to_plain(_select(cfg, f"cluster.{key}"))
        if value is not None:
            job[key] = value
    return job


def _guard(cfg: Any) -> None:
    from omegaconf import OmegaConf

    try:
        guard(OmegaConf.to_container(cfg, resolve=True))
    except Exception:
        guard(OmegaConf.to_container(cfg, resolve=False))


def submit_run(
    cfg: Any,
    overrides: Sequence[str],
    *,
    command: str | None = None,
    follow: bool | None = None,
    out=None,
) -> str:
    """Submit the run described by ``cfg`` (composed from ``overrides``) as a Ray job.

    Returns the job's submission id. With ``cluster.follow`` (or ``follow=True``) it streams the
    job's logs until the job ends and raises :class:`JobEndedError` unless it SUCCEEDED.
    ``command`` replaces ``cluster.command`` (the program the job runs before the overrides).
    """
    out = out or sys.stdout
    _guard(cfg)
    address = normalize_address(_select(cfg, "cluster.address"))
    job = build_job(cfg, overrides, command)
    run_dir, entrypoint = job["metadata"]["orchestrator.run_dir"], job["entrypoint"]

    if not _select(cfg, "storage.path") and not os.path.isabs(os.path.expanduser(str(_select(cfg, "run_dir")))):
        print(
            f"note: run_dir {run_dir} is on this machine's disk; on a multi-node cluster give an absolute "
            "run_dir (or storage.path) on storage every node can read",
            file=sys.stderr,
        )
    client = connect(address, float(_select(cfg, "cluster.connect_timeout_s", 10)))
    job_id = _call(f"submitting to {address}", lambda: client.submit_job(**job))
    shown = redact_text(address)  # a proxy in front of the job API may take user:pass@ in the URL
    print(f"Submitted Ray job {job_id} to {shown}", file=out)
    print(f"  run dir:    {run_dir}", file=out)
    print(f"  entrypoint: {redact_text(entrypoint)}", file=out)
    for name, cmd in _commands(job_id, shown):
        print(f"  {name + ':':11} {cmd}", file=out)
    out.flush()

    if follow is None:
        follow = bool(_select(cfg, "cluster.follow", False))
    if follow:
        status = follow_logs(client, job_id, out=out)
        print(f"Job {job_id} {status}; run dir {run_dir}", file=out)
        if status != "SUCCEEDED":
            info = _call("job info", lambda: client.get_job_info(job_id))
            raise JobEndedError(job_id, status, getattr(info, "message", "") or "")
    return job_id


# --------------------------------------------------------------------------------------------
# orchestrate-submit


def compose_config(overrides: Sequence[str]):
    """The config ``orchestrate`` would see for these overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _default_address() -> str | None:
    env = os.environ.get("RAY_API_SERVER_ADDRESS")
    if env:
        return env
    addr = os.environ.get("RAY_ADDRESS", "")
    return addr if addr.startswith(("http://", "https://")) else None


def _fmt_time(ms: Any) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _cmd_run(ns) -> int:
    user = [o for o in ns.overrides if o != "--"]
    flags = [o for o in user if o.startswith("-")]
    if flags:
        raise ConfigError(f"orchestrate-submit run takes only overrides (got {flags[0]}); use orchestrate {flags[0]} ... cluster=ray_job")
    compose_overrides = [o for o in user if override_key(o) != "cluster"] + ["cluster=ray_job"]
    try:
        cfg = compose_config(compose_overrides)
    except Exception as exc:
        raise ConfigError(_one_line(exc)) from None
    from omegaconf import OmegaConf

    if ns.address:
        OmegaConf.update(cfg, "cluster.address", ns.address, merge=False)
    if ns.submission_id:
        OmegaConf.update(cfg, "cluster.submission_id", ns.submission_id, merge=False)
    try:
        submit_run(cfg, user, follow=True if ns.follow else None)
    except JobEndedError as exc:
        print(f"orchestrate-submit: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(ns) -> int:
    client = connect(ns.address)
    info = _call(f"job {ns.job}", lambda: client.get_job_info(ns.job))
    meta = info.metadata or {}
    print(f"{ns.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
    print(f"  started: {_fmt_time(info.start_time)}  ended: {_fmt_time(info.end_time)}")
    if meta.get("orchestrator.run_dir"):
        print(f"  run dir: {meta['orchestrator.run_dir']}")
    print(f"  entrypoint: {redact_text(info.entrypoint or '')}")
    return 0


def _cmd_logs(ns) -> int:
    client = connect(ns.address)
    if ns.follow:
        try:
            status = follow_logs(client, ns.job)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {ns.job} goes on", file=sys.stderr)
            return 130
        print(f"Job {ns.job} {status}")
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(_call(f"logs of job {ns.job}", lambda: client.get_job_logs(ns.job)))
    return 0


def _cmd_stop(ns) -> int:
    client = connect(ns.address)
    was_running = _call(f"stopping job {ns.job}", lambda: client.stop_job(ns.job))
    if not was_running:
        status = _call(f"job {ns.job}", lambda: client.get_job_status(ns.job))
        print(f"Job {ns.job} was not running ({status})")
        return 0
    print(f"Requested stop of job {ns.job}")
    if ns.wait:
        status = wait_for_status(client, ns.job, TERMINAL, timeout_s=ns.timeout)
        print(f"Job {ns.job} {status}")
        return 0 if status in TERMINAL else 1
    return 0


def _cmd_list(ns) -> int:
    client = connect(ns.address)
    jobs = _call("listing jobs", client.list_jobs)
    jobs = sorted(jobs, key=lambda j: j.start_time or 0)
    print(f"{'JOB':40} {'STATUS':10} {'STARTED':19}  RUN DIR / ENTRYPOINT")
    for job in jobs:
        meta = job.metadata or {}
        where = meta.get("orchestrator.run_dir") or redact_text(job.entrypoint or "")[:80]
        print(f"{(job.submission_id or job.job_id or '-'):40} {str(job.status):10} {_fmt_time(job.start_time):19}  {where}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrate-submit",
        description="Submit orchestrate runs to a Ray cluster (Ray Job Submission API) and manage them.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    addr_help = "the head's job API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"

    run = sub.add_parser("run", help="submit a run: same as `orchestrate OVERRIDES cluster=ray_job`")
    run.add_argument("--address", default=_default_address(), help=addr_help)
    run.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    run.add_argument("--submission-id", default=None, help="a fixed job id (new on the cluster)")
    run.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then Hydra overrides, as for orchestrate")
    run.set_defaults(fn=_cmd_run)

    for name, fn, text in (
        ("status", _cmd_status, "show a job's status"),
        ("logs", _cmd_logs, "print (or --follow) a job's logs"),
        ("stop", _cmd_stop, "stop a job"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("job", help="the submission id printed by `run`")
        sp.add_argument("--address", default=_default_address(), help=addr_help)
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if name == "stop":
            sp.add_argument("--wait", action="store_true", help="wait until the job has ended")
            sp.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
        sp.set_defaults(fn=fn)

    ls = sub.add_parser("list", help="list the cluster's jobs")
    ls.add_argument("--address", default=_default_address(), help=addr_help)
    ls.set_defaults(fn=_cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(ns.fn(ns) or 0)
    except OrchestratorError as exc:
        print(f"orchestrate-submit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
