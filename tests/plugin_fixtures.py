"""Plug-ins used by the tests (selected with +filter.NAME._target_=plugin_fixtures.CLASS)."""

from __future__ import annotations

from dataclasses import replace

from conftest import write_checkpoint

from orchestrator.roles import Role
from orchestrator.types import Pair


class KeepEvery:
    """Keeps every ``step``-th pair and records the chain order in ``meta["seen_by"]``."""

    def __init__(self, step: int = 1):
        self.step = int(step)

    def __call__(self, ctx, pairs: list[Pair]):
        kept = [replace(p, meta={**p.meta, "seen_by": [*p.meta.get("seen_by", []), ctx.name]}) for p in pairs[:: self.step]]
        return kept, {f"{ctx.name}/kept": float(len(kept)), "rng": ctx.rng.random()}


class DropAll:
    def __call__(self, ctx, pairs):
        return [], {"dropall/in": float(len(pairs))}


class WithRewardModel(KeepEvery):
    """Declares a worker role of its own, whose memory share may change on resume."""

    @classmethod
    def roles(cls, cfg, name):
        return [Role("rm_a", "task", f"filter.{name}", {"num_cpus": 0}, resumable=(f"filter.{name}.memory",))]


class Halve:
    """A checkpoint transform: a named checkpoint from the trained one, promoted to the next policy."""

    def __call__(self, ctx):
        ctx.round.checkpoint("halved", "transform_build", lambda out: write_checkpoint(out, 0.5))
        ctx.round.promote("halved")
        return {"halve/done": 1.0}
