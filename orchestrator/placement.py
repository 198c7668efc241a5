"""Where workers run: Ray actor options from each worker kind's ``resources`` config, and an
optional placement group for GPU setups.

Every worker kind states what one worker needs::

    generation.resources: {num_cpus: 1, num_gpus: 0}     # + generation.engine.tensor_parallel_size
    judge.resources:      {num_cpus: 1, num_gpus: 0}
    train.resources:      {num_cpus: 1, num_gpus: 0}

* CPU (every ``num_gpus`` is 0, the default): actors ask for CPUs only and no placement group is
  made, so nothing ever waits for a GPU that is not there.
* One GPU shared in turn: give each kind ``num_gpus: 1`` and let the controller release the
  generation engine before training (the two never hold the GPU at once); or give fractions
  (``0.5`` + ``0.5``) when both must stay alive on the same GPU.
* Several GPUs: :func:`make_placement_group` reserves one bundle per worker kind, packed on as few
  nodes as possible (``PACK``; ``STRICT_PACK`` = one node), so that generation and training get
  GPUs of their own; :func:`actor_options` with ``placement=`` pins each actor to its bundle.

* Several nodes: ``resources.custom`` asks for Ray custom resources, which pin a worker to the nodes
  that offer them (``ray start --resources='{"gen_node": 1}'``), e.g. generation on one node and
  training on another: ``+generation.resources.custom.gen_node=1 +train.resources.custom.train_node=1``.

vLLM's tensor parallelism runs inside the generation actor (vLLM's multiprocessing executor), so
that actor asks for ``tensor_parallel_size`` GPUs when it asks for any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from orchestrator.errors import ConfigError

WORKER_KINDS = ("generation", "judge", "train")
RELEASE_MODES = ("auto", "sleep", "shutdown", "none")
STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg.a.b`` for a DictConfig, a dict or None, with a default for missing keys."""
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[part] if isinstance(node, Mapping) or hasattr(node, "keys") else getattr(node, part)
        except (KeyError, AttributeError):
            return default
        except Exception:  # omegaconf: missing value (???) and the like
            return default
    return default if node is None else node


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return number


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def custom_resources(resources_cfg: Any, *, name: str = "resources") -> dict[str, float]:
    """``resources.custom`` (Ray custom resources by name, e.g. ``{gen_node: 1}``) as numbers; {} if unset."""
    custom = _get(resources_cfg, "custom", None) or {}
    if not isinstance(custom, Mapping) and not hasattr(custom, "items"):
        raise ConfigError(f"{name}.custom={custom!r} is invalid: a mapping of Ray resource name to amount")
    out = {}
    for key, value in custom.items():
        if str(key) in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"{name}.custom.{key}={value!r} is invalid: a custom resource name (CPU and GPU are num_cpus / num_gpus)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{name}.custom.{key}={value!r} is invalid: an amount >= 0")
        out[str(key)] = _int_if_whole(float(value))
    return {k: v for k, v in out.items() if v > 0}


def worker_resources(resources_cfg: Any, *, tensor_parallel_size: int = 1, name: str = "resources") -> dict[str, float]:
    """``{"CPU": n, "GPU": g}`` for one worker; GPU is left out when it is 0.

    ``tensor_parallel_size`` > 1 raises a non-zero GPU request to at least that many GPUs (one
    per shard); it never turns a CPU worker into a GPU one.
    """
    num_cpus = _number(_get(resources_cfg, "num_cpus", 1), f"{name}.num_cpus")
    num_gpus = _number(_get(resources_cfg, "num_gpus", 0), f"{name}.num_gpus")
    tp = int(tensor_parallel_size or 1)
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
    if num_gpus > 0 and tp > 1 and tp > num_gpus:
        num_gpus = float(tp)
    out: dict[str, float] = {"CPU": _int_if_whole(num_cpus)}
    if num_gpus > 0:
        out["GPU"] = _int_if_whole(num_gpus)
    return out


@dataclass
class WorkerPlacement:
    """A ready placement group and which bundle each worker kind uses."""

    placement_group: Any
    bundle_index: dict[str, int] = field(default_factory=dict)
    strategy: str = "PACK"

    def remove(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.placement_group)


def actor_options(
    resources_cfg: Any,
    *,
    tensor_parallel_size: int = 1,
    placement: WorkerPlacement | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Options for ``ActorClass.options(**opts)``: ``num_cpus``, and ``num_gpus`` only when > 0.

    With ``placement`` (from :func:`make_placement_group`) and the worker ``kind``, the actor is
    scheduled into that kind's bundle.
    """
    res = worker_resources(resources_cfg, tensor_parallel_size=tensor_parallel_size, name=kind or "resources")
    opts: dict[str, Any] = {"num_cpus": res["CPU"]}
    if "GPU" in res:
        opts["num_gpus"] = res["GPU"]
    custom = custom_resources(resources_cfg, name=kind or "resources")
    if custom:
        opts["resources"] = custom
    if placement is not None and kind is not None and kind in placement.bundle_index:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement.placement_group,
            placement_group_bundle_index=placement.bundle_index[kind],
            placement_group_capture_child_tasks=True,
        )
    return opts


def plan_bundles(cfg: Any, kinds: tuple[str, ...] | list[str] = WORKER_KINDS) -> list[tuple[str, dict[str, float]]]:
    """One ``(kind, bundle)`` per worker kind that asks for anything (pure; no Ray needed)."""
    plan = []
    for kind in kinds:
        tp = _get(cfg, "generation.engine.tensor_parallel_size", 1) if kind == "generation" else 1
        res = _get(cfg, f"{kind}.resources")
        bundle = worker_resources(res, tensor_parallel_size=tp, name=f"{kind}.resources")
        bundle = {k: v for k, v in {**bundle, **custom_resources(res, name=f"{kind}.resources")}.items() if v > 0}
        if bundle:
            plan.append((kind, bundle))
    return plan


def needs_gpu(cfg: Any, kinds: tuple[str, ...] | list[str] = WORKER_KINDS) -> bool:
    return any("GPU" in bundle for _, bundle in plan_bundles(cfg, kinds))


def make_placement_group(
    cfg: Any,
    kinds: tuple[str, ...] | list[str] = WORKER_KINDS,
    *,
    strategy: str | None = None,
    timeout_s: float = 300.0,
) -> WorkerPlacement | None:
    """Reserve one bundle per worker kind when any kind asks for a GPU; ``None`` on CPU.

    ``kinds``: the worker kinds that run as actors of their own at the same time (leave out
    ``judge`` when the policy judges itself on the generation engine). ``strategy``: default
    ``cluster.placement_strategy`` or ``PACK``. Needs ``ray.init`` first; raises ``ConfigError``
    when the cluster cannot fit the bundles within ``timeout_s``.
    """
    plan = plan_bundles(cfg, kinds)
    if not any("GPU" in bundle for _, bundle in plan):
        return None
    strategy = str(strategy or _get(cfg, "cluster.placement_strategy", "PACK")).upper()
    if strategy not in STRATEGIES:
        raise ConfigError(f"cluster.placement_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")

    import ray
    from ray.util import placement_group, remove_placement_group

    bundles = [bundle for _, bundle in plan]
    pg = placement_group(bundles, strategy=strategy, name="orchestrator-workers")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        total = ray.cluster_resources()
        raise ConfigError(
            f"the cluster cannot place the workers ({strategy} {bundles}) within {timeout_s:.0f}s; "
            f"it has CPU={total.get('CPU', 0)} GPU={total.get('GPU', 0)}: lower "
            f"generation/judge/train.resources.num_gpus or add GPUs"
        )
    return WorkerPlacement(pg, {kind: i for i, (kind, _) in enumerate(plan)}, strategy)


def release_mode(setting: Any, generation_gpus: float, train_gpus: float, cluster_gpus: float) -> str:
    """What the policy engine does before training (``generation.release_for_training``).

    An explicit ``sleep`` / ``shutdown`` / ``none`` is kept. ``auto``: ``none`` on CPU and when
    generation and training get whole GPUs of their own; ``sleep`` when they share a GPU by
    fractions (both actors fit, the engine frees its memory); ``shutdown`` when both cannot be
    placed at once (e.g. 1 + 1 on one GPU), so the policy actor must end to let the trainer in.
    """
    mode = str(setting or "none").lower()
    if mode not in RELEASE_MODES:
        raise ConfigError(f"generation.release_for_training={setting!r} is invalid: one of {', '.join(RELEASE_MODES)}")
    if mode != "auto":
        return mode
    if not (generation_gpus and train_gpus):
        return "none"
    if math.ceil(generation_gpus) + math.ceil(train_gpus) <= cluster_gpus:
        return "none"
    return "sleep" if generation_gpus + train_gpus <= cluster_gpus else "shutdown"
