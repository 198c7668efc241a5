"""Pairwise judging, the eval stage and train/eval overlap, with fake in-process workers; eval
configs come from conf/eval/default.yaml with overrides."""

from __future__ import annotations

import json
import re

import pytest

from confs import section

from orchestrator import chat
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.eval import pairwise
from orchestrator.eval.generations import GENERATIONS_FILE, check_no_overlap
from orchestrator.eval.stage import EvalRecord, eval_stage, run_eval
from orchestrator.store import RunStore, read_jsonl
from orchestrator.types import Completion, Judgment

_OUT = re.compile(r"## Output \(a\)\n(.*)\n\n## Output \(b\)\n(.*)\n\nWhich output", re.DOTALL)


class FakeWorker:
    """Implements the worker contract: generate, choice_probs (and score) in-process."""

    def __init__(self, respond=lambda p: f"answer to {p}", prefer=None, score=None):
        self.respond = respond
        self.prefer = prefer  # (output_a, output_b) -> P(a better)
        self.scorer = score
        self.calls = {"generate": 0, "choice_probs": 0, "score": 0}
        self.last_choice_args = None
        self.asked, self.compared, self.scored = [], [], []  # generate prompts, choice_probs prompts, score generations

    def generate(self, request):
        self.calls["generate"] += 1
        self.asked += request.prompts
        texts = [self.respond(chat.last_user(p)) for p in request.prompts]
        return [Completion(texts=[t], num_tokens=[len(t.split())], finish_reasons=["stop"]) for t in texts]

    def choice_probs(self, prompts, choices, assistant_prefix="", chat=True):
        self.calls["choice_probs"] += 1
        self.last_choice_args = (list(choices), assistant_prefix, chat)
        self.compared += prompts
        out = []
        for p in prompts:
            a, b = _OUT.search(p).groups()
            pa = self.prefer(a, b)
            out.append(None if pa is None else {choices[0]: pa, choices[1]: 1 - pa})
        return out

    def score(self, generations, judge_cfg):
        self.calls["score"] += 1
        self.scored += generations
        return [Judgment(prompt_id=g.prompt_id, index=g.index, score=self.scorer(g.text), samples=[]) for g in generations]


def pairwise_cfg(**overrides):
    """conf/eval/default.yaml's ``pairwise`` section with ``overrides``."""
    return section("eval", pairwise=overrides)["pairwise"]


always_a = lambda a, b: 1.0  # noqa: E731
likes_better = lambda a, b: 0.5 if ("better" in a) == ("better" in b) else (0.9 if "better" in a else 0.1)  # noqa: E731


# -- pairwise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_position_biased_judge_gives_fifty_percent(mode):
    judge = FakeWorker(prefer=always_a)
    v = pairwise.judge_pairs(judge, ["q1", "q2", "q3"], ["x long", "y", "z"], ["b1", "b2", "b3"], pairwise_cfg(mode=mode))
    assert [x.preference for x in v] == [0.5, 0.5, 0.5]
    assert [(x.p_model_first, x.p_model_second) for x in v] == [(1.0, 0.0)] * 3
    assert pairwise.winrate([x.preference for x in v]) == 50.0
    assert judge.last_choice_args == (["a", "b"], "Output (", True)
    # What tells this judge apart from one that finds the outputs equal: it is never consistent.
    assert pairwise.position_stats(v) == {"position_consistency": 0.0, "p_first": 1.0}


def test_both_orders_soft_and_hard():
    # Model output is preferred with P 0.9 in one order and 0.6 in the other (a slight position bias).
    probs = iter([{"a": 0.9, "b": 0.1}, {"a": 0.4, "b": 0.6}, {"a": 0.7, "b": 0.3}, {"a": 0.8, "b": 0.2}])

    class J:
        def choice_probs(self, prompts, choices, assistant_prefix="", chat=True):
            return [next(probs) for _ in prompts]

    v = pairwise.judge_pairs(J(), ["q1", "q2"], ["m1", "m2"], ["b1", "b2"], pairwise_cfg(mode="soft"))
    assert v[0].preference == pytest.approx((0.9 + 0.6) / 2)
    assert v[1].preference == pytest.approx((0.7 + 0.2) / 2)
    assert pairwise.combine(0.9, 0.6, "hard") == 1.0  # both orders pick the model
    assert pairwise.combine(0.7, 0.2, "hard") == 0.5  # orders disagree: a tie
    assert pairwise.combine(0.2, 0.3, "hard") == 0.0
    assert pairwise.combine(None, 0.8, "soft") == 0.8  # one order only
    assert pairwise.combine(None, None, "soft") is None
    # Pair 1 picks the model in both orders, pair 2 flips with the order; P(a): 0.9, 0.4, 0.7, 0.8.
    assert pairwise.position_stats(v) == {"position_consistency": 0.5, "p_first": pytest.approx(2.8 / 4)}


def test_position_stats_skip_identical_outputs_and_missing_orders():
    PV = pairwise.PairVerdict
    v = [PV(0.5, 0.5, 0.5, 2, identical=True), PV(None, 0.3, 0.3, 1), PV(0.2, 0.1, 0.15, 2), PV(0.5, 0.9, 0.7, 2)]
    # Consistent: only the third (baseline both times); a tie in one order is not. P(a): 0.7, 0.2, 0.9, 0.5, 0.1.
    assert pairwise.position_stats(v) == {"position_consistency": pytest.approx(1 / 2), "p_first": pytest.approx(2.4 / 5)}
    assert pairwise.position_stats([PV(0.5, 0.5, 0.5, 2, identical=True)]) == {}


def test_ties_count_half_and_identical_outputs_skip_the_judge():
    judge = FakeWorker(prefer=likes_better)
    v = pairwise.judge_pairs(
        judge, ["q1", "q2", "q3", "q4"], ["better", "same", "x", "plain"], ["worse", "same", "x better", "plain too"], pairwise_cfg()
    )
    assert [x.preference for x in v] == [pytest.approx(0.9), 0.5, pytest.approx(0.1), 0.5]
    assert v[1].identical and not v[0].identical
    assert pairwise.winrate([x.preference for x in v]) == pytest.approx(100 * (0.9 + 0.5 + 0.1 + 0.5) / 4)
    assert pairwise.winrate([None, None]) is None


def test_unparseable_judge_and_agreement():
    judge = FakeWorker(prefer=lambda a, b: None)
    v = pairwise.judge_pairs(judge, ["q"], ["m"], ["b"], pairwise_cfg())
    assert v[0].preference is None and v[0].orders == 0
    rate, n = pairwise.agreement([1.0, 0.0, 0.7, 0.5, None], [0.9, 1.0, 0.5, 0.5, 1.0])
    assert n == 4 and rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert pairwise.agreement([None], [1.0]) == (None, 0)
    assert pairwise.pointwise_preferences([4.0, 2.0, 3.0, None], [3.0, 2.0, 3.5, 1.0]) == [1.0, 0.5, 0.0, None]


# -- overlap ---------------------------------------------------------------------------------
def test_overlap_is_refused_with_count_and_example():
    check_no_overlap(["Write a poem."], ["Write a story."])
    with pytest.raises(ConfigError, match=r"2 of the eval prompts .*'Write  a POEM\.'"):
        check_no_overlap(["Write  a POEM.", "Explain tides.", "new one"], ["write a poem.", " explain\ttides. "])


# -- the stage ----------------------------------------------------------------------------------
@pytest.fixture
def setup(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    store = RunStore(tmp_path / "run")
    store.create({}, "")
    return store, eval_cfg(prompts)


def eval_cfg(prompts, **overrides):
    """The eval section from the YAML: 5 held-out prompts from ``prompts``, 4 IF prompts, a quick bootstrap."""
    return section("eval", prompts=str(prompts), max_prompts=5, if_max_prompts=4, lc={"bootstrap": 20}, **overrides)


@pytest.fixture(scope="module")
def judge_cfg():
    return section("judge", mode="score_only")


def _policy(tag):
    return FakeWorker(respond=lambda p: f"{tag} answer to {p}", prefer=likes_better, score=lambda t: 4.0 if "better" in t else 2.0)


def test_round_zero_then_rounds(setup, judge_cfg):
    store, cfg = setup
    judge = FakeWorker(prefer=likes_better)
    kw = dict(store=store, cfg=cfg, train_prompts=["Some training prompt."], judge_cfg=judge_cfg)
    m0 = run_eval(round_index=0, policy=_policy("plain"), fixed_judge=judge, **kw)
    assert m0["eval/vs_start/winrate"] == 50.0 and m0["eval/prompts"] == 5 and m0["eval/if_prompts"] == 4
    assert "eval/if/prompt_accuracy" in m0 and "eval/if_loose/prompt_accuracy" in m0
    gens = read_jsonl(store.round(0).path / GENERATIONS_FILE)
    assert len(gens) == 9 and {g["set"] for g in gens} == {"eval", "if"}
    assert judge.calls["choice_probs"] == 0

    p1 = _policy("better")
    m1 = run_eval(round_index=1, policy=p1, fixed_judge=judge, **kw)
    assert m1["eval/vs_start/winrate"] == pytest.approx(90.0)
    assert m1["eval/vs_prev/winrate"] == m1["eval/vs_start/winrate"] and m1["eval/prev_round"] == 0
    assert m1["eval/vs_start/pairs"] == 5 and m1["eval/vs_start/judge_valid_rate"] == 1.0
    assert m1["eval/vs_start/position_consistency"] == 1.0 and m1["eval/vs_start/p_first"] == pytest.approx(0.5)
    assert 50 < m1["eval/vs_start/lc_winrate"] < 100 and m1["eval/vs_start/lc_winrate_se"] >= 0
    assert m1["eval/judge_agreement"] == 1.0 and m1["eval/policy_judge_parse_rate"] == 1.0
    assert p1.calls["score"] == 1
    records = store.round(1).read("eval", EvalRecord)
    pairs = [r for r in records if r.kind == "pair"]
    assert len(pairs) == 5 and all(r.comparison == "vs_start" and r.policy_preference == 1.0 for r in pairs)
    assert len([r for r in records if r.kind == "if"]) == 4

    # Resume: a finished eval is not redone; cached generations are not regenerated.
    again = _policy("better")
    assert run_eval(round_index=1, policy=again, fixed_judge=judge, **kw) == m1
    store.round(1).file("eval").unlink()
    run_eval(round_index=1, policy=again, fixed_judge=judge, **kw)
    assert again.calls["generate"] == 0

    # Round 2 is worse than round 1 but equal to the start: vs_prev uses round 1.
    m2 = run_eval(round_index=2, policy=_policy("plain"), fixed_judge=judge, **kw)
    assert m2["eval/prev_round"] == 1
    assert m2["eval/vs_start/winrate"] == 50.0 and m2["eval/vs_start/identical_rate"] == 1.0
    assert m2["eval/vs_prev/winrate"] == pytest.approx(10.0)
    assert "eval/judge_agreement" not in m2  # every vs_start pair identical: nothing to agree on
    # The same answers as the start: no IF change, and no spread in the paired bootstrap either.
    assert m2["eval/if/vs_start/prompt_accuracy_delta"] == 0.0 and m2["eval/if/vs_start/prompt_accuracy_delta_se"] == 0.0
    assert m1["eval/if/vs_start/prompt_accuracy_delta"] == pytest.approx(m1["eval/if/prompt_accuracy"] - m0["eval/if/prompt_accuracy"])
    prev_pairs = [r for r in store.round(2).read("eval", EvalRecord) if r.comparison == "vs_prev"]
    assert len(prev_pairs) == 5 and all(r.baseline_round == 1 and r.policy_preference is None for r in prev_pairs)


def test_position_biased_fixed_judge_through_the_stage(setup, tmp_path, judge_cfg):
    store, cfg = setup
    judge = FakeWorker(prefer=always_a)
    run_eval(round_index=0, policy=_policy("plain"), fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    pairwise_agreement = eval_cfg(tmp_path / "eval.jsonl", agreement={"method": "pairwise"})
    m1 = run_eval(round_index=1, policy=_policy("better"), fixed_judge=judge, store=store, cfg=pairwise_agreement, judge_cfg=judge_cfg)
    assert m1["eval/vs_start/winrate"] == 50.0
    # The policy judging pairwise (prefers "better" = its own outputs) vs a judge that always says a.
    assert m1["eval/judge_agreement"] == 0.5 and m1["eval/policy_judge_parse_rate"] == 1.0


def test_agreement_reversed_judge_and_round_judge_parse_rate(setup, judge_cfg):
    store, cfg = setup
    judge = FakeWorker(prefer=likes_better)
    run_eval(round_index=0, policy=_policy("plain"), fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    store.round(1).path.mkdir(parents=True, exist_ok=True)
    (store.round(1).path / "judgments.metrics.json").write_text(json.dumps({"judge/parse_rate": 0.75}))
    contrarian = FakeWorker(respond=lambda p: f"better answer to {p}", score=lambda t: 1.0 if "better" in t else 5.0)
    m1 = run_eval(round_index=1, policy=contrarian, fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    assert m1["eval/judge_agreement"] == 0.0
    assert m1["eval/judge_parse_rate"] == 0.75


def test_agreement_can_be_turned_off(setup, tmp_path, judge_cfg):
    store, cfg = setup
    judge = FakeWorker(prefer=likes_better)
    run_eval(round_index=0, policy=_policy("plain"), fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    p1 = _policy("better")
    off = eval_cfg(tmp_path / "eval.jsonl", agreement={"enabled": False})
    m1 = run_eval(round_index=1, policy=p1, fixed_judge=judge, store=store, cfg=off, judge_cfg=judge_cfg)
    assert m1["eval/vs_start/winrate"] == pytest.approx(90.0)
    assert p1.calls["score"] == p1.calls["choice_probs"] == 0 and "eval/judge_agreement_pairs" not in m1


def test_round_without_round_zero_fails_clearly(setup, judge_cfg):
    store, cfg = setup
    with pytest.raises(OrchestratorError, match="evaluate round 0 first"):
        eval_stage(round_index=1, policy=_policy("x"), fixed_judge=FakeWorker(prefer=always_a), store=store, cfg=cfg, judge_cfg=judge_cfg)


def test_stage_refuses_overlap_before_generating(setup, judge_cfg):
    store, cfg = setup
    policy = _policy("x")
    with pytest.raises(ConfigError, match="1 of the eval prompts"):
        run_eval(round_index=0, policy=policy, fixed_judge=None, store=store, cfg=cfg, judge_cfg=judge_cfg, train_prompts=["question NUMBER 3?"])
    assert policy.calls["generate"] == 0


def test_a_missing_config_key_is_named(setup, judge_cfg):
    store, cfg = setup
    del cfg["decoding"]["max_tokens"]  # no default in code: the YAML is the one place
    with pytest.raises(KeyError, match="eval.decoding.max_tokens missing"):
        run_eval(round_index=0, policy=_policy("x"), fixed_judge=None, store=store, cfg=cfg, judge_cfg=judge_cfg)


def test_changed_prompt_text_is_regenerated_and_not_compared(setup, tmp_path, judge_cfg):
    store, cfg = setup
    judge = FakeWorker(prefer=likes_better)
    run_eval(round_index=0, policy=_policy("plain"), fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Question number {i}?" if i else "A new text"}) + "\n" for i in range(6)))
    p1 = _policy("better")
    m1 = run_eval(round_index=1, policy=p1, fixed_judge=judge, store=store, cfg=eval_cfg(changed), judge_cfg=judge_cfg)
    assert m1["eval/vs_start/pairs"] == 4  # e0's text differs from round 0's: left out
    gens = {g["prompt_id"]: g for g in read_jsonl(store.round(1).path / GENERATIONS_FILE)}
    assert gens["e0"]["messages"] == [{"role": "user", "content": "A new text"}]
    assert gens["e0"]["text"] == "better answer to A new text"


def test_chat_prompts_are_answered_and_judged_as_conversations(tmp_path, judge_cfg):
    """An eval prompt with a system turn: the policy answers the messages, the judges read their transcript."""
    prompts = tmp_path / "chat.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompts.write_text(json.dumps({"id": "c0", "messages": messages}) + "\n")
    store = RunStore(tmp_path / "run")
    store.create({}, "")
    cfg = section("eval", prompts=str(prompts), if_max_prompts=0)
    judge = FakeWorker(prefer=likes_better)
    start = FakeWorker(respond=lambda p: "red")
    run_eval(round_index=0, policy=start, fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    p1 = _policy("better")
    m1 = run_eval(round_index=1, policy=p1, fixed_judge=judge, store=store, cfg=cfg, judge_cfg=judge_cfg)
    assert start.asked == p1.asked == [messages]
    assert m1["eval/vs_start/winrate"] == pytest.approx(90.0) and m1["eval/judge_agreement"] == 1.0
    assert len(judge.compared) == 2 and all("System: Be brief.\n\nUser: Name a colour." in p for p in judge.compared)
    assert [(g.messages, g.text) for g in p1.scored] == [(messages, "better answer to Name a colour."), (messages, "red")]
