"""EVOLVE without engines: refinement prompts, chains and their metrics, both pair selections and
both pair kinds with their loss weights, the config checks, and a run killed mid-chain resuming at
the step (a real Controller, run store and MLflow sqlite store, with in-process workers)."""

from __future__ import annotations

import json
import re

import pytest
from confs import composed
from conftest import write_checkpoint

from orchestrator import chat, refine
from orchestrator.errors import ConfigError
from orchestrator.pairs import chain_pairs, select_from_chain
from orchestrator.recipes import evolve, get_recipe
from orchestrator.refine import Chain, build_chains, chain_metrics, refine_messages
from orchestrator.types import Completion, Generation, Judgment

X = chat.user("What is 2+2?")


def t_ref(x, y):
    return refine_messages(x, y, None, "single_turn")


def chain(scores, texts=None, pid="p", index=0):
    texts = texts or [f"y{k}" for k in range(len(scores))]
    return Chain(pid, index, X, list(texts), list(scores))


# -- refinement prompts -------------------------------------------------------------------------
def test_single_turn_prompt_holds_the_question_and_the_earlier_answer():
    msgs = refine_messages(X, "It is 5.", None, "single_turn")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    text = msgs[0]["content"]
    assert text == refine.SINGLE_TURN_TEMPLATE.format(prompt="What is 2+2?", response="It is 5.")
    assert "Question:\nWhat is 2+2?" in text and "Example response:\nIt is 5." in text
    # a system turn and an earlier exchange are kept; only the last user turn becomes T_ref(x, y)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a colour."}]
    msgs = refine_messages(convo, "blue {not a field}", "Q: {prompt} | A: {response} | better?", "single_turn")
    assert msgs[:3] == convo[:3]
    assert msgs[3] == {"role": "user", "content": "Q: Name a colour. | A: blue {not a field} | better?"}


def test_multi_turn_prompt_puts_the_answer_in_an_assistant_turn():
    msgs = refine_messages(X, "It is 5.", None, "multi_turn")
    assert msgs == [*X, {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": refine.MULTI_TURN_TEMPLATE}]
    # a blank earlier answer cannot be a chat turn: it reads as a placeholder
    assert refine_messages(X, "  ", "Again, for {prompt}", "multi_turn")[1:] == [
        {"role": "assistant", "content": refine.EMPTY_RESPONSE}, {"role": "user", "content": "Again, for What is 2+2?"}]


@pytest.mark.parametrize("template, fmt, problem", [
    (None, "single_turn", None),
    (None, "multi_turn", None),
    ("Refine it.", "multi_turn", None),
    ("Refine {response}", "single_turn", r"needs \{prompt\}"),
    ("Refine it.", "single_turn", r"needs \{prompt\} and \{response\}"),
    ("{prompt} {response} {answer}", "single_turn", r"unknown placeholder\(s\) \{answer\}"),
    ("{prompt} {response} {}", "single_turn", r"unknown placeholder"),
    ("{prompt {response}", "single_turn", "not a str.format template"),
    ("  ", "multi_turn", "empty"),
    (None, "chat", "format must be one of"),
])  # fmt: skip
def test_template_checks(template, fmt, problem):
    got = refine.template_problem(template, fmt)
    assert got is None if problem is None else re.search(problem, got), got


# -- chains and their metrics -------------------------------------------------------------------
def test_chain_metrics_on_hand_made_chains():
    chains = [
        chain([1.0, 2.0, 3.0]),  # improved by 2
        chain([3.0, 3.0, 2.0]),  # worse by 1
        chain([2.0, None, 2.0], texts=["same", "other", "same"]),  # no gain, y_K == y_0 verbatim
        chain([None, 4.0, 5.0]),  # y_0 unscored: no gain
    ]
    m = chain_metrics(chains)
    assert m["evolve/chains"] == 4
    assert m["evolve/score_step_0"] == pytest.approx((1 + 3 + 2) / 3)
    assert m["evolve/score_step_1"] == pytest.approx((2 + 3 + 4) / 3)
    assert m["evolve/score_step_2"] == pytest.approx((3 + 2 + 2 + 5) / 4)
    assert m["evolve/refine_gain"] == pytest.approx((2 - 1 + 0) / 3)
    assert m["evolve/improved_share"] == pytest.approx(1 / 3)
    assert m["evolve/unchanged_share"] == pytest.approx(1 / 4)
    assert chain_metrics([]) == {"evolve/chains": 0.0}


def test_chains_are_built_from_the_stage_records():
    y0 = [Generation(prompt_id=p, messages=chat.user(f"q {p}"), index=c, text=f"{p}{c}-0", num_tokens=1) for p in "ab" for c in (0, 1)]
    y1 = [Generation(prompt_id=g.prompt_id, messages=t_ref(g.messages, g.text), index=g.index, text=g.text[:-1] + "1", num_tokens=1)
          for g in reversed(y0)]  # any order: matched by (prompt, chain)
    j = [[Judgment(prompt_id=g.prompt_id, index=g.index, score=float(k + g.index), samples=[]) for g in step] for k, step in enumerate((y0, y1))]
    chains = build_chains([y0, y1], j)
    assert [(c.prompt_id, c.index) for c in chains] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert chains[1].messages == chat.user("q a") and chains[1].texts == ["a1-0", "a1-1"] and chains[1].scores == [1.0, 2.0]


# -- pairs: selections, kinds, weights ----------------------------------------------------------
def test_judge_selection_best_vs_worst_both_kinds_with_weights():
    chains = [
        chain([2.0, 4.5, 1.0, 3.0], pid="a"),  # best y1, worst y2
        chain([3.0, 3.0, 3.0, 3.0], pid="tie"),
        chain([None, 2.0, None, None], pid="few"),
        chain([1.0, 4.0, 4.0, 2.0], texts=["y", "z", "z2", "w"], pid="b"),  # equal best: the earliest (y1)
        chain([1.0, 2.0, 2.0, 2.0], texts=["dup", "x", "x", "dup"], pid="c", index=1),
    ]
    pairs, dropped = chain_pairs(chains, "judge", {"direct": 1.0, "refine": 0.5}, t_ref)
    assert dropped == {"tie": 1, "too_few_scored": 1, "identical": 0}
    assert [(p.prompt_id, p.meta["kind"]) for p in pairs] == [
        ("a", "direct"), ("a", "refine"), ("b", "direct"), ("b", "refine"), ("c", "direct"), ("c", "refine")]
    direct, refined = pairs[0], pairs[1]
    assert (direct.chosen, direct.rejected, direct.chosen_score, direct.rejected_score) == ("y1", "y2", 4.5, 1.0)
    assert direct.messages == X and direct.weight == 1.0
    assert direct.meta == {"kind": "direct", "chain": 0, "steps": [1, 2], "selection": "judge"}
    # the refinement pair: T_ref(x, y_l) -> y_w preferred over y_l, with the refine weight
    assert (refined.chosen, refined.rejected) == ("y1", "y2") and refined.weight == 0.5
    assert refined.messages == t_ref(X, "y2") and "y2" in refined.messages[0]["content"]
    assert refined.meta == {"kind": "refine", "chain": 0, "steps": [1, 2], "context_step": 2, "selection": "judge"}
    assert (pairs[2].chosen, pairs[2].rejected, pairs[2].chosen_index) == ("z", "y", 1)
    assert pairs[5].meta["chain"] == 1 and (pairs[5].chosen, pairs[5].rejected) == ("x", "dup")


def test_judge_selection_drops_identical_texts():
    pairs, dropped = chain_pairs([chain([1.0, 3.0], texts=["same", "same"])], "judge", {"direct": 1.0, "refine": 1.0}, t_ref)
    assert pairs == [] and dropped["identical"] == 1


def test_rule_selection_final_vs_initial_with_the_consistency_check():
    chains = [
        chain([1.0, 0.5, 2.0], pid="up"),  # y_K above y_0: kept, even though y_1 is the worst
        chain([2.0, 5.0, 2.0], pid="flat"),  # equal: the judge does not score y_K below y_0, kept
        chain([3.0, 4.0, 2.5], pid="down"),  # y_K below y_0: inconsistent
        chain([None, 1.0, 2.0], pid="unscored"),
        chain([1.0, 2.0, 3.0], texts=["a", "b", "a"], pid="copy"),
    ]
    weights = {"direct": 2.0, "refine": 1.0}
    pairs, dropped = chain_pairs(chains, "rule", weights, t_ref, rule_min_gain=0.0)
    assert dropped == {"unscored": 1, "inconsistent": 1, "identical": 1, "too_few_steps": 0}
    assert [(p.prompt_id, p.meta["kind"]) for p in pairs] == [("up", "direct"), ("up", "refine"), ("flat", "direct"), ("flat", "refine")]
    up = pairs[0]
    assert (up.chosen, up.rejected, up.chosen_index, up.rejected_index, up.weight) == ("y2", "y0", 2, 0, 2.0)
    assert pairs[1].messages == t_ref(X, "y0") and pairs[1].meta["steps"] == [2, 0] and pairs[1].weight == 1.0
    # a stricter check: a gain of at least 0.5
    kept, _ = chain_pairs(chains, "rule", weights, t_ref, rule_min_gain=0.5)
    assert {p.prompt_id for p in kept} == {"up"}
    # no check: the rule alone keeps the chain that got worse, never an unscored one
    kept, dropped = chain_pairs(chains, "rule", weights, t_ref, rule_min_gain=None)
    assert {p.prompt_id for p in kept} == {"up", "flat", "down"} and dropped["unscored"] == 1
    assert select_from_chain(chain([2.0]), "rule", 0.0) == (None, "too_few_steps")


def test_a_kind_with_weight_zero_is_not_built():
    chains = [chain([1.0, 3.0])]
    only_refine, _ = chain_pairs(chains, "judge", {"direct": 0.0, "refine": 1.0}, t_ref)
    assert [p.meta["kind"] for p in only_refine] == ["refine"]
    only_direct, _ = chain_pairs(chains, "rule", {"direct": 1.0, "refine": 0}, t_ref)
    assert [p.meta["kind"] for p in only_direct] == ["direct"]
    with pytest.raises(ValueError, match="unknown pair kinds"):
        chain_pairs(chains, "judge", {"direct": 1.0, "refin": 1.0}, t_ref)


def test_pairs_stage_metrics():
    ev = dict(composed(["+experiment=evolve", "evolve.loss_weights.refine=0.25"]).evolve)
    ev["loss_weights"] = dict(ev["loss_weights"])
    chains = [chain([1.0, 3.0], pid="a"), chain([2.0, 1.0], pid="b"), chain([2.0, 2.0], pid="c")]
    pairs, m = evolve.make_pairs(chains, ev)
    assert [(p.prompt_id, p.meta["kind"], p.weight) for p in pairs] == [
        ("a", "direct", 1.0), ("a", "refine", 0.25), ("b", "direct", 1.0), ("b", "refine", 0.25)]
    assert m["evolve/pairs_direct"] == 2 and m["evolve/pairs_refine"] == 2 and m["pairs/kept"] == 4
    assert m["pairs/kept_rate"] == pytest.approx(2 / 3) and m["pairs/dropped_tie"] == 1
    assert m["evolve/refine_gain"] == pytest.approx((2 - 1 + 0) / 3) and m["evolve/improved_share"] == pytest.approx(1 / 3)
    assert m["evolve/score_step_0"] == pytest.approx(5 / 3) and m["evolve/score_step_1"] == 2.0


# -- config checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("evolve.refine_steps=0", r"evolve.refine_steps=0 is invalid: a whole number >= 1"),
    ("evolve.refine_steps=1.5", r"evolve.refine_steps=1.5 is invalid"),
    ("evolve.chains=0", r"evolve.chains=0 is invalid"),
    ("evolve.selection=best", r"evolve.selection='best' is invalid: one of judge, rule"),
    ("evolve.rule_min_gain=abc", r"evolve.rule_min_gain='abc' is invalid: expected a number"),
    ("evolve.refine_format=chat", r"evolve.refine_format='chat' is invalid: one of single_turn, multi_turn"),
    ("evolve.template='Improve: {response}'", r"evolve.template='Improve: \{response\}' is invalid: .*needs \{prompt\}"),
    ("evolve.template='{prompt} {response} {x}'", r"evolve.template=.* unknown placeholder"),
    ("evolve.loss_weights.refine=-1", r"evolve.loss_weights.refine=-1 is invalid: a finite number >= 0"),
    ("evolve.loss_weights.refine=nan", r"evolve.loss_weights.refine=.* is invalid: a finite number >= 0"),
    ("+evolve.loss_weights.sft=1", r"evolve.loss_weights=.* is invalid: a weight for each pair kind: direct, refine"),
    ("generation.max_tokens=1500", r"generation.max_tokens=1500 is invalid: twice it must stay below"),
])  # fmt: skip
def test_bad_evolve_config_is_refused_by_roles(override, message):
    cfg = composed(["+experiment=evolve", override])
    with pytest.raises(ConfigError, match=message):
        get_recipe("evolve").roles(cfg)


def test_all_zero_weights_and_a_missing_section_are_refused():
    cfg = composed(["+experiment=evolve", "evolve.loss_weights.direct=0", "evolve.loss_weights.refine=0"])
    with pytest.raises(ConfigError, match=r"evolve.loss_weights=\{'direct': 0, 'refine': 0\} is invalid: at least one weight > 0"):
        get_recipe("evolve").roles(cfg)
    with pytest.raises(ConfigError, match=r"evolve=None is invalid: .*\+experiment=evolve"):
        get_recipe("evolve").roles(composed(["recipe=evolve"]))


def test_the_cli_check_refuses_before_writing(tmp_path):
    from orchestrator.cli import checked

    cfg = composed(["+experiment=evolve", "evolve.selection=nope", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="evolve.selection"):
        checked(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("eval.refine_steps=-1", r"eval.refine_steps=-1 is invalid"),
    ("eval.refine_steps=true", r"eval.refine_steps=True is invalid"),
    ("eval.refine_format=x", r"eval.refine_format='x' is invalid"),
    ("eval.refine_template='no fields'", r"eval.refine_template='no fields' is invalid: .*needs \{prompt\} and \{response\}"),
    ("eval.refine_if=maybe", r"eval.refine_if='maybe' is invalid: true or false"),
])  # fmt: skip
def test_bad_eval_refine_config_is_refused(override, message):
    from orchestrator.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(composed([override]))


def test_the_experiment_wires_the_eval_to_the_recipes_refinement():
    cfg = composed(["+experiment=evolve", "evolve.refine_steps=2", "evolve.refine_format=multi_turn", "evolve.template=Better please."])
    assert (cfg.eval.refine_steps, cfg.eval.refine_format, cfg.eval.refine_template) == (2, "multi_turn", "Better please.")
    assert composed([]).eval.refine_steps == 0  # off unless asked for


# -- resume mid-chain, with in-process workers ----------------------------------------------------
MARK = "Example response:\n"


class Policy:
    """Answers a question with "answer to Q"; asked to refine y, answers "y +". Scores an answer by its
    number of refinements (as the Self-Rewarding judge). ``fail_at``: refuses to refine a step-``fail_at`` prompt."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.asked: list = []
        self.judged: list = []

    @staticmethod
    def step_of(messages) -> int:
        """The chain step a prompt asks for: 0 for a question, k for a refinement of a step-(k-1) answer."""
        text = chat.last_user(messages)
        return text.split(MARK, 1)[1].count("+") + 1 if MARK in text else 0

    def generate(self, request):
        out = []
        for msgs in request.prompts:
            step = self.step_of(msgs)
            if step == self.fail_at:
                raise RuntimeError(f"killed while refining step {step}")
            self.asked.append(msgs)
            text = chat.last_user(msgs)
            answer = text.split(MARK, 1)[1] + " +" if MARK in text else f"answer to {text}"
            out.append(Completion(texts=[answer] * request.n, num_tokens=[3] * request.n, finish_reasons=["stop"] * request.n))
        return out

    def score(self, generations, judge_cfg):
        self.judged += generations
        return [Judgment(prompt_id=g.prompt_id, index=g.index, score=float(g.text.count("+")), samples=[], mode="score_only")
                for g in generations]

    def sync_weights(self, path, sha256=None):
        return 0.0


def test_a_run_killed_mid_chain_resumes_at_the_step(local_controller, tmp_path):
    overrides = ["+experiment=evolve", "rounds=1", "eval.every=0", "evolve.refine_steps=3", "evolve.loss_weights.refine=0.5",
                 "data.prompts_per_round=3", "data.self_instruct.num_prompts=0"]
    ctl = local_controller(*overrides)
    first = ctl.workers.attach("policy", Policy(fail_at=2))
    with pytest.raises(RuntimeError, match="killed while refining step 2"):
        evolve.run(ctl)
    rd = ctl.store.round(1)
    assert rd.has("generations") and rd.has("refine_1") and not rd.has("refine_2") and not rd.has("judgments")
    assert sorted(Policy.step_of(m) for m in first.asked) == [0, 0, 0, 1, 1, 1]

    # The trainer is not under test here: round 1's checkpoint is already there, so DPO is skipped.
    write_checkpoint(rd.checkpoint("policy"))
    again = local_controller(*overrides, "resume=true")
    second = again.workers.attach("policy", Policy())
    evolve.run(again)
    # neither the direct answers nor refinement step 1 were asked for again
    assert sorted(Policy.step_of(m) for m in second.asked) == [2, 2, 2, 3, 3, 3]
    # step 2 refined the step-1 answers read back from refine_1.jsonl
    y1 = {g.prompt_id: g.text for g in rd.read("refine_1", Generation)}
    y2 = rd.read("refine_2", Generation)
    assert all(g.text == y1[g.prompt_id] + " +" and g.messages == t_ref(X_of(rd, g.prompt_id), y1[g.prompt_id]) for g in y2)

    for k in range(4):
        assert rd.has("judgments" if k == 0 else f"judgments_{k}")
    # every step was judged as an answer to x, not to the refinement prompt it answered
    assert len(second.judged) == 4 * 3 and all(g.messages == X_of(rd, g.prompt_id) for g in second.judged)
    assert sorted(g.text.count("+") for g in second.judged) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    pairs = [json.loads(line) for line in rd.file("pairs").read_text().splitlines()]
    assert sorted(p["meta"]["kind"] for p in pairs) == ["direct"] * 3 + ["refine"] * 3
    for p in pairs:  # the judge prefers more refinements: y3 over y0
        assert p["meta"]["steps"] == [3, 0] and p["chosen"].endswith("+ + +") and p["rejected"].startswith("answer to")
        assert p["weight"] == (1.0 if p["meta"]["kind"] == "direct" else 0.5)
    metrics = rd.metrics("pairs")
    assert [metrics[f"evolve/score_step_{k}"] for k in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert metrics["evolve/refine_gain"] == 3.0 and metrics["evolve/improved_share"] == 1.0
    assert rd.metrics("refine_2")["refine/2/responses"] == 3 and "judge/refine_3/score_mean" in rd.metrics("judgments_3")
    assert again.store.round_state(1)["status"] == "done"


def X_of(rd, prompt_id):
    from orchestrator.types import Prompt

    return next(p.messages for p in rd.read("prompts", Prompt) if p.id == prompt_id)

