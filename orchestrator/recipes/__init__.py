"""Recipes: each module reads like its paper's algorithm box.

A recipe is a module ``orchestrator.recipes.<name>`` (``recipe=<name>`` in config) with two
functions: ``roles(cfg) -> list[Role]``, the workers it needs, and ``run(ctl)``, the algorithm.
A new recipe is a new module plus ``conf/experiment/<name>.yaml``; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from orchestrator.errors import ConfigError


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_recipe(name: str) -> ModuleType:
    if name not in available():
        raise ConfigError(f"recipe={name!r} is not known; choose one of: {', '.join(available())}")
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [fn for fn in ("roles", "run") if not callable(getattr(module, fn, None))]
    if missing:
        raise ConfigError(f"recipe={name!r}: orchestrator/recipes/{name}.py defines no {' or '.join(missing)}()")
    return module
