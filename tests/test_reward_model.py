"""RewardModelWorker on a tiny random Llama: a planted rule is learned in both modes, scores are
symmetric and reload exactly, MC dropout varies only with dropout > 0; BALD against hand values.

Planted rule: every chosen response contains "Paris", every rejected one "London" instead, the rest
random words of the same count (so length and vocabulary give nothing away). With these settings
(data and training seeds 0, 1 and 2 tried) both modes reach accuracy 1.0 on the 16 held-out and 24
fresh pairs, with p_chosen >= 0.998 (pairwise) and margin >= 7.3 (Bradley-Terry) on every one of
them; the tests ask for >= 0.8 (chance 0.5) and a positive margin, leaving room for other CPUs.

The worker runs on one thread: on this 2-core machine, busy with other jobs, two torch threads were
~70x slower per step than one (OpenMP threads waiting on each other).
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from orchestrator.uncertainty import bald, binary_entropy

LN2 = math.log(2)


# -- BALD (pure) ----------------------------------------------------------------------------


def test_bald_certain_passes_have_zero_information():
    for probs in ([1.0] * 10, [0.0] * 10, [0.7] * 5):
        b, mean_p, vote = bald(probs)
        assert b == pytest.approx(0.0, abs=1e-12)
        assert mean_p == pytest.approx(probs[0])
    assert bald([1.0] * 3)[2] == 0 and bald([0.0] * 3)[2] == 1


def test_bald_confident_disagreeing_passes_give_ln2():
    b, mean_p, vote = bald([1.0, 0.0] * 5)
    assert b == pytest.approx(LN2, abs=1e-12)
    assert mean_p == 0.5
    assert vote == 0  # a 5-5 tie goes to 0, as UPO's argmax(bincount(...))


def test_bald_worked_example():
    # passes 0.9 and 0.5: mean 0.7;
    # H(0.7) = -(0.7 ln 0.7 + 0.3 ln 0.3) = 0.610864
    # H(0.9) = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.325083, H(0.5) = ln 2 = 0.693147, mean 0.509115
    # B = 0.610864 - 0.509115 = 0.101749
    b, mean_p, vote = bald([0.9, 0.5])
    assert mean_p == pytest.approx(0.7)
    assert b == pytest.approx(0.101749, abs=2e-6)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert b == pytest.approx(h(0.7) - (h(0.9) + h(0.5)) / 2, rel=1e-12)
    assert vote == 0  # 0.9 votes 0, 0.5 votes 0 (argmax of a tie is the first class)
    # Majority vote: two passes of three say the rejected response is better.
    b, mean_p, vote = bald([0.2, 0.3, 0.8])
    assert vote == 1 and mean_p == pytest.approx(13 / 30)
    assert b == pytest.approx(h(13 / 30) - (h(0.2) + h(0.3) + h(0.8)) / 3, rel=1e-12)


def test_bald_rejects_bad_input():
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0
    with pytest.raises(ValueError, match="at least one pass"):
        bald([])
    with pytest.raises(ValueError, match=r"pass 1: probability 1.5"):
        bald([0.5, 1.5])
    with pytest.raises(ValueError, match="pass 0"):
        bald([float("nan")])


# -- the worker on a tiny model ----------------------------------------------------------------

# None of these imports torch (the worker imports it lazily): the BALD and split tests run without it.
from omegaconf import OmegaConf  # noqa: E402

from orchestrator import chat  # noqa: E402
from orchestrator.config import CONF_DIR  # noqa: E402
from tiny_model import make_tiny_checkpoint  # noqa: E402
from workers.reward_model import RewardModelWorker, split_by_prompt  # noqa: E402

WORDS = "the quick brown fox jumps over lazy dog a helpful assistant answers question clearly and politely".split()


def make_pairs(n: int, seed: int, tag: str = "p") -> list[dict]:
    """Chosen: six random words plus "Paris" at a random place; rejected: the same with "London"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        chosen, rejected = rng.sample(WORDS, 6), rng.sample(WORDS, 6)
        chosen.insert(rng.randrange(7), "Paris")
        rejected.insert(rng.randrange(7), "London")
        out.append({
            "prompt_id": f"{tag}{i}", "messages": chat.user(f"Tell me about item {i}."),
            "chosen": " ".join(chosen), "rejected": " ".join(rejected), "chosen_score": 5.0, "rejected_score": 1.0,
        })  # fmt: skip
    return out


def swapped(pairs: list[dict]) -> list[dict]:
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


def make_cfg(**over) -> dict:
    """conf/reward_model/default.yaml with a learning rate that moves a tiny random model."""
    base = OmegaConf.load(CONF_DIR / "reward_model" / "default.yaml")
    small = {"learning_rate": 5e-4, "warmup_ratio": 0.0, "lr_scheduler": "constant", "micro_batch_size": 8,
             "max_length": 512, "min_examples": 4}  # fmt: skip
    return OmegaConf.to_container(OmegaConf.merge(base, small, over), resolve=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="module")
def worker() -> RewardModelWorker:
    return RewardModelWorker(threads=1)


TRAIN = make_pairs(80, seed=0)
FRESH = make_pairs(24, seed=1000, tag="fresh")


@pytest.fixture(scope="module")
def classifier(base, worker, tmp_path_factory) -> tuple[str, dict, dict]:
    """The pairwise estimator trained on 64 pairs (16 held out), 8 epochs of batch 8: 128 steps."""
    out = str(tmp_path_factory.mktemp("rm") / "pairwise")
    cfg = make_cfg(mode="pairwise_classifier", epochs=8, eval_fraction=0.2)
    return out, cfg, worker.train(TRAIN, base, out, cfg, seed=0)


@pytest.fixture(scope="module")
def bt_model(base, worker, tmp_path_factory) -> tuple[str, dict, dict]:
    """A Bradley-Terry RM on the same pairs: 3 epochs of 8 pairs, lr 1e-3."""
    out = str(tmp_path_factory.mktemp("rm") / "bt")
    cfg = make_cfg(mode="bradley_terry", epochs=3, learning_rate=1e-3, eval_fraction=0.2)
    return out, cfg, worker.train(TRAIN, base, out, cfg, seed=0)


def test_pairwise_classifier_learns_planted_rule(classifier, worker):
    out, cfg, result = classifier
    m = result["metrics"]
    assert result["num_pairs"] == 64 and m["rm/eval_pairs"] == 16
    assert m["rm/train_examples"] == 128  # both orders of each pair
    assert result["steps"] == 128 and m["rm/steps"] == 128
    assert m["rm/loss_first"] == pytest.approx(LN2, abs=0.15)  # a fresh head: about chance
    assert m["rm/loss_last"] < 0.2
    assert m["rm/eval_accuracy"] >= 0.8
    assert m["rm/eval_order_agreement"] >= 0.8  # each order on its own picks the chosen response
    assert m["rm/truncated"] == 0 and m["rm/dropout"] == 0.1
    assert all(isinstance(v, float) for v in m.values())

    scores = worker.score(FRESH, out, cfg)
    assert sum(s["p_chosen"] > 0.5 for s in scores) / len(scores) >= 0.8
    assert sum(s["p_chosen_first"] > 0.5 and s["p_chosen_second"] > 0.5 for s in scores) / len(scores) >= 0.8


def test_pairwise_scores_are_symmetric(classifier, worker):
    """Swapping chosen and rejected gives exactly 1 - p (each order is the other's complement)."""
    out, cfg, _ = classifier
    pairs = FRESH[:12]
    ab, ba = worker.score(pairs, out, cfg), worker.score(swapped(pairs), out, cfg)
    for s, t in zip(ab, ba):
        assert s["p_chosen"] == pytest.approx((s["p_chosen_first"] + s["p_chosen_second"]) / 2, abs=1e-7)
        assert t["p_chosen"] == pytest.approx(1 - s["p_chosen"], abs=1e-5)
        assert t["p_chosen_first"] == pytest.approx(1 - s["p_chosen_second"], abs=1e-5)
        assert t["p_chosen_second"] == pytest.approx(1 - s["p_chosen_first"], abs=1e-5)


def test_checkpoint_reloads_and_scores_as_trained(classifier, base, worker):
    """The saved checkpoint is the trained model: its held-out scores equal those taken in memory."""
    from transformers import AutoConfig, AutoTokenizer

    out, cfg, result = classifier
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "reward_model.json"} <= names
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.num_labels == 2 and config.pad_token_id is not None
    assert config.attention_dropout == AutoConfig.from_pretrained(base).attention_dropout == 0.0  # restored
    assert AutoTokenizer.from_pretrained(out).chat_template
    with open(os.path.join(out, "reward_model.json")) as f:
        meta = json.load(f)
    assert meta["mode"] == "pairwise_classifier" and "Response #2:" in meta["pair_template"]

    from workers.reward_model import _pairs

    _, held = split_by_prompt(_pairs(TRAIN), cfg["eval_fraction"], seed=0)
    held = [p.to_dict() for p in held]
    scores = worker.score(held, out, cfg)
    m = result["metrics"]
    assert sum(s["p_chosen"] for s in scores) / len(scores) == pytest.approx(m["rm/eval_p_chosen_mean"], abs=1e-5)
    assert sum(s["p_chosen"] > 0.5 for s in scores) / len(scores) == m["rm/eval_accuracy"]
    assert worker.score(held, out, cfg) == scores  # eval mode: deterministic


def test_mc_passes(classifier, worker):
    out, cfg, _ = classifier
    pairs = FRESH[:6]
    passes = worker.mc_passes(pairs, out, 5, 0.1, 0, cfg)
    assert len(passes) == 6 and all(len(row) == 5 for row in passes)
    assert all(0.0 <= p <= 1.0 for row in passes for p in row)
    # Dropout on: T different values for every pair, though the model is confident on all of them.
    assert all(len(set(row)) == 5 for row in passes), passes
    assert worker.mc_passes(pairs, out, 5, 0.1, 0, cfg) == passes  # the seed fixes the masks
    assert worker.mc_passes(pairs, out, 5, 0.1, 1, cfg) != passes
    # Dropout off: train mode changes nothing else, so all passes equal the deterministic score.
    still = worker.mc_passes(pairs, out, 3, 0.0, 0, cfg)
    scores = worker.score(pairs, out, cfg)
    for row, s in zip(still, scores):
        assert row[0] == row[1] == row[2]
        assert row[0] == pytest.approx(s["p_chosen"], abs=1e-5)
    # UPO's code: chosen first only, P(label 0).
    first = worker.mc_passes(pairs, out, 2, 0.0, 0, make_cfg(mode="pairwise_classifier", mc={"orders": "chosen_first"}))
    for row, s in zip(first, scores):
        assert row[0] == row[1] == pytest.approx(s["p_chosen_first"], abs=1e-5)
    for row in passes:  # the rows feed bald directly
        b, mean_p, _ = bald(row)
        assert 0.0 <= b <= LN2 and mean_p == pytest.approx(sum(row) / 5)


def test_bradley_terry_learns_planted_rule(bt_model, worker):
    out, cfg, result = bt_model
    m = result["metrics"]
    assert result["num_pairs"] == 64 and m["rm/train_examples"] == 64 and result["steps"] == 24
    assert m["rm/loss_first"] == pytest.approx(LN2, abs=0.15) and m["rm/loss_last"] < 0.1
    assert m["rm/eval_accuracy"] >= 0.8 and m["rm/eval_margin_mean"] > 0
    scores = worker.score(FRESH, out, cfg)
    for s in scores:
        assert s["margin"] == pytest.approx(s["chosen"] - s["rejected"], abs=1e-6)
    assert sum(s["margin"] > 0 for s in scores) / len(scores) >= 0.8
    # Scores are per response: swapping the pair swaps them.
    back = worker.score(swapped(FRESH[:6]), out, cfg)
    for s, t in zip(scores, back):
        assert t["chosen"] == pytest.approx(s["rejected"], abs=1e-5) and t["margin"] == pytest.approx(-s["margin"], abs=1e-5)
    with open(os.path.join(out, "reward_model.json")) as f:
        assert json.load(f)["mode"] == "bradley_terry"


def test_wrong_checkpoints_are_refused(classifier, bt_model, base, worker):
    out, cfg, _ = classifier
    bt_out, bt_cfg, _ = bt_model
    with pytest.raises(ValueError, match="not a reward model"):
        worker.score(FRESH[:2], base, cfg)  # a causal LM would load with a random head
    with pytest.raises(ValueError, match="is a bradley_terry model; reward_model.mode is pairwise_classifier"):
        worker.score(FRESH[:2], bt_out, cfg)
    with pytest.raises(ValueError, match="is a pairwise_classifier model; reward_model.mode is bradley_terry"):
        worker.mc_passes(FRESH[:2], out, 2, 0.1, 0, bt_cfg)


def test_bradley_terry_mc_passes(bt_model, worker):
    """A BT estimator's passes are sigmoid(r(x, chosen) - r(x, rejected)): with dropout off exactly the
    scored margin's; with dropout on they differ, each pair's around it."""
    out, cfg, _ = bt_model
    scores = worker.score(FRESH[:6], out, cfg)
    still = worker.mc_passes(FRESH[:6], out, 2, 0.0, 0, cfg)
    for row, s in zip(still, scores):
        assert row[0] == row[1] == pytest.approx(1 / (1 + math.exp(-s["margin"])), abs=1e-5)
    noisy = worker.mc_passes(FRESH[:6], out, 4, 0.1, 0, cfg)
    assert all(len(set(row)) == 4 for row in noisy), noisy


def test_too_few_examples_is_a_clear_error(base, worker, tmp_path):
    out = str(tmp_path / "out")
    numbers = r"too few pairs .*: 30 left for training \(40 given, 10 held out by eval_fraction=0.25\); reward_model.min_examples=32"
    with pytest.raises(ValueError, match=numbers):
        worker.train(make_pairs(40, seed=3), base, out, make_cfg(min_examples=32, eval_fraction=0.25))
    with pytest.raises(ValueError, match=r"0 left for training \(0 given"):
        worker.train([], base, out, make_cfg(mode="bradley_terry"))
    with pytest.raises(ValueError, match=r"example 0 \(p0\)"):
        worker.train([{**make_pairs(1, seed=0)[0], "surprise": 1}], base, out, make_cfg())
    with pytest.raises(KeyError, match="reward_model.min_examples missing"):
        cfg = make_cfg()
        del cfg["min_examples"]
        worker.train(make_pairs(8, seed=3), base, out, cfg)
    assert not os.path.exists(out)


def test_split_by_prompt_keeps_prompts_whole():
    pairs = make_pairs(10, seed=0)
    pairs += [{**p, "chosen": p["chosen"] + " again"} for p in pairs]  # two pairs per prompt
    from workers.reward_model import _pairs

    train, held = split_by_prompt(_pairs(pairs), 0.2, seed=5)
    assert len(held) == 4 and len(train) == 16
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in held}
    assert split_by_prompt(_pairs(pairs), 0.2, seed=5) == (train, held)
    assert split_by_prompt(_pairs(pairs), 0.0, seed=5) == (_pairs(pairs), [])


def test_long_sequences_keep_their_end(base):
    """Over max_length, a sequence keeps its last tokens (where the head reads), counted; both modes."""
    from transformers import AutoTokenizer

    from workers.reward_model import _Encoder, _pairs, pair_messages

    tok = AutoTokenizer.from_pretrained(base)
    p = _pairs(make_pairs(1, seed=0))[0]
    full_pair = chat.encode(tok, pair_messages(p.messages, p.chosen, p.rejected))
    prompt_ids, reply_ids = chat.encode_pair(tok, p.messages, p.chosen)
    enc = _Encoder(tok, 20)
    assert enc.pair(p, True) == full_pair[-20:] and enc.reply(p, p.chosen) == (prompt_ids + reply_ids)[-20:]
    assert enc.truncated == 2
    roomy = _Encoder(tok, 4096)
    assert roomy.pair(p, True) == full_pair and roomy.truncated == 0
    # The template names the two responses in order; the chat template wraps it as one user turn.
    assert tok.decode(full_pair).index("Response #1: " + p.chosen) < tok.decode(full_pair).index("Response #2: " + p.rejected)
    assert tok.decode(full_pair).startswith("<|im_start|>user") and tok.decode(full_pair).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("mode", ["pairwise_classifier", "bradley_terry"])
def test_zero_head_starts_at_chance(base, worker, tmp_path, mode):
    """head_init=zero: the first logged loss is ln 2 (p = 0.5, margin 0) whatever the backbone says;
    the untouched default head does not start there. Two micro-batches per step: the logged loss is
    the step's mean, not the sum over accumulated micro-batches."""
    def first_loss(head_init: str) -> float:
        cfg = make_cfg(mode=mode, epochs=1, learning_rate=0.0, eval_fraction=0.0, head_init=head_init,
                       batch_size=8, micro_batch_size=4)
        return worker.train(TRAIN[:16], base, str(tmp_path / f"{mode}-{head_init}"), cfg, seed=0)["metrics"]["rm/loss_first"]

    assert first_loss("zero") == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first_loss("normal") - math.log(2)) > 1e-3


def test_unknown_head_init_is_refused(base, worker, tmp_path):
    with pytest.raises(ValueError, match="head_init='xavier'"):
        worker.train(TRAIN, base, str(tmp_path / "x"), make_cfg(head_init="xavier"), seed=0)


@pytest.mark.parametrize("mode", ["pairwise_classifier", "bradley_terry"])
def test_top_layers_train_over_the_cached_trunk(base, worker, tmp_path, mode):
    """train_layers=1 of the tiny model's 2: the lower layer stays as the base had it, the model still
    learns the planted rule, and the cached path scores as the whole model does (MC passes with
    dropout 0 equal ``score``, which runs every layer); with dropout on the passes differ."""
    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / mode)
    cfg = make_cfg(mode=mode, epochs=4, train_layers=1, eval_fraction=0.2,
                   learning_rate=5e-4 if mode == "pairwise_classifier" else 1e-3)  # fmt: skip
    result = worker.train(TRAIN, base, out, cfg, seed=0)
    m = result["metrics"]
    assert m["rm/train_layers"] == 1.0 and result["steps"] == (64 if mode == "pairwise_classifier" else 32)
    assert m["rm/loss_first"] == pytest.approx(LN2, abs=1e-4)  # the zero head
    assert m["rm/loss_last"] < 0.5 and m["rm/eval_accuracy"] >= 0.8

    before, after = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    lower = [k for k in before if ".layers.0." in k]
    upper = [k for k in before if ".layers.1." in k]
    assert lower and upper
    assert all(torch.equal(before[k], after[k]) for k in lower)  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in upper)  # trained

    if mode == "pairwise_classifier":
        still = worker.mc_passes(FRESH[:6], out, 2, 0.0, 0, cfg)
        for row, s in zip(still, worker.score(FRESH[:6], out, cfg)):
            assert row[0] == row[1] == pytest.approx(s["p_chosen"], abs=1e-5)
        noisy = worker.mc_passes(FRESH[:6], out, 4, 0.1, 0, cfg)
        assert all(len(set(row)) == 4 for row in noisy), noisy


def test_bad_train_layers_is_refused(base, worker, tmp_path):
    with pytest.raises(ValueError, match=r"reward_model.train_layers=0 must be a whole number >= 1 or null"):
        worker.train(TRAIN, base, str(tmp_path / "x"), make_cfg(train_layers=0), seed=0)
