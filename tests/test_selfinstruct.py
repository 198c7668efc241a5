import random

import pytest
from confs import section

from orchestrator import stages
from orchestrator.chat import user
from orchestrator.selfinstruct import PromptFilter, clean_candidate, few_shot_prompt, pick_demos, rouge_l, tokens
from orchestrator.types import Completion


def test_rouge_l_known_values():
    assert rouge_l(tokens("the cat sat"), tokens("the cat sat")) == 1.0
    assert rouge_l(tokens("a b c d"), tokens("x y z")) == 0.0
    # LCS("a b c d", "a c d e") = 3 -> P = 3/4, R = 3/4
    assert rouge_l(list("abcd"), list("acde")) == pytest.approx(0.75)


def test_few_shot_prompt_numbers_tasks_and_ends_open():
    text = few_shot_prompt(["Write a poem.", "Explain\ngravity."])
    assert text.endswith("Task 3:")
    assert "Task 1: Write a poem.\n\nTask 2: Explain gravity.\n\n" in text


def test_pick_demos_mixes_seed_and_generated():
    rng = random.Random(0)
    seed = [f"s{i}" for i in range(20)]
    demos = pick_demos(rng, seed, ["g1", "g2", "g3"], 6, 2)
    assert len(demos) == 8 and sum(d.startswith("g") for d in demos) == 2
    # with no generated prompts yet, seed prompts fill all 8 slots (round 1)
    demos = pick_demos(rng, seed, [], 6, 2)
    assert len(demos) == 8 and all(d.startswith("s") for d in demos)


def test_clean_candidate_cuts_at_next_task():
    assert clean_candidate(" Describe a sunset.\n\nTask 10: something") == "Describe a sunset."
    assert clean_candidate("- Plan a trip. Task 3: more") == "Plan a trip."


def test_filter_reasons():
    f = PromptFilter(["Write a short poem about the sea"], rouge_l_max=0.7, min_words=3, max_words=20, banned=["image"])
    assert f.reason("Write a short poem about the sea today") == "similar"
    assert f.reason("Hi") == "length"
    assert f.reason("Describe this image in detail please") == "keyword"
    assert f.reason("?? what is this") == "format"
    assert f.reason("Explain\x07 how tides work") == "format"
    assert f.reason("List three uses of copper in homes") is None
    assert f.reason("list three uses of copper in homes") == "duplicate"


def test_self_instruct_stage_sends_raw_text_and_keeps_user_prompts():
    requests = []

    def call(worker, method, request):
        requests.append(request)
        texts = [" Describe how tides work.\n\nTask 9: x", "Hi", " List three uses of copper in homes."]
        return [Completion(texts=[t], num_tokens=[5], finish_reasons=["stop"]) for t in texts]

    cfg = {**section("data")["self_instruct"], "num_prompts": 2, "oversample": 2}
    seed = [f"Seed task number {i} about cooking" for i in range(10)]
    kept, metrics = stages.self_instruct(call, None, seed, [], seed, cfg, random.Random(0), 3)
    (request,) = requests
    assert request.chat is False and all(isinstance(p, str) and p.endswith("Task 9:") for p in request.prompts)
    assert [p.messages for p in kept] == [user("Describe how tides work."), user("List three uses of copper in homes.")]
    assert [p.id for p in kept] == ["si-r003-0001", "si-r003-0002"] and {p.source for p in kept} == {"self_instruct"}
    assert metrics["self_instruct/rejected_length"] == 1.0
