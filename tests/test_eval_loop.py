"""The eval hook in the round loop, through a real Controller (run store, MLflow sqlite store) with
in-process workers attached by role: which rounds are evaluated, round 0 first, the fixed judge's
role, and its end after the last round."""

from __future__ import annotations

import json

import pytest
from confs import composed
from conftest import write_checkpoint
from mlflow.tracking import MlflowClient
from test_eval_stage import FakeWorker, likes_better

from orchestrator import eval as evaluation
from orchestrator.eval.loop import JUDGE, eval_due, fixed_judge


class Engine(FakeWorker):
    """An engine serving one checkpoint at a time: the starting model answers "plain ...", any
    trained one "better ..."; as a judge it prefers "better" answers, as a scorer too."""

    def __init__(self, start: str):
        super().__init__(respond=self.answer, prefer=likes_better, score=lambda t: 4.0 if "better" in t else 2.0)
        self.start, self.path, self.served, self.shut = start, None, [], False

    def answer(self, prompt: str) -> str:
        return f"{'plain' if self.path == self.start else 'better'} answer to {prompt}"

    def sync_weights(self, path, sha256=None):
        self.path = path
        self.served.append(path)
        return 0.0

    def shutdown(self):
        self.shut = True


@pytest.fixture
def eval_run(local_controller, tmp_path):
    """``run(every, rounds)``: a run whose rounds each train a checkpoint and call ``evaluate``."""
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Held-out question {i}?"}) + "\n" for i in range(4)))

    def run(every: int, rounds: int):
        ctl = local_controller(
            f"eval.every={every}", f"rounds={rounds}", f"eval.prompts={prompts}", "eval.if_max_prompts=2", "eval.lc.bootstrap=10"
        )
        policy = ctl.workers.attach("policy", Engine(ctl.model_path(0)))
        judge = ctl.workers.attach(JUDGE, Engine(ctl.model_path(0))) if JUDGE in ctl.workers.roles else None
        judge_after = []  # after each round: (is the judge role live, how often it was asked to serve)
        for t in ctl.pending_rounds():
            with ctl.round(t) as rnd:
                rnd.checkpoint("policy", "train", lambda out: write_checkpoint(out, t))
                evaluation.evaluate(rnd)
            judge_after.append((JUDGE in ctl.workers.live, len(judge.served) if judge else 0))
        evaluated = [i for i in range(rounds + 1) if ctl.store.round(i).has("eval")]
        return ctl, policy, judge, evaluated, judge_after

    return run


def test_every_third_round_round_zero_and_the_last(eval_run):
    ctl, policy, judge, evaluated, judge_after = eval_run(every=3, rounds=10)
    assert evaluated == [0, 3, 6, 9, 10]
    # round 0 with the starting model on first use, then each evaluated round's new checkpoint
    assert policy.served == [ctl.model_path(i) for i in (0, 3, 6, 9, 10)]
    assert set(judge.served) == {ctl.model_path(0)}  # model: start, the same judge every round
    # the judge serves once per evaluated round (round 0 and 3 at the end of round 3); it is
    # stopped after the last round
    assert [n for _, n in judge_after] == [0, 0, 2, 2, 2, 3, 3, 3, 4, 5]
    assert [live for live, _ in judge_after] == [True] * 9 + [False] and judge.shut

    m3, m6 = ctl.store.round(3).metrics("eval"), ctl.store.round(6).metrics("eval")
    assert m3["eval/vs_start/winrate"] == pytest.approx(90.0) and m3["eval/prev_round"] == 0 and "time/eval_s" in m3
    assert m3["eval/judge_agreement"] == 1.0
    assert m6["eval/prev_round"] == 3 and m6["eval/vs_prev/winrate"] == 50.0  # both trained: the same answers

    client = MlflowClient(ctl.tracker.uri)
    parent = ctl.tracker.parent_id
    history = client.get_metric_history(parent, "eval/vs_start/winrate")
    assert sorted((h.step, h.value) for h in history) == [(0, 50.0)] + [(i, pytest.approx(90.0)) for i in (3, 6, 9, 10)]
    start = client.get_run(ctl.store.round_state(0)["mlflow_run_id"])
    assert start.info.run_name == "round_000" and start.info.status == "FINISHED"
    assert any(a.path == "eval_metrics.png" for a in client.list_artifacts(parent))


def test_every_round(eval_run):
    ctl, policy, judge, evaluated, judge_after = eval_run(every=1, rounds=10)
    assert evaluated == list(range(11))
    assert policy.served == [ctl.model_path(i) for i in range(11)]
    assert judge_after == [(True, 2), *((True, n) for n in range(3, 11)), (False, 11)] and judge.shut


def test_every_zero_evaluates_nothing_and_declares_no_judge(eval_run):
    ctl, policy, judge, evaluated, _ = eval_run(every=0, rounds=10)
    assert evaluated == [] and judge is None and JUDGE not in ctl.workers.roles
    assert policy.served == [] and not (ctl.store.root / "eval_metrics.png").exists()


def test_which_rounds_are_due():
    assert [eval_due(r, 2, 5) for r in range(6)] == [True, False, True, False, True, True]
    assert [eval_due(r, 3, 10) for r in range(11)] == [r in (0, 3, 6, 9, 10) for r in range(11)]
    assert not any(eval_due(r, 0, 3) for r in range(4))


def test_the_judge_role_a_local_engine_or_an_endpoint(tiny_checkpoint):
    assert evaluation.roles(composed(["eval.every=0"])) == []
    (role,) = evaluation.roles(composed(["generation.engine.max_model_len=512"]))
    assert (role.name, role.kind, role.section) == (JUDGE, "vllm", "eval.judge")
    # generation.engine with eval.judge.engine over it
    assert role.engine["gpu_memory_utilization"] == 0.1 and role.engine["max_model_len"] == 512
    assert role.resources == {"num_cpus": 0, "num_gpus": 0} and role.release == "none"
    assert {"eval.judge.resources", "eval.judge.engine.gpu_memory_utilization"} <= set(role.resumable)

    (role,) = evaluation.roles(composed(["eval.judge.endpoint.base_url=http://localhost:8000/v1"]))
    assert (role.name, role.kind) == (JUDGE, "endpoint") and role.endpoint["base_url"] == "http://localhost:8000/v1"
    assert role.resumable[0] == "eval.judge.resources"
    assert {"eval.judge.endpoint.timeout_s", "eval.judge.endpoint.max_retries", "eval.judge.endpoint.concurrency"} <= set(role.resumable)


def test_a_judge_checkpoint_is_served_instead_of_the_start(local_controller, tmp_path):
    judge_model = tmp_path / "judge"
    judge_model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (judge_model / name).write_text("{}")
    ctl = local_controller(f"eval.judge.model={judge_model}")
    judge = ctl.workers.attach(JUDGE, Engine(ctl.model_path(0)))
    assert fixed_judge(ctl) is judge and judge.served == [str(judge_model.resolve())] != [ctl.model_path(0)]
