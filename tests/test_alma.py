"""ALMA without engines: the judge's real-valued score on known distributions (and the multi-token
"10"), its tokenization check and accuracy, k-means and the per-cluster prompt pick, best-of-N and
best-vs-random, the shipped seed data, the config checks, and three rounds of the recipe with
in-process workers (a real Controller, run store and MLflow sqlite store): no prompt reused, N split
1:1(:1), the latest model from round 2, the judge built and self-distilled once, SFT from the base
on D1 u D_1 u ... u D_t, a killed run resuming without redoing a stage."""

from __future__ import annotations

import json
import math
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from confs import composed
from conftest import default_checkpoint, write_checkpoint

from orchestrator import chat, clusters, rating
from orchestrator.data import alma_seed_ratings_path, alma_sft_seed_path, load_demonstrations, load_prompts
from orchestrator.errors import ConfigError
from orchestrator.pairs import best_of_n, best_vs_random
from orchestrator.recipes import alma, get_recipe
from orchestrator.types import Completion, Demonstration, Generation, Judgment, Prompt

# -- the real-valued score -------------------------------------------------------------------------------


class Backend:
    """choice_probs with fixed answers: ``first`` after "Rating: [[", ``second`` after "Rating: [[1"."""

    def __init__(self, first, second=None):
        self.first, self.second, self.calls = first, second, []

    def choice_probs(self, prompts, choices, assistant_prefix=""):
        self.calls.append((len(prompts), list(choices), assistant_prefix))
        table = self.first if assistant_prefix == rating.PREFIX else self.second
        return [{c: table.get(c, 0.0) for c in choices} for _ in prompts]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tiny_model import build_tokenizer

    return build_tokenizer()


def gen(pid="p", index=0, text="an answer", source="policy", prompt="a question?"):
    return Generation(prompt_id=pid, messages=chat.user(prompt), index=index, text=text, num_tokens=2, source=source)


def test_real_valued_score_is_exact_on_a_known_distribution(tiny_tokenizer):
    # "10" is "1" then "0" for this tokenizer (and SmolLM2's): the mass of "1" is split by the next step
    assert rating.score_tokens(tiny_tokenizer) == rating.ScoreTokens(ten_is_one_token=False, close="]")
    first = {"0": 0.02, "1": 0.10, "5": 0.18, "7": 0.30, "9": 0.15}  # 0.75 on the ratings, 0.25 elsewhere
    second = {"0": 0.3, "]": 0.1}  # after "1": "0" three times as likely as the close
    backend = Backend(first, second)
    (j,) = rating.rate_with(backend, tiny_tokenizer, [gen()], room=10_000)
    p = {"0": 0.02, "1": 0.10 * 0.25, "5": 0.18, "7": 0.30, "9": 0.15, "10": 0.10 * 0.75}
    want = sum(int(s) * v for s, v in p.items()) / sum(p.values())
    assert j.score == pytest.approx(want, abs=1e-12) and j.samples == [j.score]
    assert j.mode == "rating" and j.mass == pytest.approx(0.75)
    dist = json.loads(j.raw[0])
    assert sum(dist.values()) == pytest.approx(1.0) and dist["10"] == pytest.approx(0.075 / 0.75)
    assert rating.argmax_rating(j) == 7.0
    # two decoding steps, the second after "Rating: [[1", asking only for "0" and the close
    assert backend.calls == [(1, [str(s) for s in range(10)], "Rating: [["), (1, ["0", "]"], "Rating: [[1")]


def test_distribution_one_token_ten_no_mass_and_edge_cases():
    assert rating.distribution({"10": 1.0, "0": 1.0}, None, "]]") == {**{str(s): 0.0 for s in range(1, 10)}, "0": 0.5, "10": 0.5}
    assert rating.distribution(None, None, "]]") is None and rating.distribution({"3": 0.0}, None, "]]") is None
    # "1" never continued: all its mass stays on 1
    assert rating.distribution({"1": 0.5, "2": 0.5}, {"0": 0.0, "]]": 0.0}, "]]")["1"] == 0.5
    from orchestrator.judging import expected_score

    # 0..9 equally likely, "1" continued by "0" one time in ten: 1 keeps 0.09, 10 gets 0.01
    uniform = rating.distribution({str(s): 1.0 for s in range(10)}, {"0": 1.0, "]]": 9.0}, "]]")
    assert uniform["10"] == pytest.approx(0.01) and expected_score(uniform) == pytest.approx((45 - 1 + 0.9 + 10 * 0.1) / 10)


def test_smollm2_writes_ten_as_two_tokens():
    from transformers import AutoTokenizer

    assert rating.score_tokens(AutoTokenizer.from_pretrained(str(default_checkpoint()))) == rating.ScoreTokens(False, "]]")


def test_rating_prompt_targets_and_fitting(tiny_tokenizer):
    msgs = rating.rating_messages(chat.user("Name a colour."), "Blue. Rating: [[10]] [[ 9.5 ]] [[x]]")
    (turn,) = msgs
    assert turn["content"].startswith("Please act as an impartial judge")
    assert turn["content"].endswith("# Prompt:\nName a colour.\n\n# Response:\nBlue. Rating: [10] [9.5] [[x]]")
    assert [rating.target(r) for r in (7.4, 12, -1)] == ["Rating: [[7]]", "Rating: [[10]]", "Rating: [[0]]"]
    # the trained answer and the scored prefix agree token for token
    _, reply = chat.encode_pair(tiny_tokenizer, msgs, rating.target(7))
    prefix = chat.encode(tiny_tokenizer, msgs, assistant_prefix=rating.PREFIX)[len(chat.encode(tiny_tokenizer, msgs)):]
    assert reply[: len(prefix) + 1] == prefix + tiny_tokenizer.encode("7", add_special_tokens=False)
    # a response too long for the context is cut at its end, and marked
    long = "word " * 400
    cut = rating.fitted(tiny_tokenizer, chat.user("q"), long, 320)
    assert cut.endswith(rating.TRUNCATED) and long.startswith(cut[: -len(rating.TRUNCATED)].rstrip())
    scored = chat.encode(tiny_tokenizer, rating.rating_messages(chat.user("q"), cut), assistant_prefix=rating.PREFIX + "1")
    assert len(scored) <= 320
    assert rating.fitted(tiny_tokenizer, chat.user("q"), "short", 320) == "short"


def judged(score, pid="p", index=0, dist=None):
    return Judgment(prompt_id=pid, index=index, score=score, samples=[score], mode="rating",
                    raw=[json.dumps(dist or {str(round(score)): 1.0})] if score is not None else [])


def test_accuracy_against_human_ratings():
    rated = [
        Demonstration("a1", chat.user("A?"), "good", 9.0), Demonstration("a2", chat.user("A?"), "bad", 2.0),
        Demonstration("b1", chat.user("B?"), "ok", 5.0), Demonstration("b2", chat.user("B?"), "better", 7.0),
        Demonstration("c1", chat.user("C?"), "same", 4.0), Demonstration("c2", chat.user("C?"), "same too", 4.0),
    ]
    judgments = [judged(8.6, "a1"), judged(3.1, "a2"),  # right
                 judged(6.2, "b1"), judged(5.9, "b2"),  # wrong (real); the whole-number argmax ties 6 = 6: half
                 judged(1.0, "c1"), judged(9.0, "c2")]  # equal human ratings: not a pair
    m = rating.accuracy(rated, judgments, "x/")
    assert m["x/pairs"] == 2 and m["x/pair_accuracy"] == 0.5 and m["x/pair_accuracy_int"] == 0.75
    assert m["x/mae"] == pytest.approx((0.4 + 1.1 + 1.2 + 1.1 + 3 + 5) / 6) and m["x/rated"] == 6


def test_split_by_prompt_keeps_a_prompts_responses_together():
    rated = [Demonstration(f"{p}{i}", chat.user(f"Prompt {p}?"), "r", float(i)) for p in "abcdefgh" for i in (1, 2)]
    train, held = rating.split_by_prompt(rated, 0.25, random.Random(0))
    assert len(held) == 4 and len(train) == 12
    assert not {chat.last_user(d.messages) for d in train} & {chat.last_user(d.messages) for d in held}
    with pytest.raises(ValueError, match="at least 2 are needed"):
        rating.split_by_prompt(rated[:2], 0.5, random.Random(0))


# -- k-means and the pick ------------------------------------------------------------------------------------
def test_kmeans_recovers_separated_clusters_deterministically():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 5
    x = np.concatenate([rng.normal(c, 0.1, size=(15, 4)) for c in centres])
    labels, found, inertia = clusters.kmeans(x, 4, seed=3, iterations=50)
    assert sorted(np.bincount(labels)) == [15, 15, 15, 15]
    assert all(len(set(labels[i * 15:(i + 1) * 15])) == 1 for i in range(4))  # each true cluster is one label
    again = clusters.kmeans(x, 4, seed=3, iterations=50)
    assert (again[0] == labels).all() and again[2] == inertia
    with pytest.raises(ValueError, match="needs at least 5 points"):
        clusters.kmeans(x[:4], 5, seed=0, iterations=5)


def test_pick_takes_one_unused_prompt_from_each_of_k_clusters():
    pool = [Prompt(id=f"p{i}", messages=chat.user(f"q{i}"), source="self_instruct" if i % 2 else "seed") for i in range(12)]
    assignment = [clusters.Assignment(f"p{i}", i % 4, 0.0) for i in range(12)]  # 4 clusters of 3
    used: set[str] = set()
    rng = random.Random(0)
    seen_clusters = set()
    for round_index in range(3):
        picked, m = clusters.pick(pool, assignment, used, 2, rng)
        assert len(picked) == 2 and len({int(p.id[1:]) % 4 for p in picked}) == 2  # two different clusters
        assert not {p.id for p in picked} & used  # never a used prompt
        seen_clusters |= {int(p.id[1:]) % 4 for p in picked}
        assert m["alma/cluster_coverage"] == len(seen_clusters) / 4 and m["alma/round_clusters"] == 2
        used |= {p.id for p in picked}
    # with k larger than the clusters left: one from each cluster that still has a prompt, until none is left
    while True:
        left = {int(p.id[1:]) % 4 for p in pool if p.id not in used}
        picked, m = clusters.pick(pool, assignment, used, 10, rng)
        assert len(picked) == m["alma/clusters_available"] == len(left) == len({int(p.id[1:]) % 4 for p in picked})
        assert not {p.id for p in picked} & used
        used |= {p.id for p in picked}
        if not picked:
            break
    assert len(used) == 12


def test_assign_clusters_embeddings_by_direction():
    vectors = [[1, 0.01], [2, 0.0], [0.0, 3], [0.01, 1], [-1, 0], [-5, 0.1]]  # three directions, any length
    records, m = clusters.assign([f"p{i}" for i in range(6)], vectors, 3, seed=0, iterations=20)
    labels = [r.cluster for r in records]
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5] and len(set(labels)) == 3
    assert m["clusters/nonempty"] == 3 and all(r.distance < 0.05 for r in records)


# -- best-of-N and best vs random ----------------------------------------------------------------------------
def test_best_of_n_and_best_vs_random():
    gens = [gen("a", 0, "a0", "sft_1"), gen("a", 1, "a1", "sft_2"), gen("a", 2, "a2", "latest"), gen("a", 3, "a3", "latest"),
            gen("b", 0, "b0", "sft_1"), gen("b", 1, "  ", "sft_2"), gen("c", 0, "c0", "sft_1"), gen("c", 1, "c1", "sft_2"),
            gen("d", 0, "d0", "sft_1")]
    judgments = [judged(3.0, "a", 0), judged(7.5, "a", 1), judged(7.5, "a", 2), judged(1.0, "a", 3),
                 judged(2.0, "b", 0), judged(9.0, "b", 1), judged(4.0, "c", 0), judged(4.0, "c", 1), judged(None, "d", 0)]
    best, dropped = best_of_n(gens, judgments)
    # ties: the earliest; a blank response is never the demonstration; an unscored prompt gives none
    assert [(d.prompt_id, d.response, d.score, d.source) for d in best] == [
        ("a", "a1", 7.5, "sft_2"), ("b", "b0", 2.0, "sft_1"), ("c", "c0", 4.0, "sft_1")]
    assert dropped == {"unscored": 1}
    pairs, dropped = best_vs_random(gens, judgments, random.Random(0))
    assert dropped == {"tie": 1, "too_few_scored": 1}
    a, b = pairs
    assert a.chosen == "a1" and a.rejected in {"a0", "a3"} and a.chosen_score == 7.5 and a.rejected_score < 7.5
    assert a.meta["chosen_source"] == "sft_2" and (b.chosen, b.rejected) == ("  ", "b0")  # DPO may prefer a blank answer
    rejected = {best_vs_random(gens, judgments, random.Random(s))[0][0].rejected for s in range(20)}
    assert rejected == {"a0", "a3"}  # random among the lower-scored, never the tied a2


def test_split_of_n_among_checkpoints():
    assert alma.split(6, 3) == [2, 2, 2] and alma.split(6, 2) == [3, 3] and alma.split(7, 3) == [3, 2, 2]


# -- the shipped seed ----------------------------------------------------------------------------------------
def test_shipped_seed_sizes_ranges_and_no_overlap_with_held_out_prompts():
    d1 = load_demonstrations(alma_sft_seed_path(), what="alma.sft_seed")
    rated = load_demonstrations(alma_seed_ratings_path(), what="alma.judge.seed_ratings", rated=True)
    assert len(d1) == 40 and len(rated) == 96
    assert {d.score for d in rated} == {float(s) for s in range(11)}  # every level of the guideline
    assert len({chat.last_user(d.messages) for d in rated}) == 48
    from orchestrator.data import dev_prompts_path, eval_prompts_path
    from orchestrator.eval import ifeval

    held = {p.text.lower() for p in load_prompts(eval_prompts_path()) + load_prompts(dev_prompts_path())}
    held |= {it["prompt"].lower() for it in ifeval.load_items(None, None)}
    assert not {chat.last_user(d.messages).lower() for d in d1 + rated} & held


def test_bad_seed_files_are_one_line_errors(tmp_path):
    f = tmp_path / "r.jsonl"
    for line, message in [
        ('{"prompt": "Q?", "response": "A", "rating": 11}', r"line 1 has \"rating\" 11; want a whole number from 0 to 10"),
        ('{"prompt": "Q?", "response": "A", "rating": 2.5}', r"line 1 has \"rating\" 2.5"),
        ('{"prompt": "Q?", "response": "A", "rating": true}', r"line 1 has \"rating\" True"),
        ('{"prompt": "Q?", "response": ""}', r"line 1 has no non-empty \"response\""),
        ('{"response": "A", "rating": 3}', r"line 1 has no non-empty \"prompt\""),
    ]:
        f.write_text(line + "\n")
        with pytest.raises(ConfigError, match=rf"^alma.judge.seed_ratings={f}: {message}"):
            load_demonstrations(f, what="alma.judge.seed_ratings", rated=True)


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("alma.train=ppo", r"alma.train='ppo' is invalid: one of sft, dpo"),
    ("alma.engines=two", r"alma.engines='two' is invalid: one of swap, own"),
    ("alma.n=2", r"alma.n=2 is invalid: a whole number >= 3"),
    ("alma.k=0", r"alma.k=0 is invalid"),
    ("alma.clusters=8", r"alma.clusters=8 is invalid: a whole number >= 12"),
    ("alma.latest_from_round=0", r"alma.latest_from_round=0 is invalid"),
    ("alma.sft_seeds=[1,1]", r"alma.sft_seeds=\[1, 1\] is invalid: two different whole numbers"),
    ("alma.sft_seed=/no/such.jsonl", r"alma.sft_seed='/no/such.jsonl' is invalid: no such file"),
    ("alma.judge.seed_ratings=/no/such.jsonl", r"alma.judge.seed_ratings='/no/such.jsonl' is invalid"),
    ("alma.prompts.shots_seed=[5,3]", r"alma.prompts.shots_seed=\[5, 3\] is invalid"),
    ("alma.judge.heldout_fraction=1", r"alma.judge.heldout_fraction=1 is invalid: in \(0, 1\)"),
    ("alma.judge.distill.size=0", r"alma.judge.distill.size=0 is invalid"),
    ("+alma.sft.betta=1", r"alma.sft=.* is invalid: keys of the train section only \(not \['betta'\]\)"),
    ("judge.model=/some/judge", r"ALMA trains its own judge"),
    ("filters=[rip]", r"pair filters act on preference pairs; alma.train=sft"),
])  # fmt: skip
def test_bad_alma_config_is_refused_by_roles(override, message):
    with pytest.raises(ConfigError, match=message):
        get_recipe("alma").roles(composed(["+experiment=alma", override]))


def test_defaults_and_roles():
    cfg = composed(["+experiment=alma"])
    assert (cfg.rounds, cfg.alma.n, cfg.alma.k, cfg.alma.train) == (10, 6, 12, "sft")
    roles = {r.name: r for r in get_recipe("alma").roles(cfg)}
    assert roles["sft_1"].engine_of == roles["sft_2"].engine_of == roles["alma_judge"].engine_of == "policy"
    assert roles["embedder"].kind == "task" and roles["policy"].engine_of is None
    own = {r.name: r for r in get_recipe("alma").roles(composed(["+experiment=alma", "alma.engines=own"]))}
    assert own["sft_1"].engine_of is None and own["alma_judge"].engine_of is None
    with pytest.raises(ConfigError, match=r"alma=None is invalid: .*\+experiment=alma"):
        get_recipe("alma").roles(composed(["recipe=alma"]))
    get_recipe("alma").roles(composed(["+experiment=alma", "alma.train=dpo", "filters=[rip]"]))  # filters fit DPO pairs


# -- the recipe, in process ------------------------------------------------------------------------------------
class Engine:
    """The one engine every checkpoint is swapped into. As a prompt writer it writes distinct tasks; as a
    generator it answers with the served checkpoint's folder name; as a judge it rates an answer by
    its writer (sft_1 3, sft_2 5, policy 8, the base 1) and a seed response by its length."""

    SCORE = {"sft_1": 3.0, "sft_2": 5.0, "policy": 8.0}

    def __init__(self, fail_on: str | None = None):
        self.path, self.swaps, self.fail_on, self.served_for = "", [], fail_on, []
        self.written = 0

    def sync_weights(self, path, sha256=None):
        if path != self.path:
            self.path = path
            self.swaps.append(Path(path).name)
        return 0.0

    def generate(self, request):
        if not request.chat:  # Self-Instruct: one new task per few-shot request
            out = []
            for _ in request.prompts:
                self.written += 1
                i = self.written
                text = f" Describe item {i} {7 * i} {13 * i} {31 * i} quickly."
                out.append(Completion(texts=[text], num_tokens=[9], finish_reasons=["stop"]))
            return out
        name = Path(self.path).name
        if name == self.fail_on:
            raise RuntimeError(f"killed while {name} answered")
        self.served_for.append((name, len(request.prompts), request.n))
        return [Completion(texts=[f"{name} answer {k} to {chat.last_user(p)}" for k in range(request.n)],
                           num_tokens=[5] * request.n, finish_reasons=["stop"] * request.n) for p in request.prompts]

    def rate(self, generations):
        out = []
        for g in generations:
            writer = g.text.split(" answer ")[0] if " answer " in g.text else None
            score = self.SCORE.get(writer, 1.0) if writer else float(len(g.text) % 11)
            out.append(judged(score + 0.01 * g.index, g.prompt_id, g.index))
        return out


@pytest.fixture
def fakes(monkeypatch):
    """The trainer writes a stand-in checkpoint and records what it was given; the embedder places
    each prompt by a checksum of its text."""
    from workers.embedder import EmbedWorker
    from workers.trainer import TrainerWorker

    calls = []

    def sft(self, examples, base, out, cfg, seed=0, state_dir=None, base_sha256=None):
        demos = [Demonstration.from_dict(e) for e in examples]
        calls.append({"examples": demos, "base": base, "out": out, "cfg": cfg, "seed": seed})
        write_checkpoint(Path(out), float(len(calls)))
        return {"checkpoint": out, "num_pairs": len(examples), "steps": 1, "wall_s": 0.1, "metrics": {"train/loss": 1.0}}

    def embed(self, texts, checkpoint, cfg):
        return [[math.cos(zlib.crc32(t.encode()) % 97), math.sin(zlib.crc32(t.encode()) % 97), 0.1] for t in texts]

    monkeypatch.setattr(TrainerWorker, "sft", sft)
    monkeypatch.setattr(EmbedWorker, "embed", embed)
    return calls


def built_name(call) -> str:
    """The checkpoint a trainer call built (it writes into the temporary folder ``.NAME.tmp-...``)."""
    return Path(call["out"]).name.split(".tmp")[0].lstrip(".")


SMALL = ["+experiment=alma", "eval.every=0", "alma.k=3", "alma.clusters=6", "alma.prompts.num_prompts=4",
         "alma.judge.distill.size=4", "data.prompts_per_round=0"]


def run_alma(local_controller, *overrides, engine=None):
    ctl = local_controller(*SMALL, *overrides)
    ctl.workers.in_process = True
    engine = ctl.workers.attach("policy", engine or Engine())
    alma.run(ctl)
    return ctl, engine


def test_three_rounds_in_process(local_controller, fakes, tiny_checkpoint):
    ctl, engine = run_alma(local_controller, "rounds=3")
    store = ctl.store
    # the pool: the seed prompts plus 4 written by the base model, clustered in round 1 only
    pool = store.round(1).read("prompt_pool", Prompt)
    assert len(pool) == 240 + 4 and sum(p.source == "self_instruct" for p in pool) == 4
    assert not store.round(2).has("prompt_pool") and not store.round(2).has("prompt_clusters")
    # no prompt reused across rounds; K = 3 a round, from 3 different clusters
    cluster_of = {a.prompt_id: a.cluster for a in store.round(1).read("prompt_clusters", clusters.Assignment)}
    ids = [[p.id for p in store.round(r).read("prompts", Prompt)] for r in (1, 2, 3)]
    assert all(len(i) == len({cluster_of[p] for p in i}) == 3 for i in ids)
    assert len(set(ids[0]) | set(ids[1]) | set(ids[2])) == 9
    # N = 6 split 3:3 between M1(1), M1(2) in round 1; 2:2:2 with the latest model from round 2
    assert [store.round(1).has(f"generations_{s}") for s in ("sft_1", "sft_2", "latest")] == [True, True, False]
    for r in (2, 3):
        gens = [g for s in ("sft_1", "sft_2", "latest") for g in store.round(r).read(f"generations_{s}", Generation)]
        assert sorted((g.source, g.index) for g in gens if g.prompt_id == ids[r - 1][0]) == [
            ("latest", 4), ("latest", 5), ("sft_1", 0), ("sft_1", 1), ("sft_2", 2), ("sft_2", 3)]
        assert {g.text.split(" answer")[0] for g in gens if g.source == "latest"} == {"policy"}  # M_{t-1}
    # trainer calls: M1(1), M1(2), the seed judge and its distillation (round 1 only), one policy a round
    assert [built_name(c) for c in fakes] == ["sft_1", "sft_2", "judge_seed", "judge", "policy", "policy", "policy"]
    sft1, sft2, judge_seed, judge, *policies = fakes
    m0 = str(tiny_checkpoint)
    assert sft1["base"] == sft2["base"] == judge_seed["base"] == m0 and sft1["seed"] != sft2["seed"]
    assert judge["base"] == store.round_state(1)["checkpoints"]["judge_seed"]["path"]
    assert all(p["base"] == m0 for p in policies)  # every M_t from the base model
    assert sft1["cfg"]["learning_rate"] == judge_seed["cfg"]["learning_rate"] == 2e-5 and judge["cfg"]["learning_rate"] == 1e-5
    assert sft1["cfg"]["epochs"] == 1 and sft1["cfg"]["beta"] == 0.1  # the train section underneath
    # the judge: trained on the seed ratings (held-out prompts excepted), as "Rating: [[N]]" answers
    assert len(judge_seed["examples"]) == 72 and all(e.response.startswith("Rating: [[") for e in judge_seed["examples"])
    assert all(e.messages[0]["content"].startswith("Please act as an impartial judge") for e in judge_seed["examples"])
    # self-distillation: 4 of the round's responses, the judge's own ratings rounded
    assert [e.response for e in judge["examples"]] == [rating.target(e.score) for e in judge["examples"]]
    assert len(judge["examples"]) == 4 and {e.source for e in judge["examples"]} == {"distill"}
    # D1 u D_1 u ... u D_t: 40 seed demonstrations plus 3 best-of-N a round
    assert [len(p["examples"]) for p in policies] == [43, 46, 49]
    best = [store.round(r).read("best_of_n", Demonstration) for r in (1, 2, 3)]
    assert policies[2]["examples"][40:] == best[0] + best[1] + best[2]
    assert {d.source for d in best[0]} == {"sft_2"} and {d.source for d in best[1] + best[2]} == {"latest"}
    m1 = store.round(1).metrics("best_of_n")
    assert m1["alma/winner_share/sft_2"] == 1.0 and m1["alma/winner_share/sft_1"] == 0.0 and m1["alma/kept_score_mean"] > 5
    assert store.round(2).metrics("best_of_n")["alma/winner_share/latest"] == 1.0
    assert (store.round(1).path / "alma_scores.png").stat().st_size > 0
    # the judge is round 1's in every round; its accuracy before and after distillation in round 1 only
    assert store.round(1).has("judge_accuracy_before") and store.round(1).has("judge_accuracy_after")
    assert not store.round(2).has("judge_accuracy_before") and "judge" not in store.round_state(2)["checkpoints"]
    acc = store.round(1).metrics("judge_accuracy_after")
    assert acc["alma/judge_after/rated"] == 24 and 0 <= acc["alma/judge_after/pair_accuracy"] <= 1
    # N, K and R in the manifest and the metrics
    state = store.round_state(2)
    assert state["alma"] == {"N": 6, "K": 3, "R": 3, "train": "sft", "generators": ["sft_1", "sft_2", "latest"]}
    first, third = store.round(1).metrics("prompts"), store.round(3).metrics("prompts")
    assert third["alma/N"] == 6 and first["alma/cluster_coverage"] == 0.5  # 3 of 6 clusters
    assert third["alma/cluster_coverage"] == pytest.approx(len({cluster_of[p] for i in ids for p in i}) / 6)
    # one engine: every checkpoint was swapped into it
    assert engine.swaps[:5] == ["model", "sft_1", "sft_2", "judge_seed", "judge"] and "policy" in engine.swaps
    assert all(store.round_state(r)["status"] == "done" for r in (1, 2, 3))


def test_a_killed_round_resumes_without_redoing_a_stage(local_controller, fakes, tmp_path):
    with pytest.raises(RuntimeError, match="killed while sft_2 answered"):
        run_alma(local_controller, "rounds=1", engine=Engine(fail_on="sft_2"))
    rd_files = sorted(p.name for p in (tmp_path / "run/rounds/round_001").glob("*.jsonl"))
    assert rd_files == ["generations_sft_1.jsonl", "prompt_clusters.jsonl", "prompt_pool.jsonl", "prompts.jsonl"]
    assert len(fakes) == 2  # M1(1), M1(2) built
    ctl, engine = run_alma(local_controller, "rounds=1", "resume=true")
    # neither the pool, the SFT checkpoints nor sft_1's responses were made again
    assert engine.written == 0 and [n for n, *_ in engine.served_for] == ["sft_2"]
    assert [built_name(c) for c in fakes[2:]] == ["judge_seed", "judge", "policy"]
    assert ctl.store.round_state(1)["status"] == "done"


def test_dpo_variant_trains_the_latest_on_best_vs_random(local_controller, fakes, monkeypatch, tiny_checkpoint):
    from workers.trainer import TrainerWorker

    dpo = []

    def train(self, pairs, base, out, cfg, seed=0, state_dir=None, base_sha256=None):
        dpo.append((pairs, base))
        write_checkpoint(Path(out))
        return {"checkpoint": out, "num_pairs": len(pairs), "steps": 1, "wall_s": 0.1, "metrics": {}}

    monkeypatch.setattr(TrainerWorker, "train", train)
    ctl, _ = run_alma(local_controller, "rounds=2", "alma.train=dpo")
    (p1, base1), (p2, base2) = dpo
    assert base1 == ctl.store.round_state(1)["checkpoints"]["sft_1"]["path"]  # M1(1) in round 1
    assert base2 == ctl.store.round_state(1)["checkpoints"]["policy"]["path"]  # then the latest
    assert len(p1) == 3 and all(p["chosen_score"] > p["rejected_score"] for p in p1 + p2)
    assert [built_name(c) for c in fakes] == ["sft_1", "sft_2", "judge_seed", "judge"]
    assert ctl.store.round(2).has("train_pairs") and os.path.isdir(base2)
