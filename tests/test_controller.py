"""The controller's bookkeeping without Ray: named checkpoints, promotion, the filter chain, checkpoint
transforms and worker roles, on a real run store and a real MLflow sqlite store."""

from __future__ import annotations

import json

import pytest
from conftest import write_checkpoint
from mlflow.tracking import MlflowClient

from orchestrator import plugins
from orchestrator.controller import Round
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.types import Pair


def pairs(n: int) -> list[Pair]:
    return [
        Pair(prompt_id=f"p{i}", messages=f"question {i}", chosen=f"good {i}", rejected="bad", chosen_score=4.0, rejected_score=1.0 + i / n)
        for i in range(n)
    ]


def manifest(ctl) -> dict:
    return json.loads(ctl.store.manifest_path.read_text())


# -- named checkpoints --------------------------------------------------------------------------
def test_named_checkpoints_are_recorded_tagged_and_built_once(local_controller):
    ctl = local_controller()
    builds = []

    def build(out, value):
        builds.append(value)
        return write_checkpoint(out, value)

    with ctl.round(1) as rnd:
        policy = rnd.checkpoint("policy", "train", lambda out: build(out, 1.0))
        judge = rnd.checkpoint("judge", "judge_train", lambda out: build(out, 2.0))
    state = manifest(ctl)["rounds"]["1"]
    assert set(state["checkpoints"]) == {"policy", "judge"}
    assert state["checkpoints"]["policy"]["path"] == policy and policy.endswith("round_001/checkpoints/policy")
    assert len(state["checkpoints"]["judge"]["sha256"]) == 64
    assert state["checkpoints"]["judge"]["sha256"] != state["checkpoints"]["policy"]["sha256"]
    assert ctl.model_path(1) == policy  # the next round starts from "policy" unless another is promoted
    assert ctl.checkpoint_sha256(1) == state["checkpoints"]["policy"]["sha256"]
    assert json.loads((ctl.store.round(1).metrics_file("judge_train")).read_text())["fake/value"] == 2.0
    # no temporary folders are left behind
    assert sorted(p.name for p in (ctl.store.round(1).path / "checkpoints").iterdir()) == ["judge", "policy"]

    tags = MlflowClient(ctl.tracker.uri).get_run(state["mlflow_run_id"]).data.tags
    assert tags["checkpoint.judge"] == judge and tags["checkpoint.policy.sha256"] == state["checkpoints"]["policy"]["sha256"]

    # resumed: the published checkpoint is reused, not rebuilt
    again = local_controller("resume=true")
    with again.round(1) as rnd:
        assert rnd.checkpoint("policy", "train", lambda out: build(out, 9.0)) == policy
    assert builds == [1.0, 2.0]


def test_a_failed_build_leaves_nothing_and_the_round_is_not_done(local_controller):
    ctl = local_controller()

    def broken(out):
        write_checkpoint(out)
        raise RuntimeError("trainer died")

    with pytest.raises(RuntimeError, match="trainer died"):
        with ctl.round(1) as rnd:
            rnd.checkpoint("policy", "train", broken)
    assert list((ctl.store.round(1).path / "checkpoints").iterdir()) == []
    state = manifest(ctl)["rounds"]["1"]
    assert state["status"] == "running" and "checkpoints" not in state
    with pytest.raises(OrchestratorError, match="round 1 has no 'policy' checkpoint"):
        ctl.model_path(1)


def test_promote_chooses_the_next_rounds_policy(local_controller):
    ctl = local_controller()
    with ctl.round(1) as rnd:
        rnd.checkpoint("policy", "train", write_checkpoint)
        with pytest.raises(OrchestratorError, match="cannot promote checkpoint 'expo'"):
            rnd.promote("expo")
        expo = rnd.checkpoint("expo", "expo", lambda out: write_checkpoint(out, 3.0))
        rnd.promote("expo")
    assert ctl.model_path(1) == expo
    assert manifest(ctl)["rounds"]["1"]["policy"] == "expo"


def test_a_round_without_a_policy_checkpoint_is_not_done(local_controller):
    ctl = local_controller()
    with pytest.raises(OrchestratorError, match="no 'policy' checkpoint"):
        with ctl.round(1):
            pass
    assert manifest(ctl)["rounds"]["1"]["status"] == "running"


@pytest.mark.parametrize("bad", ["Policy", "../x", "", "a b"])
def test_checkpoint_names_are_checked(local_controller, bad):
    ctl = local_controller()
    with pytest.raises(ValueError, match="checkpoint name"):
        ctl.store.round(1).checkpoint(bad)


# -- the filter chain ---------------------------------------------------------------------------
CHAIN = ["+filter.every2._target_=plugin_fixtures.KeepEvery", "+filter.every2.step=2",
         "+filter.tag._target_=plugin_fixtures.KeepEvery"]


def test_filters_run_in_the_configured_order_each_a_resumable_stage(local_controller):
    ctl = local_controller(*CHAIN)
    with ctl.round(1) as rnd:
        kept = plugins.filter_pairs(rnd, pairs(6))
        rnd.checkpoint("policy", "train", write_checkpoint)
    assert [p.prompt_id for p in kept] == ["p0", "p2", "p4"]
    assert all(p.meta["seen_by"] == ["every2", "tag"] for p in kept)
    rd = ctl.store.round(1)
    assert [len(rd.read(s, Pair)) for s in ("filter_every2", "filter_tag", "train_pairs")] == [3, 3, 3]
    assert rd.metrics("train_pairs") == {**rd.metrics("train_pairs"), "filter/kept": 3.0, "filter/dropped": 3.0}
    # each plug-in has its own rng, seeded by run, round and name: a rerun draws the same numbers
    assert rd.metrics("filter_every2")["rng"] == ctl.rng(1, "plugin/every2").random()
    assert rd.metrics("filter_every2")["rng"] != rd.metrics("filter_tag")["rng"]
    metrics = MlflowClient(ctl.tracker.uri).get_run(manifest(ctl)["rounds"]["1"]["mlflow_run_id"]).data.metrics
    assert metrics["every2/kept"] == 3.0 and metrics["filter/dropped"] == 3.0


def test_reversed_order_changes_the_result(local_controller):
    ctl = local_controller(*reversed(CHAIN[:1] + CHAIN[2:]), CHAIN[1])  # tag first, then every2
    kept = plugins.filter_pairs(Round(ctl, 1), pairs(6))
    assert all(p.meta["seen_by"] == ["tag", "every2"] for p in kept)


def test_no_filters_keeps_every_pair(local_controller):
    ctl = local_controller("filters=[]")
    kept = plugins.filter_pairs(Round(ctl, 1), pairs(4))
    assert len(kept) == 4 and ctl.store.round(1).metrics("train_pairs")["filter/dropped"] == 0.0
    assert not list(ctl.store.round(1).path.glob("filter_*"))


def test_a_filter_that_keeps_nothing_stops_the_round_naming_it(local_controller):
    ctl = local_controller("+filter.dropall._target_=plugin_fixtures.DropAll")
    with pytest.raises(OrchestratorError, match=r"filter dropall kept 0 of 5 pairs \(dropall/in=5\)"):
        plugins.filter_pairs(Round(ctl, 1), pairs(5))
    assert not ctl.store.round(1).has("filter_dropall")  # nothing written: a resume runs it again


@pytest.mark.parametrize(
    "override, message",
    [
        ("+filter.name=upo", r"filter.name='upo' is not a plug-in config .* filters=\[name,...\]"),
        ("+filter.x._target_=orchestrator.filters.nope.Nope", r"filter.x._target_='orchestrator.filters.nope.Nope' cannot be imported"),
        ("+transform.y.alpha=1", r"transform.y=.*no _target_"),
    ],
)
def test_bad_plugin_configs_fail_before_the_run_exists(tmp_path, tiny_checkpoint, override, message):
    from confs import composed

    from orchestrator.recipes import get_recipe

    cfg = composed(["model=local", f"model.path={tiny_checkpoint}", f"run_dir={tmp_path / 'run'}", override])
    with pytest.raises(ConfigError, match=message):
        get_recipe(cfg.recipe).roles(cfg)
    assert not (tmp_path / "run").exists()


# -- transforms ---------------------------------------------------------------------------------
def test_a_transform_builds_and_promotes_a_named_checkpoint_once(local_controller):
    ctl = local_controller("+transform.halve._target_=plugin_fixtures.Halve")
    with ctl.round(1) as rnd:
        rnd.checkpoint("policy", "train", write_checkpoint)
        plugins.apply_transforms(rnd)
        plugins.apply_transforms(rnd)  # a rerun finds it done
    state = manifest(ctl)["rounds"]["1"]
    assert state["policy"] == "halved" and ctl.model_path(1) == state["checkpoints"]["halved"]["path"]
    assert ctl.store.round(1).metrics("transform_halve") == {"halve/done": 1.0}
    assert state["logged"].count("transform_halve") == 1


# -- roles --------------------------------------------------------------------------------------
class FakeEngine:
    def __init__(self):
        self.calls = []

    def sync_weights(self, path, sha256=None):
        self.calls.append(("sync", path, sha256))
        return 0.1

    def release(self, how):
        self.calls.append(("release", how))
        return {"how": how, "seconds": 0.0}

    def shutdown(self):
        self.calls.append(("shutdown",))


def test_roles_serve_release_and_stop_through_one_path(local_controller, tiny_checkpoint):
    ctl = local_controller(f"judge.model={tiny_checkpoint}")  # a judge of its own: a role more
    assert set(ctl.workers.roles) == {"policy", "trainer", "judge", "eval_judge"}
    engines = {name: ctl.workers.attach(name, FakeEngine()) for name in ("policy", "eval_judge")}
    with ctl.round(1) as rnd:
        rnd.checkpoint("policy", "train", write_checkpoint)
    assert ctl.policy(2) is engines["policy"]
    assert engines["policy"].calls == [("sync", ctl.model_path(1), ctl.checkpoint_sha256(1))]
    assert ctl.workers.release_for("trainer") == {}  # on CPU nothing shares an accelerator
    ctl.workers.stop_all()
    assert all(e.calls[-1] == ("shutdown",) for e in engines.values()) and not ctl.workers.live
    with pytest.raises(OrchestratorError, match="no worker role 'rm_a'"):
        ctl.workers.serve("rm_a", "/x")
    with pytest.raises(OrchestratorError, match="task role"):
        ctl.workers.serve("trainer", "/x")


def test_release_for_training_follows_each_roles_setting(local_controller):
    ctl = local_controller("generation.release_for_training=sleep")
    engine = ctl.workers.attach("policy", FakeEngine())
    assert ctl.workers.release_for("trainer") == {"time/release_s": 0.0, "release/slept": 1.0}
    assert engine.calls == [("release", "sleep")]


def test_a_plugin_role_declares_its_resumable_keys(local_controller):
    plugin = ["+filter.rm._target_=plugin_fixtures.WithRewardModel", "+filter.rm.memory=0.2"]
    ctl = local_controller(*plugin)
    assert "rm_a" in ctl.workers.roles
    local_controller(*plugin[:1], "+filter.rm.memory=0.1", "resume=true")  # execution key: accepted
    with pytest.raises(ConfigError, match=r"changed config \(filter.rm.step\)"):
        local_controller(*plugin, "+filter.rm.step=2", "resume=true")


def test_two_roles_with_one_name_are_refused():
    from orchestrator.roles import Role, Workers

    with pytest.raises(ConfigError, match="two workers are declared for role 'policy'"):
        Workers([Role("policy", "task", "a"), Role("policy", "task", "b")], seed=0, start_timeout_s=0)
