"""Every experiment file and every plug-in file composes, validates and resolves to real code, so a
broken YAML fails here rather than in a user's run (as lightning-hydra-template's test_configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from orchestrator import plugins
from orchestrator.config import CONF_DIR, validate
from orchestrator.recipes import available, get_recipe
from orchestrator.roles import resumable_keys

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PLUGINS = [(kind, p.stem) for kind, group in plugins.KINDS.items() for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_there_is_something_to_check():
    assert "self_reward" in EXPERIMENTS and ("filter", "rip") in PLUGINS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_resolves(name):
    cfg = compose_with(f"+experiment={name}")
    validate(cfg)
    recipe = get_recipe(cfg.recipe)
    assert cfg.recipe in available()
    roles = recipe.roles(cfg)
    assert "policy" in {r.name for r in roles}
    for key in resumable_keys(roles):
        top = key.split(".")[0]
        assert top in cfg, f"{name}: resumable key {key} names no config section"


@pytest.mark.parametrize("kind, name", PLUGINS)
def test_plugin_file_composes_into_its_own_key_and_builds(kind, name):
    cfg = compose_with("+experiment=self_reward", f"{plugins.KINDS[kind]}=[{name}]")
    validate(cfg)
    chosen = plugins.chosen(cfg, kind)
    assert list(chosen) == [name]
    built = plugins.build(kind, name, chosen[name])
    assert callable(built)


def test_an_unknown_recipe_is_named():
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe='nope' is not known; choose one of: .*self_reward"):
        get_recipe("nope")


def test_default_and_paper_self_reward_differ_only_where_the_docs_say():
    from orchestrator.data import load_prompts

    default, paper = compose_with("+experiment=self_reward"), compose_with("+experiment=self_reward_paper")
    # The default's prompts are the shipped IF training prompts wherever the run starts from.
    assert Path(default.data.prompts).is_absolute() and Path(default.data.prompts).name == "if_train_prompts.jsonl"
    assert len(load_prompts(default.data.prompts)) == 480
    assert default.judge.kind == "hybrid" and paper.judge.get("kind") is None and paper.data.prompts is None
    assert (paper.train.learning_rate, paper.train.batch_size, paper.train.dropout, paper.train.nll_weight) == (1e-6, 16, 0.1, 0.0)
    assert (default.train.learning_rate, default.train.batch_size, default.train.dropout, default.train.nll_weight) == (5e-5, 4, 0.0, 1.0)
    # The method itself is the paper's in both.
    for cfg in (default, paper):
        assert (cfg.generation.n, cfg.generation.temperature, cfg.train.beta, cfg.judge.model) == (4, 0.7, 0.1, "policy")


def test_package_data_names_a_shipped_file_or_fails_with_the_list():
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from orchestrator.config import package_data
    from orchestrator.errors import ConfigError

    cfg = OmegaConf.create({"ok": "${package_data:eval_prompts.jsonl}", "bad": "${package_data:../config.py}"})
    assert Path(cfg.ok).is_file()
    with pytest.raises(InterpolationResolutionError, match=r"no such file in the package \(shipped: .*seed_prompts.jsonl"):
        _ = cfg.bad
    with pytest.raises(ConfigError, match="if_train_prompts.jsonl"):
        package_data("nope.jsonl")
