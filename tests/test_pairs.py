from orchestrator.chat import user
from orchestrator.pairs import best_vs_worst, pair_metrics
from orchestrator.types import Generation, Judgment


def make(scores_by_prompt):
    gens, judgments = [], []
    for pid, scores in scores_by_prompt.items():
        for i, s in enumerate(scores):
            gens.append(Generation(prompt_id=pid, messages=user(f"q {pid}"), index=i, text=f"{pid}-{i}" + "x" * i, num_tokens=i + 1))
            judgments.append(Judgment(prompt_id=pid, index=i, score=s, samples=[s]))
    return gens, judgments


def test_highest_vs_lowest_and_ties_dropped():
    gens, judgments = make({"a": [3.0, 4.5, 1.0, 2.0], "b": [2.0, 2.0, 2.0, 2.0], "c": [None, 3.0, None, None], "d": [1.0, None, 5.0, 5.0]})
    pairs, dropped = best_vs_worst(gens, judgments)
    by = {p.prompt_id: p for p in pairs}
    assert set(by) == {"a", "d"}
    assert (by["a"].chosen, by["a"].rejected) == ("a-1x", "a-2xx")
    assert (by["a"].chosen_score, by["a"].rejected_score) == (4.5, 1.0)
    assert by["a"].messages == user("q a")
    # equal best scores: the earliest sample is chosen
    assert by["d"].chosen_index == 2 and by["d"].rejected_index == 0
    assert dropped == {"tie": 1, "too_few_scored": 1}
    m = pair_metrics(pairs, dropped, num_prompts=4)
    assert m["pairs/kept"] == 2 and m["pairs/kept_rate"] == 0.5
    assert m["pairs/dropped_tie"] == 1
    assert m["pairs/chosen_score_mean"] == (4.5 + 5.0) / 2
    assert m["pairs/score_gap_mean"] == ((4.5 - 1.0) + (5.0 - 1.0)) / 2


def test_pair_keeps_a_multi_turn_prompt():
    turns = [{"role": "system", "content": "Be kind."}, *user("x"), {"role": "assistant", "content": "y0"}, *user("Refine.")]
    gens = [Generation(prompt_id="m", messages=turns, index=i, text=f"answer {i}", num_tokens=2) for i in range(2)]
    judgments = [Judgment(prompt_id="m", index=i, score=float(i), samples=[float(i)]) for i in range(2)]
    (pair,), _ = best_vs_worst(gens, judgments)
    assert pair.messages == turns and (pair.chosen, pair.rejected) == ("answer 1", "answer 0")
