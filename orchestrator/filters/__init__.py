"""Pair filters: the stage between pairing and training.

A filter takes the round's pairs and returns the pairs to train on, each possibly with a
``weight`` / ``epsilon`` for the trainer, plus metrics. ``none`` keeps every pair as it is.
UPO (uncertainty) and CRM (peer review) plug in here.
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.types import Pair

FILTERS = ("none",)


def apply(cfg: dict[str, Any], pairs: list[Pair]) -> tuple[list[Pair], dict[str, float]]:
    name = cfg.get("name", "none")
    if name == "none":
        return list(pairs), {"filter/kept": float(len(pairs)), "filter/dropped": 0.0}
    raise ConfigError(f"filter={name!r} is not known; choose one of: {', '.join(FILTERS)}")
