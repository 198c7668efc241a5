import math

import pytest
from confs import section

from orchestrator import judging
from orchestrator.chat import user
from orchestrator.types import Completion, Generation

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    *user("What is rain?"),
    {"role": "assistant", "content": "Water."},
    *user("Refine your answer."),
]


def gen(pid="p1", index=0, text="an answer", messages=None):
    return Generation(prompt_id=pid, messages=messages or user("a question"), index=index, text=text, num_tokens=3)


class RecordingJudge:
    """A backend that records the prompts and requests it gets; every sample says ``Score: 4``."""

    def __init__(self):
        self.prompts, self.requests, self.prefix = [], [], None

    def generate(self, request):
        self.requests.append(request)
        self.prompts += [m[-1]["content"] for m in request.prompts]
        n = request.n
        return [Completion(texts=["Score: 4"] * n, num_tokens=[2] * n, finish_reasons=["stop"] * n) for _ in request.prompts]

    def choice_probs(self, prompts, choices, assistant_prefix="", chat=True):
        self.prompts += prompts
        self.prefix = assistant_prefix
        return [{"3": 1.0} for _ in prompts]


def test_prompt_holds_question_response_and_rubric():
    text = judging.judge_prompt(user("What is 2+2?"), "It is 4.")
    assert "User: What is 2+2?" in text
    assert "<response>It is 4.</response>" in text
    assert "additive 5-point scoring system" in text
    assert 'Score: <total points>' in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is relevant. Score: 4", 4.0),
        ("score: 3.5", 3.5),
        ("Score: 2 ... on reflection Score: 5", 5.0),  # the conclusion is the last one
        ("Score:3", 3.0),
        ("I would give it four points.", None),
        ("Score: 7", None),  # outside 0..5
        ("", None),
    ],
)
def test_parse_score(text, expected):
    assert judging.parse_score(text) == expected


def test_text_judgments_average_parsed_samples_and_keep_failures_visible():
    gens = [gen(index=0), gen(index=1)]
    outputs = [["Score: 4", "nonsense", "Score: 2"], ["no score", "still none", "nope"]]
    j0, j1 = judging.text_judgments(gens, outputs, 0, 5)
    assert j0.score == pytest.approx(3.0)
    assert j0.samples == [4.0, None, 2.0]
    assert j1.score is None  # never silently 0
    m = judging.judgment_metrics([j0, j1])
    assert m["judge/parse_rate"] == 0.5
    assert m["judge/sample_parse_failures"] == 4
    assert m["judge/sample_parse_failure_rate"] == pytest.approx(4 / 6)
    assert m["judge/score_mean"] == pytest.approx(3.0)


def test_expected_score_is_probability_weighted_mean():
    probs = {"0": 0.0, "1": 0.1, "2": 0.2, "3": 0.3, "4": 0.4, "5": 0.0}
    assert judging.expected_score(probs) == pytest.approx(0.1 + 0.4 + 0.9 + 1.6)
    # unnormalised input is renormalised
    assert judging.expected_score({"1": 2.0, "3": 2.0}) == pytest.approx(2.0)
    assert judging.expected_score(None) is None
    assert judging.expected_score({"1": 0.0}) is None


def test_score_only_judgments():
    js = judging.score_only_judgments([gen(index=0), gen(index=1)], [{"4": 1.0}, None])
    assert js[0].score == 4.0 and js[0].mode == "score_only"
    assert js[1].score is None
    assert judging.score_choices(0, 5) == ["0", "1", "2", "3", "4", "5"]
    assert not any(math.isnan(v) for v in judging.judgment_metrics(js).values())


def test_single_turn_judge_prompt_is_the_papers():
    judge = RecordingJudge()
    (j,) = judging.score_with(judge, [gen()], section("judge", mode="score_only"))
    assert judge.prompts == [judging.JUDGE_PROMPT.format(prompt="a question", response="an answer")]
    assert judge.prefix == judging.SCORE_PREFIX and j.score == 3.0


def test_multi_turn_judge_prompt_shows_the_conversation():
    judge = RecordingJudge()
    judging.score_with(judge, [gen(messages=MULTI_TURN)], section("judge", mode="score_only"))
    (prompt,) = judge.prompts
    assert "User: System" not in prompt
    assert "\n\nSystem: Be brief.\n\nUser: What is rain?\n\nAssistant: Water.\n\nUser: Refine your answer.\n\n<response>an answer</response>" in prompt


def test_text_mode_reads_the_judge_section():
    judge = RecordingJudge()
    cfg = section("judge", mode="text", samples=2, temperature=0.3, top_p=0.8, max_tokens=17)
    (j,) = judging.score_with(judge, [gen()], cfg)
    (request,) = judge.requests
    assert (request.n, request.temperature, request.top_p, request.max_tokens) == (2, 0.3, 0.8, 17)
    assert request.chat and j.samples == [4.0, 4.0] and j.score == 4.0


@pytest.mark.parametrize("missing", ["samples", "mode", "min_score"])
def test_incomplete_judge_section_names_the_key(missing):
    cfg = section("judge", mode="text")
    del cfg[missing]
    with pytest.raises(KeyError, match=f"judge.{missing} missing"):
        judging.score_with(RecordingJudge(), [gen()], cfg)
