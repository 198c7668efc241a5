"""Planted secrets reach no output: credentials in ``tracking.uri`` and ``judge.endpoint.base_url``
(``user:pass@`` and ``?api_key=``) and a ``cluster.runtime_env.env_vars`` value are scanned for in
every file of the run dir (manifest.json, config.yaml, round files, the Hydra log), the MLflow
server's store and artifacts, MLflow params and tags, log records and the CLI's stdout/stderr;
and the real values still reach their users: the MLflow client (a proxy in front of a real
``mlflow server`` refuses requests without the URI's credentials) and the judge endpoint (a
stand-in server records what it was sent). The job-record side is in tests/test_submit.py.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import orchestrate, tiny_overrides, write_checkpoint
from fake_servers import BasicAuthProxy, FlakyServer, free_port, mlflow_server
from mlflow.tracking import MlflowClient

from orchestrator import chat, redact, stages
from orchestrator.config import to_plain
from orchestrator.errors import ConfigError
from orchestrator.roles import call
from orchestrator.types import Generation, Judgment

MLFLOW_PW = "s3cr3t-planted-mlflow"
JUDGE_PW = "pw-planted-judge"
QUERY_KEY = "qk-planted-judge"
ENV_VALUE = "env-planted-apikey"
PLANTED = (MLFLOW_PW, JUDGE_PW, QUERY_KEY, ENV_VALUE)


def assert_clean(label: str, text: str | bytes) -> None:
    data = text if isinstance(text, bytes) else str(text).encode()
    found = [p for p in PLANTED if p.encode() in data]
    assert not found, f"{label} holds planted secret(s) {found}"


def assert_tree_clean(root: Path) -> int:
    """Every file under ``root``, as bytes (sqlite pages, parquet, logs alike); returns the count."""
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    for path in files:
        assert_clean(str(path), path.read_bytes())
    return len(files)


def assert_mlflow_clean(client: MlflowClient, tmp: Path) -> int:
    """Params, tags and artifacts of every run of every experiment, through the MLflow API."""
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    for run in runs:
        assert_clean(f"params of {run.info.run_name}", json.dumps(run.data.params))
        assert_clean(f"tags of {run.info.run_name}", json.dumps(run.data.tags))
        out = tmp / "artifacts" / run.info.run_id
        out.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run.info.run_id, "", str(out))
        assert_tree_clean(out)
    return len(runs)


def planted_overrides(tracking_uri: str, judge_url: str) -> list[str]:
    judge_base = judge_url.replace("http://", f"http://bob:{JUDGE_PW}@") + f"?api_key={QUERY_KEY}"
    return [
        f"tracking.uri={tracking_uri}",
        f"judge.endpoint.base_url='{judge_base}'",  # quoted: ? and = are Hydra syntax
        "judge.endpoint.model=judge",
        "judge.endpoint.api_key_env=null",
        "judge.endpoint.max_retries=1",
        "judge.endpoint.backoff_s=0.01",
        "judge.endpoint.max_backoff_s=0.01",
        f"+cluster.runtime_env.env_vars.API_KEY={ENV_VALUE}",
    ]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real ``mlflow server`` behind a proxy that wants ``alice:MLFLOW_PW``; ``uri`` carries them."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as upstream, BasicAuthProxy(upstream, "alice", MLFLOW_PW) as proxy:
        yield SimpleNamespace(uri=f"http://alice:{MLFLOW_PW}@127.0.0.1:{proxy.port}", root=root, proxy=proxy)


@pytest.fixture(autouse=True)
def _forget_secrets():
    yield
    redact.forget_all()
    for handler in logging.getLogger().handlers:
        handler.removeFilter(redact.LOG_FILTER)


# -- the rules ---------------------------------------------------------------------------------


def test_redaction_rules():
    r = redact.redact_text
    assert r(f"http://alice:{MLFLOW_PW}@h:5000/x") == "http://***@h:5000/x"
    assert r("https://ghp_token@github.com/o/r.git") == "https://***@github.com/o/r.git"
    assert r("postgresql://u:p@ss@db:5432/m") == "postgresql://***@db:5432/m"  # an unencoded @ leaves nothing
    assert r(f"http://h/v1?api-version=2024&api_key={QUERY_KEY}&X-Amz-Signature=abc") == (
        "http://h/v1?api-version=2024&api_key=***&X-Amz-Signature=***"
    )
    assert r("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer ***"
    assert r("sqlite:////runs/x/mlflow.db and http://h:8265") == "sqlite:////runs/x/mlflow.db and http://h:8265"
    config = {
        "tracking": {"uri": f"http://alice:{MLFLOW_PW}@h"},
        "judge": {"max_tokens": 256, "endpoint": {"api_key_env": "OPENAI_API_KEY", "base_url": f"http://h/v1?token={QUERY_KEY}"}},
        "cluster": {"runtime_env": {"env_vars": {"API_KEY": ENV_VALUE, "HF_HOME": "/shared/hf"}, "extra": {"env_vars": {"B": "x"}}}},
        "db": {"password": "hunter2", "user": "me"},
        "empty": None,
    }
    safe = redact.redact_config(config)
    assert safe == {
        "tracking": {"uri": "http://***@h"},
        "judge": {"max_tokens": 256, "endpoint": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://h/v1?token=***"}},
        "cluster": {"runtime_env": {"env_vars": {"API_KEY": "***", "HF_HOME": "***"}, "extra": {"env_vars": {"B": "***"}}}},
        "db": {"password": "***", "user": "me"},
        "empty": None,
    }
    assert redact.redact_config(safe) == safe  # idempotent: stored and new configs compare masked
    assert redact.redact_override(f"+cluster.runtime_env.env_vars.API_KEY={ENV_VALUE}") == "+cluster.runtime_env.env_vars.API_KEY=***"
    assert redact.redact_override("cluster.runtime_env.env_vars={A:1}") == "cluster.runtime_env.env_vars=***"
    assert redact.redact_override(f"tracking.uri=http://a:{MLFLOW_PW}@h") == "tracking.uri=http://***@h"
    assert redact.redact_override("generation.max_tokens=64") == "generation.max_tokens=64"


def test_log_records_and_tracebacks_are_redacted():
    stream = io.StringIO()
    logger = logging.getLogger("test_secrets.isolated")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        redact.install_log_redaction(logger)
        redact.remember({"cluster": {"runtime_env": {"env_vars": {"API_KEY": ENV_VALUE}}}})
        logger.warning("connecting to %s", f"http://alice:{MLFLOW_PW}@h")
        try:
            raise RuntimeError(f"the key {ENV_VALUE} was refused by http://bob:{JUDGE_PW}@h/v1?api_key={QUERY_KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "connecting to http://***@h" in text and "RuntimeError: the key *** was refused by http://***@h/v1?api_key=***" in text
    assert_clean("log", text)


def test_printed_lines_are_redacted_whole():
    """What a library prints itself (MLflow prints each run's URL) goes through the CLI's stream."""
    sink = io.StringIO()
    stream = redact.RedactingStream(sink)
    stream.write("View run at: http://alice:")  # a URL split over two writes is masked whole
    assert sink.getvalue() == ""
    stream.write(f"{MLFLOW_PW}@h:5000/#/runs/1\nprogress 10%\r")
    stream.write("progress 20%")
    stream.flush()
    assert sink.getvalue() == "View run at: http://***@h:5000/#/runs/1\nprogress 10%\rprogress 20%"
    assert stream.encoding == sink.encoding  # everything else is the real stream's


# -- a run's outputs -------------------------------------------------------------------------------


@pytest.mark.slow  # a real mlflow server starts in 15-45 s
def test_planted_secrets_reach_no_file_param_artifact_or_log(local_controller, tracking, tmp_path, caplog, capsys):
    # DEBUG: urllib3 then logs every request line, query string included; as in `orchestrate`,
    # the redacting filter sits on the root logger's handlers (caplog's among them).
    caplog.set_level(logging.DEBUG)
    redact.install_log_redaction()
    with FlakyServer(slow_s=0) as judge_server:
        overrides = planted_overrides(tracking.uri, judge_server.url)
        ctl = local_controller(*overrides)
        redact.remember(to_plain(ctl.cfg))
        gens = [Generation(prompt_id=f"p{i}", messages=chat.user("Name a colour."), index=0, text=f"Blue. [case:{c}]", num_tokens=2)
                for i, c in enumerate(["ok", "ok", "down", "ok", "ok"])]
        with ctl.round(1) as rnd:
            judged = rnd.stage("judgments", Judgment,
                               lambda: stages.judge_responses(call, ctl.judge(1), gens, to_plain(ctl.cfg.judge)))
            ctl.log_round_artifacts(rnd, ["judgments"], gens)
            rnd.checkpoint("policy", "train", write_checkpoint)
        ctl.tracker.finish()
        # a failed request for good: its warning names the endpoint, without the credentials
        assert [j.score is None for j in judged] == [False, False, True, False, False]

        # resume: the stored (masked) config is compared masked, so it is no change ...
        ctl = local_controller(*overrides, "resume=true")
        ctl.tracker.finish()
        # ... a rotated judge password neither ...
        rotated = [o.replace(JUDGE_PW, "rotated-pw") for o in overrides]
        ctl = local_controller(*rotated, "resume=true")
        ctl.tracker.finish()
        # ... but another judge host is, and the refusal shows no secret
        moved = [o.replace("@127.0.0.1:", "@127.0.0.2:") if o.startswith("judge.endpoint.base_url") else o for o in overrides]
        with pytest.raises(ConfigError, match=r"changed config \(judge.endpoint.base_url\)") as refused:
            local_controller(*moved, "resume=true")
        assert_clean("resume refusal", str(refused.value))

    # The real values reached their users.
    assert tracking.proxy.counts["forwarded"] > 0 and tracking.proxy.counts["refused"] == 0
    sent = judge_server.seen[0]
    assert sent["path"] == f"/v1/chat/completions?api_key={QUERY_KEY}" and sent["auth"].startswith("Basic ")

    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["tracking"]["uri"] == f"http://***@127.0.0.1:{tracking.proxy.port}"
    assert manifest["config"]["cluster"]["runtime_env"]["env_vars"] == {"API_KEY": "***"}
    assert manifest["mlflow"]["tracking_uri"] == manifest["config"]["tracking"]["uri"]
    assert "api_key=***" in (run_dir / "config.yaml").read_text()
    client = MlflowClient(tracking_uri=tracking.uri)
    params = client.get_run(manifest["mlflow"]["parent_run_id"]).data.params
    assert params["cluster.runtime_env.env_vars.API_KEY"] == "***"
    assert params["judge.endpoint.base_url"].startswith("http://***@127.0.0.1:") and params["judge.endpoint.base_url"].endswith("?api_key=***")

    assert assert_tree_clean(run_dir) >= 5
    assert assert_tree_clean(tracking.root) >= 3  # the server's sqlite store, artifacts and log
    assert assert_mlflow_clean(client, tmp_path) >= 2
    assert "requests failed after 1 retries" in caplog.text and "http://***@127.0.0.1" in caplog.text
    assert_clean("log records", caplog.text)
    out = capsys.readouterr()
    assert_clean("stdout", out.out)
    assert_clean("stderr", out.err)


def test_resuming_a_run_written_before_masking(tmp_path):
    """A manifest from before masking holds the real values: resume masks both sides, accepts the
    same config, and rewrites the manifest masked."""
    from orchestrator.controller import Controller
    from orchestrator.recipes import get_recipe
    from orchestrator.submit import compose_config

    def open_run(*extra):
        cfg = compose_config([f"run_dir={tmp_path / 'run'}", *planted_overrides(f"http://alice:{MLFLOW_PW}@h:5000", "http://j:8000/v1"), *extra])
        ctl = Controller(cfg, get_recipe(cfg.recipe).roles(cfg))
        ctl.open_store()
        return ctl, cfg

    ctl, cfg = open_run()
    ctl.store.manifest["config"] = to_plain(cfg)  # as an older version wrote it
    ctl.store.save()
    assert JUDGE_PW in (tmp_path / "run" / "manifest.json").read_text()
    open_run("resume=true")
    assert_clean("manifest after resume", (tmp_path / "run" / "manifest.json").read_text())


# -- the real CLI ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_failure_prints_no_secret(tmp_path, tiny_checkpoint, monkeypatch):
    """An unreachable tracking server: MLflow's exception quotes the URI, credentials included
    (Hydra printed it as it was); the CLI prints the traceback masked and exits 1."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / "run"
    dead = f"http://alice:{MLFLOW_PW}@127.0.0.1:{free_port()}"
    proc = orchestrate(tiny_overrides(tiny_checkpoint, run_dir, rounds=1)
                       + planted_overrides(dead, f"http://127.0.0.1:{free_port()}/v1") + ["eval.every=0"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" in out and "MlflowException" in out and f"http://***@127.0.0.1:{dead.rsplit(':', 1)[1]}" in out, out[-3000:]
    assert_clean("CLI output", out)
    assert (run_dir / "hydra").is_dir()
    assert_tree_clean(run_dir)


@pytest.mark.slow
def test_cli_run_scanned_end_to_end(tmp_path, tiny_checkpoint, tracking):
    """One real round (vLLM policy, the endpoint judge, TRL DPO, MLflow through the proxy) with
    every planted secret, then every output scanned."""
    run_dir = tmp_path / "run"
    with FlakyServer(slow_s=0) as judge_server:
        proc = orchestrate(tiny_overrides(tiny_checkpoint, run_dir, rounds=1)
                           + planted_overrides(tracking.uri, judge_server.url)
                           + ["eval.every=0", "data.self_instruct.num_prompts=0", "data.prompts_per_round=4", "generation.n=2"])
        out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-5000:]
    assert f"MLflow: http://***@127.0.0.1:{tracking.proxy.port}" in out  # the CLI's last line, masked
    assert judge_server.counts["ok"] >= 8 and judge_server.seen[0]["auth"].startswith("Basic ")
    assert tracking.proxy.counts["refused"] == 0
    assert_clean("CLI stdout+stderr", out)
    hydra_logs = list((run_dir / "hydra").glob("*.log"))
    assert hydra_logs and "MLflow: http://***@127.0.0.1" in hydra_logs[0].read_text()
    assert assert_tree_clean(run_dir) >= 10  # manifest, config.yaml, round files, checkpoint, Hydra log
    assert_tree_clean(tracking.root)
    assert_mlflow_clean(MlflowClient(tracking_uri=tracking.uri), tmp_path)
