"""Chain-of-self-refinement in the eval stage (``eval.refine_steps``), with fake in-process workers:
refined answers come from the direct ones step by step, are cached per step, and are judged as a
second answer set; with refine_steps=0 the stage's files and metrics are what they were."""

from __future__ import annotations

import json

import pytest
from confs import section
from test_eval_stage import FakeWorker, likes_better

from orchestrator import chat
from orchestrator.eval.generations import GENERATIONS_FILE
from orchestrator.eval.stage import EvalRecord, run_eval
from orchestrator.refine import refine_messages
from orchestrator.store import RunStore, read_jsonl

MARK = "Example response:\n"


def policy(tag: str) -> FakeWorker:
    """Answers a question "<tag> answer to Q"; asked to refine y (the built-in single-turn template),
    answers "y, better"; scores answers with "better" higher (for the agreement check)."""

    def respond(text: str) -> str:
        return text.split(MARK, 1)[1] + ", better" if MARK in text else f"{tag} answer to {text}"

    return FakeWorker(respond=respond, prefer=likes_better, score=lambda t: 4.0 if "better" in t else 2.0)


@pytest.fixture
def setup(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(6)))

    def make(name: str, **overrides):
        store = RunStore(tmp_path / name)
        store.create({}, "")
        cfg = section("eval", prompts=str(prompts), max_prompts=5, if_max_prompts=4, lc={"bootstrap": 20}, **overrides)
        return store, cfg

    return make


@pytest.fixture(scope="module")
def judge_cfg():
    return section("judge", mode="score_only")


def steps_of(worker: FakeWorker) -> list[int]:
    """The chain step of each prompt the worker answered (0: a direct answer)."""
    return [chat.last_user(m).count(MARK) and chat.last_user(m).split(MARK, 1)[1].count(", better") + 1 for m in worker.asked]


def test_refined_answers_chain_from_the_direct_ones_and_are_compared(setup, judge_cfg):
    store, cfg = setup("run", refine_steps=2)
    judge = FakeWorker(prefer=likes_better)
    kw = dict(store=store, cfg=cfg, judge_cfg=judge_cfg)
    start = policy("plain")
    m0 = run_eval(round_index=0, policy=start, fixed_judge=judge, **kw)
    # 5 held-out + 4 IF direct answers, then 2 refinement steps of the 5 held-out answers (not IF: refine_if off)
    assert sorted(steps_of(start)) == [0] * 9 + [1] * 5 + [2] * 5
    rd = store.round(0)
    direct = {g["prompt_id"]: g for g in read_jsonl(rd.path / GENERATIONS_FILE) if g["set"] == "eval"}
    step1 = {g["prompt_id"]: g for g in read_jsonl(rd.path / "eval_refine_1.jsonl")}
    step2 = {g["prompt_id"]: g for g in read_jsonl(rd.path / "eval_refine_2.jsonl")}
    for pid, d in direct.items():
        # each step answers the refinement prompt built from the previous step's answer
        assert step1[pid]["messages"] == refine_messages(d["messages"], d["text"], None, "single_turn")
        assert step2[pid]["messages"] == refine_messages(d["messages"], step1[pid]["text"], None, "single_turn")
        assert step2[pid]["text"] == d["text"] + ", better, better"
    # the start's refined answers against its own direct answers: refining helps this judge
    assert m0["eval/vs_start/winrate"] == 50.0
    assert m0["eval/refined/vs_start/winrate"] == pytest.approx(90.0)
    assert m0["eval/refined/vs_direct/winrate"] == m0["eval/refined/vs_start/winrate"]
    assert m0["eval/refined/steps"] == 2 and m0["eval/refined/generated"] == 10 and m0["eval/refined/unchanged_rate"] == 0.0
    assert m0["eval/refined/vs_start/pairs"] == 5 and "eval/refined/if/prompt_accuracy" not in m0

    # round 1 answers "better" directly: direct vs start 90; refined vs start 90; refined vs its own direct 50
    p1 = policy("better")
    m1 = run_eval(round_index=1, policy=p1, fixed_judge=judge, **kw)
    assert m1["eval/vs_start/winrate"] == pytest.approx(90.0)
    assert m1["eval/refined/vs_start/winrate"] == pytest.approx(90.0)
    assert m1["eval/refined/vs_direct/winrate"] == 50.0
    assert 0 <= m1["eval/refined/vs_start/lc_winrate"] <= 100 and "eval/refined/vs_start/lc_winrate_se" in m1
    records = store.round(1).read("eval", EvalRecord)
    assert sorted({r.comparison for r in records if r.kind == "pair"}) == ["refined/vs_direct", "refined/vs_start", "vs_start"]
    assert "time/eval_refine_s" in m1

    # resume: every step is cached, nothing is generated again
    store.round(1).file("eval").unlink()
    again = policy("better")
    m1_again = run_eval(round_index=1, policy=again, fixed_judge=judge, **kw)
    assert again.calls["generate"] == 0 and m1_again["eval/refined/generated"] == 0
    # a killed eval that finished step 1 only redoes step 2
    store.round(1).file("eval").unlink()
    (store.round(1).path / "eval_refine_2.jsonl").unlink()
    partial = policy("better")
    run_eval(round_index=1, policy=partial, fixed_judge=judge, **kw)
    assert steps_of(partial) == [2] * 5


def test_refined_if_accuracy(setup, judge_cfg):
    store, cfg = setup("run", refine_steps=1, refine_if=True)
    m0 = run_eval(round_index=0, policy=policy("plain"), fixed_judge=FakeWorker(prefer=likes_better), store=store, cfg=cfg,
                  judge_cfg=judge_cfg)
    assert len(read_jsonl(store.round(0).path / "eval_refine_1.jsonl")) == 5 + 4
    for key in ("if/prompt_accuracy", "if/check_accuracy", "if_loose/prompt_accuracy"):
        assert 0 <= m0[f"eval/refined/{key}"] <= 1, key
    assert len([r for r in store.round(0).read("eval", EvalRecord) if r.kind == "refined_if"]) == 4


def test_refine_steps_zero_leaves_the_stage_as_it_was(setup, judge_cfg):
    """The same rounds with refine_steps=0 and 2: the direct answers, records and metrics of the
    0-run are exactly the 2-run's without the refined ones, and the 0-run writes no refine file."""
    judge = FakeWorker(prefer=likes_better)
    out = {}
    for steps in (0, 2):
        store, cfg = setup(f"run{steps}", refine_steps=steps)
        metrics, pols = [], []
        for r, tag in enumerate(("plain", "better")):
            pols.append(policy(tag))
            metrics.append(run_eval(round_index=r, policy=pols[-1], fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg))
        out[steps] = store, metrics, pols
    store0, metrics0, pols0 = out[0]
    store2, metrics2, _ = out[2]
    assert all(steps_of(p) == [0] * 9 for p in pols0)
    for r in (0, 1):
        rd0, rd2 = store0.round(r), store2.round(r)
        assert sorted(p.name for p in rd0.path.iterdir()) == ["eval.jsonl", "eval.meta.json", "eval.metrics.json", GENERATIONS_FILE]
        assert (rd0.path / GENERATIONS_FILE).read_bytes() == (rd2.path / GENERATIONS_FILE).read_bytes()
        assert not any("refined" in k or "refine" in k for k in metrics0[r])
        timeless = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
        assert timeless(metrics0[r]) == {k: v for k, v in timeless(metrics2[r]).items() if not k.startswith("eval/refined/")}
        lines0 = rd0.file("eval").read_text().splitlines()
        lines2 = [line for line in rd2.file("eval").read_text().splitlines() if "refined" not in line]
        assert lines0 == lines2
