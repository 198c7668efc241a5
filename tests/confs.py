"""Configs as conf/ composes them, so tests never restate a default."""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from orchestrator.submit import compose_config


def composed(overrides: Sequence[str] = ()) -> DictConfig:
    """The whole config ``orchestrate`` would run with these command-line overrides."""
    return compose_config(overrides)


def section(name: str, **overrides: Any) -> dict[str, Any]:
    """The default config's ``name`` section as plain dicts, with ``overrides`` merged in (nested dicts merge)."""
    return OmegaConf.to_container(OmegaConf.merge(composed()[name], overrides), resolve=True)
