"""The UPO filter (algorithms.md 5) on planted noise, with a tiny real estimator.

Planted noise (tests/planted.py): 30% of 96 pairs have chosen and rejected swapped. The filter
trains its estimator on the round's judged pairs (the bootstrap adaptation: the labels it learns
from are the noisy ones), runs T = 10 MC-dropout passes and keeps the pairs it agrees with, then
samples easy / hard ones. Noise removed means: the flipped share among the kept pairs is far below
the 30% among all pairs and below the 1st percentile of keeping as many pairs at random.

Measured (data seeds 0, 1, 2; 2026-11-25): flipped 0.302 of 96 -> 0.000 of 37, 38 and 35 kept; the
random keep of as many pairs: mean 0.30, 1st percentile 0.14-0.16. The tests ask for <= 0.10 and
below that percentile; a filter run takes about 40 s here (estimator training and 10 MC passes).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import make_controller  # noqa: E402
from planted import flipped_share, planted_pairs, random_keep  # noqa: E402

from orchestrator import plugins  # noqa: E402
from orchestrator.controller import Round  # noqa: E402
from orchestrator.errors import ConfigError, OrchestratorError  # noqa: E402
from orchestrator.filters.upo import UPOFilter, epsilon_for, weighted_sample  # noqa: E402
from orchestrator import chat  # noqa: E402
from orchestrator.types import Pair  # noqa: E402

# A tiny random model learns the planted rule with these (tests/test_reward_model.py); dropout 0.1
# on both training and the MC passes; one thread (this machine has two, busy with other jobs).
TINY = [
    "filters=[upo]",
    # The bootstrapped setting (labels from the judged pairs: here the planted ones), refreshed each
    # round, every layer trained: the tiny model has 2 (the shipped seed pairs need a real model).
    "filter.upo.seed_pairs=null",
    "filter.upo.refresh=true",
    "filter.upo.estimator.train_layers=null",
    "filter.upo.estimator.eval_fraction=0.1",
    "filter.upo.estimator.learning_rate=5e-4",
    "filter.upo.estimator.warmup_ratio=0.0",
    "filter.upo.estimator.lr_scheduler=constant",
    "filter.upo.estimator.micro_batch_size=8",
    "filter.upo.estimator.max_length=512",
    "filter.upo.estimator.epochs=4",
    "filter.upo.estimator.min_examples=16",
    "filter.upo.estimator.threads=1",
]
N, FLIP = 96, 0.3


def run_filter(make, *overrides: str, pairs: list[Pair], index: int = 1) -> tuple[list[Pair], Round]:
    ctl = make(*TINY, *overrides)
    ctl.workers.in_process = True
    rnd = Round(ctl, index)
    made = rnd.stage("pairs", Pair, lambda: (pairs, {}))
    return plugins.filter_pairs(rnd, made), rnd


@pytest.fixture(scope="module")
def planted() -> list[Pair]:
    return planted_pairs(N, FLIP, seed=0)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, planted, tiny_checkpoint) -> tuple[list[Pair], Round]:
    run_dir = tmp_path_factory.mktemp("upo") / "run"

    def make(*overrides: str):
        return make_controller(tiny_checkpoint, run_dir, *overrides)

    return run_filter(make, "train.loss=upo", pairs=planted)


def test_upo_removes_planted_noise(filtered, planted):
    kept, rnd = filtered
    assert flipped_share(planted) == pytest.approx(FLIP, abs=0.01)
    baseline = random_keep(planted, len(kept))
    share = flipped_share(kept)
    print(f"\nUPO on planted noise: flipped {flipped_share(planted):.3f} of {len(planted)} -> {share:.3f} of {len(kept)} "
          f"kept; random keep of {len(kept)}: mean {baseline['mean']:.3f}, p01 {baseline['p01']:.3f}")
    # Measured 0.000 (module docstring); 0.10 leaves room for other seeds and CPUs.
    assert share <= 0.10
    assert share < baseline["p01"]
    m = rnd.dir.metrics("filter_upo")
    assert m["upo/in"] == N and m["upo/kept"] == len(kept)
    # Most disagreements are the planted flips: the estimator learned the rule, not the noise.
    decisions = [json.loads(line) for line in (rnd.dir.path / "upo_decisions.jsonl").read_text().splitlines()]
    disagree = [d for d in decisions if d["reason"] == "estimator_disagrees"]
    assert len(disagree) == m["upo/dropped_disagree"] >= 0.2 * N
    assert sum(d["flipped"] for d in disagree) / len(disagree) >= 0.8


def test_decisions_and_metrics(filtered, planted):
    kept, rnd = filtered
    decisions = [json.loads(line) for line in (rnd.dir.path / "upo_decisions.jsonl").read_text().splitlines()]
    assert [d["prompt_id"] for d in decisions] == [p.prompt_id for p in planted]
    assert {d["reason"] for d in decisions} <= {"easy", "hard", "estimator_disagrees", "not_sampled"}
    assert [d["prompt_id"] for d in decisions if d["kept"]] == [p.prompt_id for p in kept]
    for d in decisions:
        s = d["scores"]
        assert 0.0 <= s["bald"] <= math.log(2) + 1e-12 and 0.0 <= s["p_mean"] <= 1.0 and s["vote"] in (0.0, 1.0)
        assert s["epsilon"] == pytest.approx(min(0.4, 0.5 * s["bald"] / math.log(2)))
        assert d["kept"] == (d["reason"] in ("easy", "hard"))
        assert (d["reason"] == "estimator_disagrees") == (s["vote"] == 1.0)
    # train.loss=upo: each kept pair carries its epsilon for the trainer.
    assert all(p.epsilon == pytest.approx(p.meta["upo"]["epsilon"]) for p in kept)
    assert any(p.epsilon > 0 for p in kept)
    m = rnd.dir.metrics("filter_upo")
    assert m["upo/T"] == 10 and m["upo/epsilon_applied"] == 1.0
    assert m["upo/kept_easy"] + m["upo/kept_hard"] == len(kept)
    assert m["upo/labelled_pairs"] == N
    est = rnd.dir.metrics("upo_estimator")  # the estimator checkpoint's own stage
    assert 0.5 <= est["upo/estimator_eval_accuracy"] <= 1.0 and est["upo/estimator_train_pairs"] >= 0.8 * N
    assert (rnd.dir.path / "upo_scores.png").stat().st_size > 0
    # The estimator is a named checkpoint of the round; the chain's result is train_pairs.
    assert rnd.state["checkpoints"]["upo_estimator"]["path"].endswith("checkpoints/upo_estimator")
    assert [p.prompt_id for p in rnd.dir.read("train_pairs", Pair)] == [p.prompt_id for p in kept]


def test_weighted_sample():
    import random

    rng = random.Random(0)
    assert sorted(weighted_sample(rng, [1, 2, 3], [1.0, 0.0, 0.0], 3)) == [1, 2, 3]
    assert weighted_sample(rng, [1, 2, 3], [0.0, 1.0, 0.0], 1) == [2]
    counts = {0: 0, 1: 0}
    for _ in range(2000):
        counts[weighted_sample(rng, [0, 1], [3.0, 1.0], 1)[0]] += 1
    assert 0.70 < counts[0] / 2000 < 0.80  # P = 3/4


def test_epsilon_grows_with_uncertainty_and_is_capped():
    assert epsilon_for(0.0, "bald", 0.5, 0.4) == 0.0
    assert epsilon_for(math.log(2) / 2, "bald", 0.5, 0.4) == pytest.approx(0.25)
    assert epsilon_for(math.log(2), "bald", 0.9, 0.4) == 0.4
    assert epsilon_for(0.3, "none", 0.5, 0.4) == 0.0


def test_too_few_labelled_pairs_is_a_clear_error(local_controller):
    with pytest.raises(OrchestratorError, match=r"filter upo: too few labelled pairs.*6 from the judged pairs.*min_examples=16"):
        run_filter(local_controller, pairs=planted_pairs(6, 0.0, seed=1))


@pytest.mark.parametrize(
    "override, words",
    [
        ("filter.upo.easy_rate=0", "easy_rate"),
        ("filter.upo.mu=0", "mu"),
        ("filter.upo.epsilon.max=0.5", "epsilon.max"),
        ("filter.upo.seed_pairs=/nonexistent.jsonl", "seed_pairs"),
        ("filter.upo.estimator.mode=ranker", "pairwise_classifier"),
        ("filter.upo.estimator.train_layers=0", "train_layers"),
    ],
)
def test_bad_config_is_refused_before_the_run(override, words):
    from confs import composed

    from orchestrator.recipes import get_recipe

    cfg = composed(["filters=[upo]", override])
    with pytest.raises(ConfigError, match=words):
        get_recipe(cfg.recipe).roles(cfg)


def test_filter_constructs_from_the_shipped_config():
    from confs import composed

    from orchestrator.config import to_plain

    spec = to_plain(composed(["filters=[upo,rip]"]).filter)
    assert list(spec) == ["upo", "rip"]
    f = plugins.build("filter", "upo", spec["upo"])
    assert isinstance(f, UPOFilter) and f.estimator["mc"]["T"] == 10
    assert f.seed_pairs == "builtin" and not f.refresh and f.estimator["train_layers"] == 2  # the paper's setting, scaled


def test_later_rounds_learn_from_earlier_pairs_or_keep_the_first_estimator(filtered, planted):
    _, rnd1 = filtered
    spec = {k: v for k, v in plugins.chosen(rnd1.ctl.cfg, "filter")["upo"].items() if k != "_target_"}
    rnd2 = Round(rnd1.ctl, 2)
    ctx = plugins.context(rnd2, "upo")
    fresh = planted_pairs(8, 0.0, seed=5, tag="q")
    # Bootstrapped labels: round 1's judged pairs (renamed by round), then this round's.
    labelled = UPOFilter(**spec).labelled_pairs(ctx, fresh)
    assert [p.prompt_id for p in labelled] == [f"r1/{p.prompt_id}" for p in planted] + [p.prompt_id for p in fresh]
    assert len(UPOFilter(**{**spec, "history_rounds": 0}).labelled_pairs(ctx, fresh)) == 8
    # refresh=false (the released code): round 1's estimator is reused, nothing is trained.
    path, m = UPOFilter(**{**spec, "refresh": False}).estimator_path(ctx, fresh)
    assert path == rnd1.state["checkpoints"]["upo_estimator"]["path"] and m["upo/estimator_round"] == 1.0
    assert m["upo/estimator_steps"] > 0 and "upo/labelled_pairs" not in m  # round 1's training metrics, again
    assert "upo_estimator" not in rnd2.state.get("checkpoints", {})


def test_builtin_seed_pairs_are_balanced_for_length():
    """The rated seed's best vs worst (the better reply longer in 45 of 48) plus the concise pairs (the
    better reply shorter in all 48): length alone cannot tell the chosen reply."""
    from orchestrator.filters.upo import builtin_seed_pairs

    pairs = builtin_seed_pairs()
    assert len(pairs) == 96 and len({p.prompt_id for p in pairs}) == 96
    assert len({chat.transcript(p.messages) for p in pairs}) == 96  # no prompt twice
    assert all(p.chosen_score > p.rejected_score and p.chosen != p.rejected for p in pairs)
    assert pairs[0].messages == [{"role": "user", "content": "How long should I boil pasta?"}]
    assert pairs[0].chosen.startswith("Most dried pasta") and pairs[0].rejected == "Boil it until it is done."
    rated, concise = pairs[:48], pairs[48:]
    assert sum(len(p.chosen) > len(p.rejected) for p in rated) == 45
    assert all(len(p.chosen) < len(p.rejected) for p in concise)
    assert 0.4 <= sum(len(p.chosen) > len(p.rejected) for p in pairs) / len(pairs) <= 0.6


def test_builtin_seed_pairs_never_share_a_prompt_with_the_eval_sets():
    """The estimator is trained on these; the eval's held-out prompts must stay unseen by every model of a run."""
    from orchestrator.data import dev_prompts_path, eval_prompts_path, load_prompts
    from orchestrator.eval import ifeval
    from orchestrator.eval.generations import check_no_overlap
    from orchestrator.filters.upo import builtin_seed_pairs

    seed = [chat.transcript(p.messages) for p in builtin_seed_pairs()]
    for path in (eval_prompts_path(), dev_prompts_path()):
        check_no_overlap([p.text for p in load_prompts(path)], seed, what=f"prompts of {path.name}")
    check_no_overlap([it["prompt"] for it in ifeval.load_items()], seed, what="IF eval prompts")
