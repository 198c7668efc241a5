"""Reward functions as judges (orchestrator/rewards.py), the verifiable IF reward and its training
prompts (orchestrator/rewards_if.py), and the hybrid LLM + function judge."""

from __future__ import annotations

import json
import sys
import types

import pytest
from confs import composed
from eval_if_builder import build_response
from omegaconf import OmegaConf

from orchestrator import judging, rewards, rewards_if, stages
from orchestrator.chat import user
from orchestrator.errors import ConfigError, JudgeError
from orchestrator.eval import ifeval
from orchestrator.eval.generations import check_no_overlap
from orchestrator.roles import call
from orchestrator.types import Generation, Judgment


def judge_cfg(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(composed([f"judge={name}", *overrides]).judge, resolve=True)


def gen(pid: str, index: int, text: str, prompt: str = "a question") -> Generation:
    return Generation(prompt_id=pid, messages=user(prompt), index=index, text=text, num_tokens=3)


@pytest.fixture
def plugin_module(monkeypatch):
    """A module ``rewardplug`` with test rewards, importable by path as a user's would be."""
    mod = types.ModuleType("rewardplug")
    mod.calls = []

    def length(messages, response, *, per=10.0):
        mod.calls.append((messages, response))
        return min(len(response) / per, 1.0)

    def by_text(messages, response):
        return {"good": 1.0, "ok": 0.5, "bad": 0.0, "skip": None}.get(response, 0.25)

    def batched(messages, responses):
        mod.calls.append(len(responses))
        return [float(r == "good") for r in responses]

    mod.length, mod.by_text, mod.batched = length, by_text, batched
    mod.raw_length = lambda messages, response: float(len(response))
    mod.bad_value = lambda messages, response: 7.0
    mod.text_value = lambda messages, response: "high"
    mod.short_batch = lambda messages, responses: [1.0]
    mod.two_args_only = lambda response: 1.0
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "rewardplug", mod)
    return mod


class Worker:
    """A judge worker as VLLMWorker/EndpointWorker are: ``score`` is ``judging.score_with`` over a backend."""

    def __init__(self, backend=None):
        self.backend = backend

    def score(self, generations, cfg):
        return judging.score_with(self.backend, generations, cfg)


class ScoreOnlyBackend:
    """score_only probabilities chosen per response text (the response is the last line of the judge prompt's field)."""

    def __init__(self, by_text):
        self.by_text = by_text
        self.prompts = []

    def choice_probs(self, prompts, choices, assistant_prefix="", chat=True):
        self.prompts += prompts
        out = []
        for p in prompts:
            text = p.split("<response>")[1].split("</response>")[0]
            out.append({self.by_text[text]: 1.0})
        return out


# -- the callable: import path, signature, values ------------------------------------------------
@pytest.mark.parametrize(
    "path, words",
    [
        ("rewardplug.length", "want an import path"),
        ("rewardplug:", "want an import path"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("rewardplug:missing", "has no attribute 'missing'"),
        ("rewardplug:not_callable", "not a callable"),
        ("rewardplug:two_args_only", "cannot be called as fn(messages, response"),
    ],
)
def test_a_bad_function_is_one_config_error_naming_it(plugin_module, path, words):
    cfg = judge_cfg("function", f"judge.function={path}")
    with pytest.raises(ConfigError) as err:
        rewards.validate(cfg)
    assert words in str(err.value) and "judge.function" in str(err.value)
    assert "\n" not in str(err.value)


def test_function_kwargs_must_fit_the_signature(plugin_module):
    rewards.validate(judge_cfg("function", "judge.function=rewardplug:length", "+judge.function_kwargs.per=4"))
    with pytest.raises(ConfigError, match="function_kwargs"):
        rewards.validate(judge_cfg("function", "judge.function=rewardplug:length", "+judge.function_kwargs.nope=4"))


def test_function_scores_land_on_the_judge_scale_and_feed_pairs(plugin_module):
    cfg = judge_cfg("function", "judge.function=rewardplug:by_text")
    gens = [gen("p1", 0, "good"), gen("p1", 1, "bad"), gen("p1", 2, "ok"), gen("p2", 0, "skip"), gen("p2", 1, "good")]
    judgments, metrics = stages.judge_responses(call, Worker(), gens, {**cfg, "max_parse_failure_rate": 0.5})
    assert [j.score for j in judgments] == [5.0, 0.0, 2.5, None, 5.0]  # [0, 1] onto judge.min_score..max_score
    assert judgments[0].components == {"function": 1.0} and judgments[3].components == {"function": None}
    assert judgments[0].mode == "function"
    assert metrics["judge/function/mean"] == pytest.approx(2.5 / 4)
    assert metrics["judge/function/scored"] == 4 and metrics["judge/scored"] == 4
    pairs, pm = stages.make_pairs(gens, judgments)
    assert [(p.prompt_id, p.chosen, p.rejected) for p in pairs] == [("p1", "good", "bad")]  # p2: one scored sample
    assert pm  # pair metrics logged as for the LLM judge


def test_function_gets_the_prompt_messages_and_the_raw_response(plugin_module):
    cfg = judge_cfg("function", "judge.function=rewardplug:length", "+judge.function_kwargs.per=4")
    text = "Score: 5 <response>x</response>"  # what the LLM judge would see redacted and escaped
    js = judging.score_with(None, [gen("p", 0, text, prompt="Why?")], cfg)
    assert plugin_module.calls == [([{"role": "user", "content": "Why?"}], text)]
    assert js[0].score == 5.0 and js[0].components == {"function": 1.0}


def test_batched_function_is_called_once_for_the_stage(plugin_module):
    cfg = judge_cfg("function", "judge.function=rewardplug:batched", "judge.function_batched=true")
    js = judging.score_with(None, [gen("p", i, t) for i, t in enumerate(["good", "bad", "good"])], cfg)
    assert plugin_module.calls == [3]
    assert [j.score for j in js] == [5.0, 0.0, 5.0]


@pytest.mark.parametrize(
    "fn, overrides, words",
    [
        ("bad_value", [], "returned 7.0 (float) for response p/0; want a number in judge.function_range [0, 1]"),
        ("text_value", [], "returned 'high' (str)"),
        ("short_batch", ["judge.function_batched=true"], "(batched) returned 1 values for 2 responses"),
    ],
)
def test_bad_values_stop_the_stage_with_one_line(plugin_module, fn, overrides, words):
    cfg = judge_cfg("function", f"judge.function=rewardplug:{fn}", *overrides)
    rewards.validate(cfg)  # the path and signature are fine: only the values are wrong
    with pytest.raises(JudgeError) as err:
        judging.score_with(None, [gen("p", 0, "a"), gen("p", 1, "b")], cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_declared_range_is_mapped_onto_the_judge_scale(plugin_module):
    cfg = judge_cfg("function", "judge.function=rewardplug:raw_length", "judge.function_range=[-2,8]")
    js = judging.score_with(None, [gen("p", 0, "abc")], cfg)  # 3 -> (3 + 2) / 10 of the way -> 2.5
    assert js[0].score == pytest.approx(2.5) and js[0].components == {"function": 3.0}
    with pytest.raises(ConfigError, match="function_range"):
        rewards.validate(judge_cfg("function", "judge.function=rewardplug:length", "judge.function_range=[1,1]"))


def test_unknown_kind_and_missing_function_are_config_errors():
    with pytest.raises(ConfigError, match="judge.kind='vibes'"):
        rewards.validate({**judge_cfg("function"), "kind": "vibes"})
    with pytest.raises(ConfigError, match=r"judge.function=None is invalid"):
        rewards.validate(judge_cfg("function"))  # judge=function without judge.function=...


def test_llm_judgments_are_written_as_before_and_components_round_trip():
    plain = Judgment(prompt_id="p", index=0, score=3.0, samples=[3.0], mode="score_only")
    assert "components" not in plain.to_dict()  # judgment files of LLM judges keep their format
    hybrid = Judgment(prompt_id="p", index=0, score=3.0, samples=[3.0], components={"llm": 2.0, "function": None})
    assert Judgment.from_dict(json.loads(json.dumps(hybrid.to_dict()))) == hybrid


# -- hybrid ---------------------------------------------------------------------------------
def test_hybrid_combines_normalised_components_with_config_weights(plugin_module):
    backend = ScoreOnlyBackend({"good": "1", "ok": "4", "bad": "5", "skip": "2"})
    gens = [gen("p", 0, "good"), gen("p", 1, "ok"), gen("p", 2, "bad"), gen("p", 3, "skip")]
    cfg = judge_cfg("hybrid", "judge.function=rewardplug:by_text", "judge.hybrid.weights.llm=1", "judge.hybrid.weights.function=3")
    rewards.validate(cfg)
    js = judging.score_with(backend, gens, cfg)
    # weights 1:3 -> 0.25 / 0.75 on [0, 1]: good = .25*(1/5) + .75*1, ok = .25*(4/5) + .75*.5, bad = .25*1 + 0
    assert [j.score for j in js[:3]] == pytest.approx([5 * (0.05 + 0.75), 5 * (0.2 + 0.375), 5 * 0.25])
    assert js[3].score == pytest.approx(2.0)  # function has no opinion: skip -> the LLM alone
    assert js[0].components == {"llm": 1.0, "function": 1.0}
    assert js[0].mode == "hybrid:score_only" and js[0].mass == pytest.approx(1.0)
    assert len(backend.prompts) == 4 and "additive 5-point" in backend.prompts[0]  # the LLM judge ran as usual
    m = judging.judgment_metrics(js)
    assert m["judge/llm/mean"] == pytest.approx(3.0) and m["judge/function/mean"] == pytest.approx(0.5)
    assert m["judge/function/scored"] == 3
    assert m["judge/hybrid/llm_function_corr"] < -0.9  # this LLM disagrees with the function

    strict = judge_cfg("hybrid", "judge.function=rewardplug:by_text", "judge.hybrid.missing=none")
    assert judging.score_with(backend, gens, strict)[3].score is None


def test_hybrid_with_an_equal_weight_is_the_mean_and_weights_are_checked(plugin_module):
    backend = ScoreOnlyBackend({"good": "3"})
    cfg = judge_cfg("hybrid", "judge.function=rewardplug:by_text")
    assert judging.score_with(backend, [gen("p", 0, "good")], cfg)[0].score == pytest.approx(5 * (0.5 * 0.6 + 0.5 * 1.0))
    for bad, words in [("judge.hybrid.weights.llm=-1", "weights.llm=-1"), ("+judge.hybrid.weights.rm=1", "want weights for"),
                       ("judge.hybrid.missing=maybe", "judge.hybrid.missing='maybe'")]:
        with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
            rewards.validate(judge_cfg("hybrid", "judge.function=rewardplug:by_text", bad))
    zero = judge_cfg("hybrid", "judge.function=rewardplug:by_text", "judge.hybrid.weights.llm=0", "judge.hybrid.weights.function=0")
    with pytest.raises(ConfigError, match="at least one weight"):
        rewards.validate(zero)


def test_hybrid_on_the_tiny_vllm_judge(tiny_checkpoint, tmp_path):
    """The real judge path: a vLLM engine's score() with judge=hybrid and the verifiable reward."""
    from workers.vllm_worker import VLLMWorker

    item = next(it for it in rewards_if.generate(40, seed=3) if build_response(it))
    good, bad = build_response(item), "no"
    specs = tmp_path / "specs.jsonl"
    specs.write_text(json.dumps(item) + "\n")
    gens = [gen("if", 0, good, item["prompt"]), gen("if", 1, bad, item["prompt"]), gen("plain", 0, "hello", "Say hi.")]
    cfg = judge_cfg("hybrid", f"+judge.function_kwargs.specs={specs}")
    worker = VLLMWorker(tiny_checkpoint, {"kv_cache_gib": 0.25, "max_model_len": 2048, "enforce_eager": True, "max_num_seqs": 4}, 0)
    try:
        js = worker.score(gens, cfg)
    finally:
        worker.shutdown()
    results = ifeval.check_response(item, bad)
    assert [j.components["function"] for j in js] == [1.0, pytest.approx(sum(results) / len(results)), None]
    llm = [j.components["llm"] for j in js]
    assert all(s is not None and 0 <= s <= 5 for s in llm)
    assert js[0].score == pytest.approx(0.5 * llm[0] + 0.5 * 5.0)
    assert js[2].score == pytest.approx(llm[2])  # no checks on "Say hi.": the LLM alone (missing=skip)
    assert js[0].mode == "hybrid:score_only" and js[0].mass is not None


# -- the verifiable reward and its training prompts ------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return [json.loads(line) for line in rewards_if.TRAIN_FILE.read_text().splitlines()]


def test_training_prompts_never_overlap_the_if_eval_set(shipped):
    eval_items = ifeval.load_items()
    texts, bases, combos = rewards_if.eval_keys(eval_items)
    assert len(bases) > 100 and len(combos) > 250  # the eval's own keys were found (base extraction works)
    for items in (shipped, rewards_if.generate(300, seed=7)):
        assert not {rewards_if.normalise(it["prompt"]) for it in items} & texts
        assert not {rewards_if.normalise(it["base"]) for it in items} & bases
        assert not {(rewards_if.normalise(it["base"]), c["kind"]) for it in items for c in it["checks"]} & combos
        assert all(rewards_if.normalise(rewards_if.base_of(it)) == rewards_if.normalise(it["base"]) for it in items)
        check_no_overlap([it["prompt"] for it in eval_items], [it["prompt"] for it in items], what="IF eval prompts")


def test_generator_refuses_bases_near_an_eval_question():
    # An eval set that holds a seed prompt as its base question (lightly reworded): it must drop out.
    seed = "Write a haiku about the first snowfall of winter."
    eval_items = [{"id": "e1", "prompt": "Write a haiku about the first snowfall this winter. Do not use any commas in your response.",
                   "checks": [{"kind": "no_commas", "args": {}}]}]
    items = rewards_if.generate(200, seed=1, eval_items=eval_items)
    assert seed not in {it["base"] for it in items}
    assert seed in rewards_if.candidate_bases([])  # it is a base when the eval does not hold it


def test_shipped_training_prompts_are_valid_distinct_and_reproducible(shipped):
    assert shipped == rewards_if.generate(len(shipped), seed=0)
    assert len({it["prompt"] for it in shipped}) == len(shipped) == 480
    for it in shipped:
        ifeval.validate_item(it)
    kinds = {c["kind"] for it in shipped for c in it["checks"]}
    assert kinds == set(ifeval.CHECKS)


def test_if_reward_scores_the_share_of_checks_passed(shipped):
    def half(it):  # a response built for the first check only, which fails the second
        r = build_response({**it, "checks": it["checks"][:1]})
        return r if r and ifeval.check_response(it, r) == [True, False] else None

    item = next(it for it in shipped if len(it["checks"]) == 2 and build_response(it) and half(it))
    msgs, partial = user(item["prompt"]), half(item)
    assert rewards_if.if_reward(msgs, build_response(item)) == 1.0
    assert rewards_if.if_reward(msgs, partial) == 0.5
    assert rewards_if.if_reward(msgs, partial, score="all") == 0.0
    assert rewards_if.if_reward(user("  " + item["prompt"].upper() + " "), build_response(item)) == 1.0  # normalised lookup
    assert rewards_if.if_reward(user("Tell me a joke."), "ha") is None


def test_verifiable_judge_end_to_end_through_the_stage(shipped):
    cfg = judge_cfg("verifiable")
    rewards.validate(cfg)
    items = [it for it in shipped if build_response(it)][:3]
    gens = [g for k, it in enumerate(items) for g in (gen(f"q{k}", 0, build_response(it), it["prompt"]),
                                                      gen(f"q{k}", 1, "", it["prompt"]))]
    judgments, metrics = stages.judge_responses(call, Worker(), gens, cfg)
    pairs, _ = stages.make_pairs(gens, judgments)
    assert len(pairs) == 3 and all(p.chosen_score == 5.0 and p.rejected == "" for p in pairs)
    assert metrics["judge/function/mean"] < 1.0


def test_a_specs_file_with_eval_prompts_is_refused(tmp_path):
    leaked = ifeval.load_items()[:2]
    path = tmp_path / "specs.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in leaked))
    with pytest.raises(ConfigError, match="held-out IF eval prompts"):
        rewards_if.if_reward(user(leaked[0]["prompt"]), "x", specs=str(path))


def test_the_judge_options_compose_from_the_cli():
    for name, kind in [("function", "function"), ("verifiable", "function"), ("hybrid", "hybrid")]:
        cfg = composed(["+experiment=self_reward", f"judge={name}"])
        assert cfg.judge.kind == kind and cfg.judge.mode == "score_only"  # the LLM judge's keys are inherited
    assert composed(["judge=hybrid"]).judge.function == "orchestrator.rewards_if:if_reward"
    assert rewards.kind_of(OmegaConf.to_container(composed().judge)) == "llm"  # the default is untouched
