"""IF checkers on hand-made positive and negative examples, and the shipped prompt set."""

from __future__ import annotations

import json

import pytest

from orchestrator.eval import ifeval

from eval_if_builder import build_response

# kind -> (args, passing responses, failing responses)
CASES = {
    "word_count": [
        ({"at_least": 5}, ["one two three four five", "It's a well-known fact, really."], ["one two three four", ""]),
        ({"at_most": 3}, ["one two three", "Hi!"], ["one two three four"]),
        ({"at_least": 2, "at_most": 3}, ["a b", "a b c"], ["a", "a b c d"]),
    ],
    "sentence_count": [
        ({"at_least": 3}, ["One. Two! Three?", "First line\nSecond line\nThird line"], ["One. Two.", "Dr. Smith arrived. He sat."]),
        ({"at_most": 2}, ["One. Two.", "P.S. Keep it short."], ["One. Two. Three."]),
    ],
    "paragraph_count": [
        ({"n": 2}, ["First para.\n\nSecond para.", "First.\n***\nSecond.", "First.\n\n* * *\n\nSecond."], ["Only one.", "A\n\nB\n\nC", "A\nB"]),
    ],
    "include_keywords": [
        ({"keywords": ["garden", "Rain"]}, ["The GARDEN needs rain.", "rain, then garden"], ["The gardens need rain.", "garden only"]),
    ],
    "exclude_keywords": [
        ({"keywords": ["sun"]}, ["It was a bright Sunday.", "Clouds all day."], ["The Sun was out.", "sun-dried", ""]),
    ],
    "keyword_frequency": [
        ({"keyword": "tea", "at_least": 2}, ["Tea is nice. I like tea."], ["Tea once. Teas do not count."]),
        ({"keyword": "tea", "at_most": 1}, ["Tea once.", "No hot drinks."], ["tea and tea"]),
    ],
    "letter_frequency": [
        ({"letter": "z", "at_least": 2}, ["Zebras zoom."], ["A zebra."]),
        ({"letter": "q", "at_most": 0}, ["No such letter here."], ["A quick question."]),
    ],
    "bullet_count": [
        ({"n": 2}, ["Intro:\n* one\n* two", "- a\n- b\n***"], ["* one\n* two\n* three", "* one", "*one*\n*two*"]),
    ],
    "json_format": [
        ({}, ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', ' {"answer": "yes"} '], ['{"a": 1', "[1, 2]", "answer: yes"]),
    ],
    "lowercase": [({}, ["all lowercase here.", "p.s. fine"], ["Not lowercase.", "123"])],
    "uppercase": [({}, ["ALL CAPS HERE.", "CAPS, 123!"], ["ALL CAPS But one.", "..."])],
    "capital_words": [
        ({"at_least": 2}, ["This is VERY IMPORTANT."], ["Only ONE word. A single letter I."]),
        ({"at_most": 1}, ["One CAPS word.", "none here"], ["TWO CAPS words AGAIN"]),
    ],
    "start_phrase": [
        ({"phrase": "Here is my answer"}, ["Here is my answer: yes.", "  here is my answer"], ["Well, here is my answer", "Here is an answer"]),
    ],
    "end_phrase": [
        ({"phrase": "Is there anything else I can help with?"}, ["Done. Is there anything else I can help with?", "is there anything else i can help with?\n"], ["Is there anything else I can help with? Bye.", "Anything else?"]),
    ],
    "title": [({}, ["<<A Title>>\nBody.", "Body <<t>>"], ["<< >>\nBody", "No title", "<A Title>"])],
    "highlight_count": [
        ({"at_least": 2}, ["*one* and *two*", "**bold** and *it*", "* bullet with *a* and *b*"], ["*one* only", "* a\n* b", "2 * 3 * 4", "** **"]),
    ],
    "placeholder_count": [
        ({"at_least": 2}, ["Dear [name], at [address]."], ["Dear [name].", "Empty [] and [ ]"]),
    ],
    "postscript": [
        ({"marker": "P.S."}, ["Hello.\nP.S. See you.", "hello\n\np.s. bye"], ["Hello. P.S. inline", "Hello.\nP.S.", "No postscript."]),
    ],
    "no_commas": [({}, ["No commas here."], ["One, two.", "", "full-width\uff0ccomma"])],
    "quotation": [({}, ['"Quoted answer."', "\u201cCurly quoted.\u201d"], ['"Unclosed', "Plain", '""'])],
    "section_count": [
        ({"n": 2}, ["SECTION 1\nIntro.\nSECTION 2\nMore.", '"SECTION 1 a SECTION 2 b"'], ["SECTION 1\nOnly one.", "SECTION 1\na\nSECTION 3\nb", "SECTION 1\nSECTION 2\nb", "Section 1 a Section 2 b"]),
    ],
    "ascii_only": [({}, ["Plain ASCII text."], ["Caf\u00e9", "Smile \U0001F600", ""])],
}


def test_every_kind_has_cases_and_there_are_at_least_15_kinds():
    assert set(CASES) == set(ifeval.CHECKS)
    assert len(ifeval.CHECKS) >= 15


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_positive_and_negative(kind):
    for args, good, bad in CASES[kind]:
        ifeval.validate_check(kind, args)
        for text in good:
            assert ifeval.run_check(kind, args, text), f"{kind}{args} should pass {text!r}"
        for text in bad:
            assert not ifeval.run_check(kind, args, text), f"{kind}{args} should fail {text!r}"


@pytest.mark.parametrize(
    "kind,args",
    [
        ("nope", {}),
        ("word_count", {}),
        ("word_count", {"at_least": 5, "at_most": 2}),
        ("word_count", {"at_least": -1}),
        ("word_count", {"minimum": 3}),
        ("paragraph_count", {"n": 0}),
        ("include_keywords", {"keywords": []}),
        ("include_keywords", {"keywords": "garden"}),
        ("letter_frequency", {"letter": "ab", "at_least": 1}),
        ("start_phrase", {"phrase": " "}),
        ("title", {"x": 1}),
    ],
)
def test_invalid_check_args_are_refused(kind, args):
    with pytest.raises(ValueError):
        ifeval.validate_check(kind, args)


def test_validate_item_refuses_incompatible_and_unstated_checks():
    lower = {"kind": "lowercase", "args": {}}
    upper = {"kind": "uppercase", "args": {}}
    text = "Write. " + ifeval.describe("lowercase", {})[0] + " " + ifeval.describe("uppercase", {})[0]
    with pytest.raises(ValueError, match="cannot be satisfied together"):
        ifeval.validate_item({"id": "x", "prompt": text, "checks": [lower, upper]})
    with pytest.raises(ValueError, match="does not state"):
        ifeval.validate_item({"id": "x", "prompt": "Write something.", "checks": [lower]})
    both = [{"kind": "include_keywords", "args": {"keywords": ["tea"]}}, {"kind": "exclude_keywords", "args": {"keywords": ["Tea"]}}]
    prompt = "Go. " + " ".join(ifeval.describe(c["kind"], c["args"])[0] for c in both)
    with pytest.raises(ValueError, match="both required and forbidden"):
        ifeval.validate_item({"id": "x", "prompt": prompt, "checks": both})


def test_shipped_set_loads_and_is_large_and_varied():
    items = ifeval.load_items()
    assert len(items) >= 150
    kinds = {c["kind"] for it in items for c in it["checks"]}
    assert len(kinds) >= 15
    assert all(1 <= len(it["checks"]) <= 3 for it in items)
    assert len({it["id"] for it in items}) == len(items)
    assert len({it["prompt"] for it in items}) == len(items)
    for it in items:  # every check's args are valid and its instruction is stated in the prompt
        ifeval.validate_item(it)
    assert ifeval.load_items(max_prompts=10) == items[:10]


def test_every_shipped_prompt_is_satisfiable():
    """A constructed response passes all checks of each prompt, so the instructions are compatible."""
    for it in ifeval.load_items():
        response = build_response(it)
        assert response is not None, f"{it['id']} could not be satisfied: {it['checks']}"


def test_evaluate_if_strict_and_loose():
    items = [
        {"id": "a", "prompt": "p", "checks": [{"kind": "lowercase", "args": {}}, {"kind": "no_commas", "args": {}}]},
        {"id": "b", "prompt": "p", "checks": [{"kind": "end_phrase", "args": {"phrase": "bye"}}]},
        {"id": "c", "prompt": "p", "checks": [{"kind": "title", "args": {}}]},
    ]
    responses = {"a": "all good here", "b": "ok bye\nSure, I hope that helps.", "c": None}
    m = ifeval.evaluate_if(responses, items)
    assert m["if/prompts"] == 3
    assert m["if/prompt_accuracy"] == pytest.approx(1 / 3)
    assert m["if/check_accuracy"] == pytest.approx(2 / 4)
    assert m["if/kind/lowercase"] == 1.0 and m["if/kind/end_phrase"] == 0.0
    loose = ifeval.evaluate_if(responses, items, loose=True)
    assert loose["if_loose/prompt_accuracy"] == pytest.approx(2 / 3)  # the last line removed ends with "bye"
    assert ifeval.evaluate_if({}, items) == {"if/prompts": 0.0}


def test_data_file_is_jsonl_with_expected_fields():
    with open(ifeval.DATA_FILE, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            assert set(obj) == {"id", "prompt", "checks"}
            assert obj["id"].startswith("if-")


def test_paired_delta_and_its_bootstrap_se():
    now, start = [True, True, False, False] * 25, [False, True, False, False] * 25
    delta, se = ifeval.paired_delta(now, start)
    assert delta == pytest.approx(0.25)
    # The paired SE is sd(now - start) / sqrt(n): 0.433 / 10 here.
    assert se == pytest.approx(0.0433, rel=0.1)
    # Unpaired, the two accuracies' own SEs would add to ~0.094: pairing is what makes it tight.
    assert ifeval.paired_delta(start, start) == (0.0, 0.0)
    with pytest.raises(ValueError):
        ifeval.paired_delta(now, start[:-1])

