"""The prompt loader and the shipped seed / eval prompt sets."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.chat import user
from orchestrator.data import eval_prompts_path, load_prompts, seed_prompts_path
from orchestrator.errors import ConfigError
from orchestrator.types import Prompt

CATEGORIES = {"writing", "advice", "coding", "maths", "facts", "reasoning"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def expect_error(path: str | Path, *fragments: str, what: str = "data.prompts") -> str:
    with pytest.raises(ConfigError) as info:
        load_prompts(path, what=what)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{what}="), msg
    assert str(Path(path)) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# -- loader: good files ------------------------------------------------------------------
def test_load_prompt_and_text_keys_with_generated_ids(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"prompt": "  Say hello.  "}),
            "",
            json.dumps({"text": "Count to three.", "category": "maths"}),
            json.dumps({"id": "x1", "prompt": "Name a colour.", "extra": 5}),
            "   ",
        ],
    )
    got = load_prompts(f)
    assert got == [
        Prompt(id="mine-1", messages=user("Say hello."), source="file", category=None),
        Prompt(id="mine-3", messages=user("Count to three."), source="file", category="maths"),
        Prompt(id="x1", messages=user("Name a colour."), source="file", category=None),
    ]


def test_load_accepts_str_path_and_integer_ids(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": 7, "prompt": "A?"}), json.dumps({"id": 8, "prompt": "B?"})])
    got = load_prompts(str(f))
    assert [p.id for p in got] == ["7", "8"]


def test_prompt_wins_over_text(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "P", "text": "T"})])
    assert load_prompts(f)[0].text == "P"


def test_messages_lines_keep_every_turn(tmp_path: Path) -> None:
    turns = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Water falling from clouds."},
        {"role": "user", "content": "Refine your answer."},
    ]
    f = write_lines(
        tmp_path / "chat.jsonl",
        [json.dumps({"id": "c1", "messages": turns, "category": "facts"}), json.dumps({"messages": turns[1:2]})],
    )
    got = load_prompts(f)
    assert got[0] == Prompt(id="c1", messages=turns, source="file", category="facts")
    assert got[0].text == "Refine your answer."  # the instruction is the last user turn
    assert got[1].messages == user("What is rain?") and got[1].id == "chat-2"


def test_none_loads_the_shipped_seed_set() -> None:
    got = load_prompts(None)
    assert len(got) >= 240
    assert all(p.source == "seed" for p in got)
    assert got == load_prompts(seed_prompts_path())


# -- loader: bad files -------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.jsonl", "not found")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    expect_error(tmp_path, "not a file")


def test_custom_what_is_named(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.jsonl", "not found", what="eval.prompts")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text(content, encoding="utf-8")
    expect_error(f, "no prompts")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), "", '{"prompt": "unterminated'])
    expect_error(f, "line 3", "not valid JSON")


def test_non_object_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps(["a", "list"])])
    expect_error(f, "line 1", "not a JSON object")


@pytest.mark.parametrize(
    "obj",
    [{"id": "a"}, {"prompt": ""}, {"prompt": "   "}, {"text": 12}, {"prompt": None}, {"question": "Why?"}],
)
def test_line_without_prompt_text(tmp_path: Path, obj: dict) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "fine"}), json.dumps(obj)])
    expect_error(f, "line 2", '"prompt"')


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ("What is rain?", "non-list"),
        ([], "non-empty list"),
        ([{"role": "bot", "content": "hi"}], "role 'bot'"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": "  "}], "content"),
        ([{"role": "user"}], "exactly"),
        ([{"role": "user", "content": "hi", "name": "x"}], "exactly"),
        (["hi"], "exactly"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "end with a user turn"),
    ],
)
def test_bad_messages_line(tmp_path: Path, messages, fragment: str) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "fine"}), json.dumps({"messages": messages})])
    expect_error(f, "line 2", '"messages"', fragment)


def test_messages_and_prompt_together(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "one", "messages": [{"role": "user", "content": "two"}]})])
    expect_error(f, "line 1", "both")


def test_duplicate_ids(tmp_path: Path) -> None:
    f = write_lines(
        tmp_path / "dup.jsonl",
        [json.dumps({"id": "a", "prompt": "one"}), json.dumps({"id": "b", "prompt": "two"}), json.dumps({"id": "a", "prompt": "three"})],
    )
    expect_error(f, "duplicate id 'a'", "lines 1 and 3")


def test_generated_id_colliding_with_explicit_id(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "p-2", "prompt": "one"}), json.dumps({"prompt": "two"})])
    expect_error(f, "duplicate id 'p-2'")


def test_bad_id_and_category_types(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": ["x"], "prompt": "one"})])
    expect_error(f, "line 1", '"id"')
    f = write_lines(tmp_path / "q.jsonl", [json.dumps({"prompt": "one", "category": 3})])
    expect_error(f, "line 1", '"category"')


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin.jsonl"
    f.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    expect_error(f, "UTF-8")


# -- the shipped sets --------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed() -> list[Prompt]:
    return load_prompts(seed_prompts_path())


@pytest.fixture(scope="module")
def evals() -> list[Prompt]:
    return load_prompts(eval_prompts_path(), what="eval.prompts")


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def rouge_l(a: list[str], b: list[str]) -> float:
    dp = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = dp[j]
            dp[j] = prev + 1 if x == y else max(dp[j], dp[j - 1])
            prev = cur
    lcs = dp[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def test_shipped_files_live_in_the_package() -> None:
    pkg = Path(__file__).resolve().parents[1] / "orchestrator" / "data"
    assert seed_prompts_path().resolve() == (pkg / "seed_prompts.jsonl").resolve()
    assert eval_prompts_path().resolve() == (pkg / "eval_prompts.jsonl").resolve()


def test_files_use_the_documented_schema() -> None:
    for path, prefix in ((seed_prompts_path(), "seed"), (eval_prompts_path(), "eval")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            obj = json.loads(line)
            assert set(obj) == {"id", "prompt", "category"}, (path.name, i)
            assert obj["id"] == f"{prefix}-{i:04d}"


def test_seed_set_size_and_categories(seed: list[Prompt]) -> None:
    assert len(seed) >= 240
    counts = Counter(p.category for p in seed)
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 35
    assert max(counts.values()) - min(counts.values()) <= 5, counts
    # Interleaved: the first prompts drawn in order already cover every category.
    assert {p.category for p in seed[:12]} == CATEGORIES


def test_eval_set_size_and_categories(evals: list[Prompt]) -> None:
    assert len(evals) == 120
    assert [p.id for p in evals] == [f"eval-{i:04d}" for i in range(1, 121)]
    counts = Counter(p.category for p in evals)
    assert set(counts) == CATEGORIES
    assert set(counts.values()) == {20}


def test_prompt_lengths_are_reasonable(seed: list[Prompt], evals: list[Prompt]) -> None:
    for p in seed + evals:
        words = len(p.text.split())
        assert 3 <= words <= 80, p
        assert p.text == p.text.strip()


def test_no_duplicates_within_each_set(seed: list[Prompt], evals: list[Prompt]) -> None:
    for prompts in (seed, evals):
        texts = [norm(p.text) for p in prompts]
        assert len(set(texts)) == len(texts)
        assert len({p.id for p in prompts}) == len(prompts)


def test_eval_is_disjoint_from_seed(seed: list[Prompt], evals: list[Prompt]) -> None:
    assert not {p.id for p in seed} & {p.id for p in evals}
    assert not {norm(p.text) for p in seed} & {norm(p.text) for p in evals}


def test_no_near_duplicates(seed: list[Prompt], evals: list[Prompt]) -> None:
    """ROUGE-L (the Self-Instruct filter's measure) stays below 0.7 for every pair, across and within sets."""
    toks = [(p.id, norm(p.text).split()) for p in seed + evals]
    worst = max(((rouge_l(a, b), ia, ib) for (ia, a), (ib, b) in itertools.combinations(toks, 2)), key=lambda t: t[0])
    assert worst[0] < 0.7, worst
