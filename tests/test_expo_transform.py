"""The ExPO transform (orchestrator/transforms/expo.py) through a real Controller (run store, MLflow
sqlite store) with in-process workers: the alpha search keeps the argmax, the anchor picks theta_0,
a killed search resumes without recomputing finished candidates, and bad settings fail before the
run exists. Checkpoints are one-tensor fakes (``write_checkpoint``: w = value), so a candidate's
weight tells which alpha it is: theta_0 = 0, theta_1 = 1 gives w = 1 + alpha."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_checkpoint
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from orchestrator import plugins
from orchestrator.errors import ConfigError
from orchestrator.transforms import expo as expo_transform
from orchestrator.transforms.expo import Candidate, best
from orchestrator.types import Completion, Judgment, Prompt

ALPHAS = "transform.expo.alphas=[0.1,0.3,0.5,1.0]"
SMALL = ["transforms=[expo]", "transform.expo.dev_max_prompts=3", "transform.expo.promote=true"]


def weight(path: str | Path) -> float:
    return round(float(load_file(str(Path(path) / "model.safetensors"))["w"][0]), 5)


class Policy:
    """The policy engine: answers every prompt with the weight of the checkpoint it serves."""

    def __init__(self):
        self.path, self.served, self.weights, self.asked = None, [], [], []

    def sync_weights(self, path, sha256=None):
        self.path = path
        self.served.append(path)
        self.weights.append(weight(path))
        return 0.0

    def generate(self, request):
        self.asked.append([p[-1]["content"] for p in request.prompts])
        text = f"w={weight(self.path)}"
        return [Completion(texts=[text] * request.n, num_tokens=[3] * request.n, finish_reasons=["stop"] * request.n) for _ in request.prompts]


class Judge:
    """A scorer: ``score_of[alpha]`` for an answer from candidate alpha (w = 1 + alpha)."""

    def __init__(self, score_of, fail_at=None):
        self.score_of, self.fail_at = score_of, fail_at
        self.scored, self.configs, self.served = [], [], []

    def sync_weights(self, path, sha256=None):
        self.served.append(path)
        return 0.0

    def score(self, generations, judge_cfg):
        alpha = round(float(generations[0].text.split("=")[1]) - 1, 5)
        if alpha == self.fail_at:
            raise RuntimeError("killed while scoring")
        self.scored.append(alpha)
        self.configs.append(judge_cfg)
        return [Judgment(prompt_id=g.prompt_id, index=g.index, score=self.score_of[alpha], samples=[], mode="score_only") for g in generations]


@pytest.fixture
def expo_run(local_controller, tmp_path):
    """``run(*overrides, policy_value=1.0, score_of=..., fail_at=None, resume=False)``: round 1 trains
    a fake checkpoint (w = policy_value) from a fake start model (w = 0) and runs the transforms."""
    start = tmp_path / "start"
    write_checkpoint(start, 0.0)

    def run(*overrides, score_of=None, fail_at=None, resume=False, rounds=((1, 1.0),)):
        ctl = local_controller(*SMALL, *overrides, *(["resume=true"] if resume else []))
        ctl.start_model = str(start)
        policy = ctl.workers.attach("policy", Policy())
        judge = ctl.workers.attach("eval_judge", Judge(score_of or {}, fail_at))
        for t, value in rounds:
            with ctl.round(t) as rnd:
                rnd.checkpoint("policy", "train", lambda out, v=value: write_checkpoint(out, v))
                plugins.apply_transforms(rnd)
        return ctl, policy, judge

    return run


@pytest.fixture
def builds(monkeypatch):
    """The alphas ``extrapolate`` was asked for, in order."""
    calls = []
    real = expo_transform.extrapolate

    def counting(weak, strong, alpha, out):
        calls.append(round(float(alpha), 5))
        return real(weak, strong, alpha, out)

    monkeypatch.setattr(expo_transform, "extrapolate", counting)
    return calls


def manifest(ctl) -> dict:
    return json.loads(ctl.store.manifest_path.read_text())


SCORES = {0.0: 2.0, 0.1: 2.5, 0.3: 3.25, 0.5: 3.0, 1.0: 1.0}


def test_the_search_keeps_the_argmax_built_once_and_promoted(expo_run, builds):
    ctl, policy, judge = expo_run(ALPHAS, score_of=SCORES)
    rd = ctl.store.round(1)
    records = rd.read("expo_search", Candidate)
    assert [r.alpha for r in records] == [0.0, 0.1, 0.3, 0.5, 1.0]
    assert [r.score for r in records] == [SCORES[a] for a in (0.0, 0.1, 0.3, 0.5, 1.0)]
    assert all(len(r.scores) == 3 for r in records)  # dev_max_prompts=3, n=1

    # the argmax, alpha = 0.3, is the round's expo checkpoint: w = 1 + 0.3 * (1 - 0), and the policy
    # the next round starts from
    state = manifest(ctl)["rounds"]["1"]
    expo = state["checkpoints"]["expo"]["path"]
    assert weight(expo) == pytest.approx(1.3, abs=1e-6) and expo.endswith("round_001/checkpoints/expo")
    assert state["policy"] == "expo" and ctl.model_path(1) == expo
    assert state["expo"]["alpha"] == 0.3 and state["expo"]["anchor"] == "prev" and state["expo"]["theta_0"] == ctl.model_path(0)
    # each candidate extrapolated once; the chosen one was moved into place, not built again
    assert builds == [0.1, 0.3, 0.5, 1.0]
    assert not (rd.path / "expo_candidates").exists() and not (rd.path / "expo_search.partial.jsonl").exists()

    # the policy engine served the trained checkpoint (alpha = 0) then each candidate; the fixed
    # eval judge (the starting model) scored them with the run's judge config; dev prompts answered
    assert policy.served[0] == state["checkpoints"]["policy"]["path"] and len(policy.served) == 5
    assert judge.scored == [0.0, 0.1, 0.3, 0.5, 1.0] and set(judge.served) == {ctl.model_path(0)}
    assert judge.configs[0]["mode"] == "score_only"
    dev = [p.text for p in expo_transform.load_dev_prompts(None, 3, "dev")]
    assert policy.asked == [dev] * 5

    m = rd.metrics("transform_expo")
    assert m["expo/dev_score_trained"] == 2.0 and m["expo/dev_score_chosen"] == 3.25 and m["expo/dev_score_gain"] == 1.25
    assert (rd.path / "expo_alpha_search.png").stat().st_size > 0
    run = MlflowClient(ctl.tracker.uri).get_run(state["mlflow_run_id"])
    assert run.data.metrics["expo/alpha"] == 0.3 and run.data.metrics["expo/dev_score/alpha_0.5"] == 3.0
    assert run.data.metrics["expo/update_rel_norm"] == pytest.approx(1.0)  # |1 - 0| / |1|
    assert run.data.tags["expo.anchor"] == "prev" and run.data.tags["policy_checkpoint"] == "expo"
    assert "expo_alpha_search.png" in {a.path for a in MlflowClient(ctl.tracker.uri).list_artifacts(state["mlflow_run_id"])}


def test_alpha_zero_wins_ties_and_without_promote_the_trained_model_stays_the_policy(expo_run, builds):
    ctl, _, _ = expo_run(ALPHAS, "transform.expo.promote=false", score_of=dict.fromkeys(SCORES, 3.0))
    state = manifest(ctl)["rounds"]["1"]
    assert state["expo"]["alpha"] == 0.0 and weight(state["checkpoints"]["expo"]["path"]) == 1.0
    assert "policy" not in state and ctl.model_path(1) == state["checkpoints"]["policy"]["path"]
    assert builds == [0.1, 0.3, 0.5, 1.0, 0.0]  # no candidate folder for alpha = 0: the checkpoint is built


def test_best_is_the_argmax_and_ties_go_to_the_smaller_alpha():
    rec = lambda a, s: Candidate(alpha=a, score=s, scores=[s])  # noqa: E731
    assert best([rec(0.0, 1.0), rec(0.5, 4.0), rec(1.0, 3.9)]).alpha == 0.5
    assert best([rec(0.0, 2.0), rec(0.3, 2.5), rec(0.5, 2.5)]).alpha == 0.3
    assert best([rec(0.0, None), rec(0.3, 1.0)]).alpha == 0.3


@pytest.mark.parametrize("anchor, expected_theta_0, expected_w", [("prev", "round1", 4.0), ("start", "start", 6.0)])
def test_the_anchor_picks_theta_0(expo_run, anchor, expected_theta_0, expected_w):
    # round 1: start w=0, trained w=1, alpha 1 -> expo w=2 (promoted). Round 2 trains w=3 from it.
    ctl, _, judge = expo_run(f"transform.expo.anchor={anchor}", "transform.expo.alpha=1.0", rounds=((1, 1.0), (2, 3.0)))
    state = manifest(ctl)["rounds"]
    round1_expo = state["1"]["checkpoints"]["expo"]["path"]
    assert weight(round1_expo) == 2.0
    theta_0 = {"round1": round1_expo, "start": ctl.model_path(0)}[expected_theta_0]
    assert state["2"]["expo"]["theta_0"] == theta_0 and state["2"]["expo"]["anchor"] == anchor
    assert state["2"]["expo"]["theta_1"] == state["2"]["checkpoints"]["policy"]["path"]
    assert weight(state["2"]["checkpoints"]["expo"]["path"]) == expected_w  # 3 + 1 * (3 - theta_0)
    assert judge.scored == [] and not ctl.store.round(2).has("expo_search")  # a fixed alpha: no search
    assert ctl.store.round(2).metrics("transform_expo")["expo/anchor_is_start"] == float(anchor == "start")


def test_a_killed_search_resumes_without_recomputing_finished_candidates(expo_run, builds, tmp_path):
    with pytest.raises(RuntimeError, match="killed while scoring"):
        expo_run(ALPHAS, score_of=SCORES, fail_at=0.3)
    round1 = tmp_path / "run" / "rounds" / "round_001"
    partial = [json.loads(line)["alpha"] for line in (round1 / "expo_search.partial.jsonl").read_text().splitlines()]
    assert partial == [0.0, 0.1] and not (round1 / "expo_search.jsonl").exists()
    assert builds == [0.1, 0.3]
    del builds[:]

    ctl, policy, judge = expo_run(ALPHAS, score_of=SCORES, resume=True)
    rd = ctl.store.round(1)
    # alpha 0 and 0.1 were scored before the kill: neither served, generated nor scored again
    assert judge.scored == [0.3, 0.5, 1.0]
    assert policy.weights == [1.3, 1.5, 2.0]
    assert builds == [0.3, 0.5, 1.0]  # 0.3 had been built but not scored: built again, once
    records = rd.read("expo_search", Candidate)
    assert [(r.alpha, r.score) for r in records] == [(a, SCORES[a]) for a in (0.0, 0.1, 0.3, 0.5, 1.0)]
    assert weight(ctl.model_path(1)) == pytest.approx(1.3, abs=1e-6)
    assert not (rd.path / "expo_candidates").exists() and not (rd.path / "expo_search.partial.jsonl").exists()


def test_the_kept_best_candidate_survives_a_kill(expo_run, builds):
    # killed at alpha 0.5 after 0.3 (the best so far) was scored: 0.3's folder is kept and becomes
    # the expo checkpoint without being built again
    with pytest.raises(RuntimeError):
        expo_run(ALPHAS, score_of=SCORES, fail_at=0.5)
    del builds[:]
    ctl, _, judge = expo_run(ALPHAS, score_of=SCORES, resume=True)
    assert judge.scored == [0.5, 1.0] and builds == [0.5, 1.0]
    assert weight(ctl.model_path(1)) == pytest.approx(1.3, abs=1e-6)


def test_dev_prompts_the_policy_wrote_are_left_out(expo_run, local_controller, tmp_path):
    ctl = local_controller(*SMALL, ALPHAS)
    dev = expo_transform.load_dev_prompts(None, 3, "dev")
    rnd_dir = ctl.store.round(1)
    rnd_dir.write("prompts", [Prompt(id="si-1", messages=dev[1].messages, source="self_instruct")], {})
    with ctl.round(1) as rnd:
        rnd.checkpoint("policy", "train", write_checkpoint)
        ctx = plugins.context(rnd, "expo")
        plugin = plugins.build("transform", "expo", plugins.chosen(ctl.cfg, "transform")["expo"])
        assert [p.id for p in plugin.dev_set(ctx)] == [dev[0].id, dev[2].id]


# -- config checks, before anything is written ----------------------------------------------------
def _file(tmp_path, name, texts):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["transform.expo.alphas=[-0.1,0.3]"], ["transform.expo.alphas=[-0.1, 0.3]", ">= 0"]),
        (["transform.expo.alphas=[]"], ["transform.expo.alphas=[]", "at least one > 0", "transform.expo.alpha"]),
        (["transform.expo.alphas=[0]"], ["at least one > 0"]),
        (["transform.expo.alpha=-0.5"], ["transform.expo.alpha=-0.5", ">= 0"]),
        (["transform.expo.alpha=abc"], ["transform.expo.alpha", "number"]),
        (["transform.expo.anchor=sft"], ["transform.expo.anchor='sft'", "start, prev"]),
        (["transform.expo.scorer=rm"], ["transform.expo.scorer='rm'", "eval_judge, judge"]),
        (["transform.expo.dev_prompts=/no/such/dev.jsonl"], ["transform.expo.dev_prompts=/no/such/dev.jsonl", "file not found"]),
        (["transform.expo.dev_max_prompts=0"], ["transform.expo.dev_max_prompts=0"]),
        (["transform.expo.decoding.top_p=0"], ["transform.expo.decoding.top_p=0"]),
        (["eval.every=0"], ["transform.expo.scorer=eval_judge", "eval.every=0"]),
        (["+transform.expo.alhpa=0.3"], ["transform.expo", "unknown alhpa"]),
        (["transforms=[]"], ["recipe=expo", "transforms=[expo]"]),
        (["DEV=train"], ["transform.expo.dev_prompts=", "among the training prompts (data.prompts)"]),
        (["DEV=eval"], ["transform.expo.dev_prompts=", "among the eval prompts (eval.prompts)"]),
        # the controls: valid settings pass
        (["transform.expo.alphas=[]", "transform.expo.alpha=0.3", "eval.every=0"], None),
        (["transform.expo.scorer=judge", "eval.every=0"], None),
        ([], None),
    ],
)
def test_bad_settings_fail_before_the_run_exists(tmp_path, tiny_checkpoint, overrides, words):
    from confs import composed

    from orchestrator.cli import checked

    train = _file(tmp_path, "train.jsonl", ["Why does the Moon show phases?", "Name a colour."])
    held_out = _file(tmp_path, "eval.jsonl", ["How do I politely decline an invitation to a wedding?"])
    dev = _file(tmp_path, "dev.jsonl", ["Why does the Moon show phases?", "How do I politely decline an invitation to a wedding?"])
    swap = {"DEV=train": [f"data.prompts={train}", f"transform.expo.dev_prompts={dev}"],
            "DEV=eval": [f"eval.prompts={held_out}", f"transform.expo.dev_prompts={dev}"]}
    overrides = [o for x in overrides for o in swap.get(x, [x])]
    cfg = composed(["+experiment=expo", "model=local", f"model.path={tiny_checkpoint}", f"run_dir={tmp_path / 'run'}", *overrides])
    if words is None:
        checked(cfg)
        return
    with pytest.raises(ConfigError) as failed:
        checked(cfg)
    for word in words:
        assert word in str(failed.value)
    assert not (tmp_path / "run").exists()


def test_the_shipped_dev_set_is_held_out_from_the_shipped_train_and_eval_sets(tmp_path, tiny_checkpoint):
    from confs import composed

    from orchestrator.data import dev_prompts_path, load_prompts

    cfg = composed(["+experiment=expo", "model=local", f"model.path={tiny_checkpoint}", "eval.max_prompts=null"])
    dev = load_prompts(dev_prompts_path(), what="dev")
    assert len(dev) >= 40 and {p.category for p in dev} == {"writing", "advice", "coding", "maths", "facts", "reasoning"}
    expo_transform.check_held_out(cfg, dev, "transform.expo.dev_prompts", dev_prompts_path())  # raises on any overlap
