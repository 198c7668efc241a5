"""Recipes: each module reads like its paper's algorithm box and exposes ``run(ctl)``."""

from __future__ import annotations

import importlib
from typing import Callable

from orchestrator.errors import ConfigError

RECIPES = ("self_reward",)


def get_recipe(name: str) -> Callable:
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not known; choose one of: {', '.join(RECIPES)}")
    return importlib.import_module(f"orchestrator.recipes.{name}").run
