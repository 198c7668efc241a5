"""Stage plug-ins: pair filters (between pairing and training) and checkpoint transforms (after
training), chosen in config and chained in order.

A plug-in is a class named by ``_target_`` in its config file; the config's other keys are its
constructor arguments (Hydra's ``instantiate``). Selecting plug-ins is a Hydra multi-select, and
each file puts its keys under its own name, so order and settings both come from the command line::

    conf/filters/upo.yaml        # @package filter.upo
                                 _target_: orchestrator.filters.upo.UPOFilter
    orchestrate +experiment=self_reward filters=[upo,crm] filter.crm.noise_rate=0.3
    orchestrate +experiment=self_reward filters=[]              # no filter: every pair trains

A filter is called as ``filter(ctx, pairs) -> (pairs, metrics)``; a transform as
``transform(ctx) -> metrics`` and builds (and may promote) named checkpoints of the round through
``ctx.round.checkpoint`` / ``ctx.round.promote``. ``ctx`` (``StageContext``) gives the workers
by role, the round (its directory, index, checkpoints), an rng seeded by run, round and plug-in,
and the whole config. Each filter's output is a resumable stage file ``filter_<name>.jsonl``; the
chain's result is ``train_pairs.jsonl``. A plug-in that needs workers of its own declares them
with a ``roles(cls, cfg, name)`` classmethod; their execution keys are then resumable.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig

from orchestrator.config import to_plain
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.store import write_json, write_jsonl
from orchestrator.types import Pair

if TYPE_CHECKING:
    from orchestrator.controller import Controller, Round
    from orchestrator.roles import Role, Workers

# Plug-in kinds: the config node that holds the chosen ones, and the group that selects them.
KINDS = {"filter": "filters", "transform": "transforms"}


@dataclass
class StageContext:
    """What a plug-in may use: workers by role, the round, its own rng, the config."""

    name: str
    round: "Round"
    rng: random.Random

    @property
    def ctl(self) -> "Controller":
        return self.round.ctl

    @property
    def workers(self) -> "Workers":
        return self.round.ctl.workers

    @property
    def cfg(self) -> DictConfig:
        return self.round.ctl.cfg

    def file(self, suffix: str) -> Path:
        """A file of this plug-in in the round's directory: ``<name>_<suffix>``."""
        return self.round.dir.path / f"{self.name}_{suffix}"

    def record_decisions(self, decisions: list["Decision"]) -> Path:
        """Every pair's fate (kept or dropped, why, its scores) as ``<name>_decisions.jsonl``, logged to MLflow.

        Written before the filter's stage file, so a finished stage always has its decisions beside it.
        """
        path = write_jsonl_file(self.file("decisions.jsonl"), [d.to_dict() for d in decisions])
        self.ctl.tracker.log_round_artifact(self.round.index, path, "filters")
        return path

    def histogram(self, series: dict[str, list[float]], xlabel: str, title: str, suffix: str = "scores.png") -> Path:
        """A PNG histogram of one or more score series (overlaid), logged to the round's MLflow run."""
        from orchestrator.eval.plot import save_png

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, values in series.items():
            if values:
                ax.hist(values, bins=20, alpha=0.6, label=f"{label} (n={len(values)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pairs")
        ax.set_title(f"round {self.round.index}: {title}")
        if any(series.values()):
            ax.legend(fontsize=8)
        path = save_png(fig, self.file(suffix))
        self.ctl.tracker.log_round_artifact(self.round.index, path, "filters")
        return path


@dataclass
class Decision:
    """One pair's fate in a filter: its place in the round, kept or not, the reason, the filter's scores."""

    prompt_id: str
    chosen_index: int
    rejected_index: int
    kept: bool
    reason: str  # "kept", or why it was dropped ("estimator_disagrees", "not_sampled", ...)
    scores: dict[str, float]
    flipped: bool | None = None  # planted-noise runs only: the pair's label was swapped on purpose

    @classmethod
    def of(cls, pair: Pair, kept: bool, reason: str, **scores: float) -> "Decision":
        flipped = pair.meta.get("planted_flip")
        return cls(pair.prompt_id, pair.chosen_index, pair.rejected_index, kept, reason,
                   {k: float(v) for k, v in scores.items()}, None if flipped is None else bool(flipped))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PairFilter(Protocol):
    def __call__(self, ctx: StageContext, pairs: list[Pair]) -> tuple[list[Pair], dict[str, float]]: ...


class Transform(Protocol):
    def __call__(self, ctx: StageContext) -> dict[str, float]: ...


def _target_class(kind: str, name: str, node: Any) -> type:
    from hydra.utils import get_class

    where = f"{kind}.{name}"
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"{where}={node!r} is not a plug-in config (no _target_); choose {kind}s with "
            f"{KINDS[kind]}=[name,...] from conf/{KINDS[kind]}/"
        )
    try:
        return get_class(str(node["_target_"]))
    except Exception as exc:  # ImportError, AttributeError, or Hydra's wrapper of them
        raise ConfigError(f"{where}._target_={node['_target_']!r} cannot be imported ({str(exc).splitlines()[0]})") from None


def chosen(cfg: Any, kind: str) -> dict[str, dict[str, Any]]:
    """The chosen plug-ins of ``kind`` in chain order, as {name: config}; each target is importable."""
    node = to_plain(cfg.get(kind)) if kind in cfg else {}
    if not isinstance(node, dict):
        raise ConfigError(f"{kind}={node!r}: choose {kind}s with {KINDS[kind]}=[name,...] from conf/{KINDS[kind]}/")
    for name, spec in node.items():
        _target_class(kind, name, spec)
    return node


def build(kind: str, name: str, spec: dict[str, Any]) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"{kind}.{name}: {cause}") from None


def write_jsonl_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    write_jsonl(path, rows)
    return path


def roles(cfg: Any) -> list["Role"]:
    """Worker roles the chosen plug-ins declare (``roles(cfg, name)`` classmethod)."""
    out: list[Role] = []
    for kind in KINDS:
        for name, spec in chosen(cfg, kind).items():
            cls = _target_class(kind, name, spec)
            if hasattr(cls, "roles"):
                out += cls.roles(cfg, name)
    return out


def context(rnd: "Round", name: str) -> StageContext:
    return StageContext(name=name, round=rnd, rng=rnd.ctl.rng(rnd.index, f"plugin/{name}"))


def filter_pairs(rnd: "Round", pairs: list[Pair]) -> list[Pair]:
    """The chosen filters in order, each a resumable stage; the result is the ``train_pairs`` stage.

    A filter that keeps no pair stops the round: training on nothing is never what was meant.
    """
    total = len(pairs)
    for name, spec in chosen(rnd.ctl.cfg, "filter").items():
        pairs = rnd.stage(f"filter_{name}", Pair, lambda n=name, s=spec, inp=pairs: _run_filter(rnd, n, s, inp))
    return rnd.stage(
        "train_pairs", Pair,
        lambda: (list(pairs), {"filter/kept": float(len(pairs)), "filter/dropped": float(total - len(pairs))}),
    )


def _run_filter(rnd: "Round", name: str, spec: dict[str, Any], pairs: list[Pair]) -> tuple[list[Pair], dict[str, float]]:
    plugin: PairFilter = build("filter", name, spec)
    kept, metrics = plugin(context(rnd, name), pairs)
    if pairs and not kept:
        numbers = ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items()))
        raise OrchestratorError(f"round {rnd.index}: filter {name} kept 0 of {len(pairs)} pairs ({numbers})")
    return kept, metrics


def apply_transforms(rnd: "Round") -> None:
    """The chosen transforms in order (after training); each logs its metrics as stage ``transform_<name>``."""
    for name, spec in chosen(rnd.ctl.cfg, "transform").items():
        stage = f"transform_{name}"
        if not rnd.dir.metrics_file(stage).exists():  # written last and atomically: it marks the transform done
            plugin: Transform = build("transform", name, spec)
            write_json(rnd.dir.metrics_file(stage), plugin(context(rnd, name)))
        rnd.log_stage(stage)
