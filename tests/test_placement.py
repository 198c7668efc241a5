"""Worker placement (orchestrator/placement.py): pure tests, no Ray cluster and no GPU needed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from orchestrator import placement
from orchestrator.errors import ConfigError
from orchestrator.placement import actor_options, make_placement_group, needs_gpu, plan_bundles, release_mode, worker_resources
from orchestrator.submit import compose_config


def _cfg(gen_gpus=0, judge_gpus=0, train_gpus=0, tp=1, cpus=1):
    return OmegaConf.create(
        {
            "generation": {"engine": {"tensor_parallel_size": tp}, "resources": {"num_cpus": cpus, "num_gpus": gen_gpus}},
            "judge": {"resources": {"num_cpus": cpus, "num_gpus": judge_gpus}},
            "train": {"resources": {"num_cpus": cpus, "num_gpus": train_gpus}},
        }
    )


def test_default_config_asks_for_no_gpu():
    cfg = compose_config([])
    for kind in ("generation", "judge", "train"):
        opts = actor_options(cfg[kind].resources, tensor_parallel_size=cfg.generation.engine.tensor_parallel_size)
        assert opts == {"num_cpus": 1}, kind
    assert not needs_gpu(cfg)
    assert all("GPU" not in bundle for _, bundle in plan_bundles(cfg))


def test_cpu_makes_no_placement_group(monkeypatch):
    import ray.util

    def boom(*a, **k):
        raise AssertionError("a placement group was requested on CPU")

    monkeypatch.setattr(ray.util, "placement_group", boom)
    assert make_placement_group(compose_config([])) is None


def test_gpu_options_and_fractions():
    assert actor_options({"num_cpus": 2, "num_gpus": 1}) == {"num_cpus": 2, "num_gpus": 1}
    assert actor_options({"num_cpus": 1, "num_gpus": 0.5}) == {"num_cpus": 1, "num_gpus": 0.5}
    # tensor parallelism: one GPU per shard, inside the generation actor
    assert actor_options({"num_cpus": 1, "num_gpus": 1}, tensor_parallel_size=4)["num_gpus"] == 4
    # ... but it never turns a CPU worker into a GPU one
    assert "num_gpus" not in actor_options({"num_cpus": 1, "num_gpus": 0}, tensor_parallel_size=4)
    # missing keys: one CPU, no GPU
    assert actor_options(None) == {"num_cpus": 1}


@pytest.mark.parametrize("bad", [{"num_gpus": -1}, {"num_cpus": "many"}])
def test_bad_resources_name_the_key(bad):
    with pytest.raises(ConfigError, match="train.resources"):
        worker_resources(bad, name="train.resources")


def test_plan_bundles_for_a_multi_gpu_setup():
    cfg = _cfg(gen_gpus=1, train_gpus=1, tp=2)
    assert needs_gpu(cfg)
    assert plan_bundles(cfg) == [
        ("generation", {"CPU": 1, "GPU": 2}),
        ("judge", {"CPU": 1}),
        ("train", {"CPU": 1, "GPU": 1}),
    ]
    assert plan_bundles(cfg, kinds=("generation", "train")) == [("generation", {"CPU": 1, "GPU": 2}), ("train", {"CPU": 1, "GPU": 1})]
    # a kind that asks for nothing gets no bundle (Ray refuses empty bundles)
    assert plan_bundles(_cfg(gen_gpus=1, cpus=0)) == [("generation", {"GPU": 1})]


class _FakePG:
    def __init__(self, bundles, strategy):
        self.bundle_specs, self.strategy = bundles, strategy

    def ready(self):
        return "ready-ref"


def test_make_placement_group_on_gpu(monkeypatch):
    import ray
    import ray.util

    made, removed = [], []

    def fake_pg(bundles, strategy="PACK", name=""):
        made.append(_FakePG(bundles, strategy))
        return made[-1]

    monkeypatch.setattr(ray.util, "placement_group", fake_pg)
    monkeypatch.setattr(ray.util, "remove_placement_group", removed.append)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))

    cfg = _cfg(gen_gpus=1, train_gpus=1)
    wp = make_placement_group(cfg, kinds=("generation", "train"))
    assert made[0].strategy == "PACK"
    assert made[0].bundle_specs == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert wp.bundle_index == {"generation": 0, "train": 1}

    opts = actor_options(cfg.train.resources, placement=wp, kind="train")
    strategy = opts["scheduling_strategy"]
    assert strategy.placement_group is made[0] and strategy.placement_group_bundle_index == 1
    assert opts["num_gpus"] == 1

    # strategy from the argument or cluster.placement_strategy; a bad one is a config error
    make_placement_group(cfg, strategy="strict_pack")
    assert made[-1].strategy == "STRICT_PACK"
    with pytest.raises(ConfigError, match="placement_strategy"):
        make_placement_group(OmegaConf.merge(cfg, {"cluster": {"placement_strategy": "ANYWHERE"}}))

    # a cluster that cannot fit the bundles: a clear error, and the group is given back
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: ([], refs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match="cannot place the workers"):
        make_placement_group(cfg, timeout_s=0.1)
    assert removed and removed[-1] is made[-1]


@pytest.mark.parametrize(
    "setting, gen, train, have, expected",
    [
        ("auto", 0, 0, 0, "none"),  # CPU: nothing to free
        ("auto", 1, 0, 1, "none"),  # the trainer runs on CPU
        ("auto", 1, 1, 2, "none"),  # a GPU each
        ("auto", 0.5, 0.5, 1, "sleep"),  # one GPU shared in turn, both actors placed
        ("auto", 1, 1, 1, "shutdown"),  # the trainer cannot be placed beside the policy
        ("sleep", 0, 0, 0, "sleep"),  # explicit settings are kept
        ("NONE", 1, 1, 1, "none"),
    ],
)
def test_release_mode(setting, gen, train, have, expected):
    assert release_mode(setting, gen, train, have) == expected


def test_release_mode_refuses_unknown():
    with pytest.raises(ConfigError, match="generation.release_for_training"):
        release_mode("hibernate", 1, 1, 1)
