"""Workers by role: what each worker is, where it runs, and one way to start and end them all.

A *role* names a worker by what it does in the algorithm (``policy``, ``judge``, ``eval_judge``,
``trainer``; plug-ins add their own, e.g. ``rm_a``, ``rm_b`` for CRM's two reward models). It
says which kind of worker it is, its Ray resources, its engine settings, what it does when a
trainer needs its GPU, and which of its config keys only change *how* it runs (so a resumed run
may change them). Roles are declared where they are defined: the core ones below, the eval
judge in ``orchestrator.eval``, a plug-in's in its class; ``Controller`` collects them.

``Workers`` holds the live workers by role:

- ``serve(role, path)``: a long-lived worker (a vLLM engine, an endpoint client) serving
  ``path``; started on first use, given new weights after (``sync_weights``, checksum checked);
  a role declared with ``engine_of`` has no engine of its own and is served on that role's;
- ``run(role, cls, method, ...)``: a task role (the trainer): a fresh actor for one call, ended
  after it, so its memory is back before the next stage;
- ``hold(role, cls, ...)``: a task actor kept for several calls (CRM's two peers step in lockstep),
  ended when the ``with`` block ends;
- ``release_for(role)``: engines that share an accelerator with that task make room first;
- ``stop(role)`` / ``stop_all()``: the one teardown path.

``call(worker, method, ...)`` reaches a Ray actor or a local object alike, so tests drive the
same code with in-process workers (``attach``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import ray

from orchestrator.config import to_plain
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.placement import WorkerPlacement, actor_options, make_placement_group, release_mode, worker_resources

log = logging.getLogger(__name__)

KINDS = ("vllm", "endpoint", "task")

# Run-level keys a resume may change: where the run lives and how many rounds it has. Each role
# adds its own execution keys (see ``Role.resumable``).
RUN_RESUMABLE = ("rounds", "resume", "tracking.uri", "cluster", "run_dir", "storage")

# vLLM engine settings that change how an engine runs, never what it computes.
ENGINE_EXECUTION_KEYS = (
    "gpu_memory_utilization", "max_num_seqs", "threads", "cpu_reserved_cores", "cpu_bind", "enable_sleep_mode",
    "enforce_eager",
)  # fmt: skip

# Endpoint client settings that change how requests are made, never what is asked (workers/endpoint.py).
ENDPOINT_EXECUTION_KEYS = ("timeout_s", "max_retries", "backoff_s", "max_backoff_s", "concurrency")


def endpoint_resumable(section: str) -> tuple[str, ...]:
    """The keys of an endpoint role under ``section`` that a resume may change."""
    return (f"{section}.resources", *(f"{section}.endpoint.{k}" for k in ENDPOINT_EXECUTION_KEYS))


def call(worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a worker method whether the worker is a Ray actor handle or a local object."""
    fn = getattr(worker, method)
    if hasattr(fn, "remote"):
        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


def call_each(calls: Iterable[tuple[Any, str, tuple[Any, ...]]]) -> list[Any]:
    """``call`` for several workers at once: Ray actors all start before any result is awaited, so they
    run in parallel; local objects run one after another. Results in the order given."""
    pending = []
    for worker, method, args in calls:
        fn = getattr(worker, method)
        pending.append((True, fn.remote(*args)) if hasattr(fn, "remote") else (False, fn(*args)))
    return [ray.get(value) if remote else value for remote, value in pending]


@dataclass(frozen=True)
class Role:
    """One worker of the run, as the config describes it."""

    name: str
    kind: str  # vllm | endpoint | task
    section: str  # the config section it comes from, named in errors ("generation", "eval.judge", ...)
    resources: Mapping[str, Any] = field(default_factory=dict)
    engine: Mapping[str, Any] = field(default_factory=dict)  # vLLM engine arguments
    endpoint: Mapping[str, Any] = field(default_factory=dict)  # OpenAI-compatible server settings
    # What a vLLM role does when a task needs the accelerator it shares: auto | sleep | shutdown | none.
    release: str = "none"
    # The placement-group bundle it runs in when GPUs are reserved together (None: no bundle).
    bundle: str | None = None
    # Config keys that may change on resume: execution only (memory, resources, threads).
    resumable: tuple[str, ...] = ()
    # A vLLM role served on another vLLM role's engine (that role's name), its checkpoint swapped in
    # with ``sync_weights`` whenever it is asked for: several checkpoints on one engine (ALMA's
    # generators and judge on a CPU host). None: an engine of its own.
    engine_of: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{self.section}: worker kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.engine_of is not None and (self.kind != "vllm" or self.engine_of == self.name):
            raise ConfigError(f"{self.section}: role {self.name!r} can share only another role's vLLM engine")

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine.get("tensor_parallel_size") or 1)

    @property
    def gpus(self) -> float:
        return float(worker_resources(self.resources, name=f"{self.section}.resources").get("GPU", 0))


def vllm_role(name: str, section: str, cfg: Any, *, engine: Mapping[str, Any], resources: Any, **kw: Any) -> Role:
    """A vLLM role whose engine execution keys and resources are resumable under ``section``."""
    resumable = (f"{section}.resources", *(f"{section}.engine.{k}" for k in ENGINE_EXECUTION_KEYS))
    return Role(name, "vllm", section, to_plain(resources), dict(engine), resumable=resumable + kw.pop("resumable", ()), **kw)


def core_roles(cfg: Any) -> list[Role]:
    """The policy's engine, the judge (when it is not the policy) and the trainer."""
    engine = to_plain(cfg.generation.engine)
    roles = [
        vllm_role(
            "policy", "generation", cfg, engine=engine, resources=cfg.generation.resources,
            release=str(cfg.generation.release_for_training), bundle="generation",
            resumable=("generation.start_timeout_s", "generation.release_for_training"),
        ),
        Role(
            "trainer", "task", "train", to_plain(cfg.train.resources), bundle="train",
            resumable=("train.resources", "train.threads", "train.micro_batch_size"),
        ),
    ]
    judge = cfg.judge
    if judge.endpoint.base_url:
        roles.append(Role("judge", "endpoint", "judge", to_plain(judge.resources), endpoint=to_plain(judge.endpoint),
                          resumable=endpoint_resumable("judge")))
    elif str(judge.model) != "policy":
        roles.append(vllm_role("judge", "judge", cfg, engine={**engine, **to_plain(judge.engine)},
                               resources=judge.resources, bundle="judge"))
    return roles


def resumable_keys(roles: Iterable[Role]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*RUN_RESUMABLE, *(k for r in roles for k in r.resumable)]))


class Workers:
    """The live workers of a run, by role."""

    def __init__(self, roles: Iterable[Role], *, seed: int, start_timeout_s: float):
        self.roles: dict[str, Role] = {}
        for role in roles:
            if role.name in self.roles:
                raise ConfigError(f"two workers are declared for role {role.name!r} ({self.roles[role.name].section}, {role.section})")
            self.roles[role.name] = role
        for role in self.roles.values():
            host = self.roles.get(role.engine_of) if role.engine_of else None
            if role.engine_of and (host is None or host.kind != "vllm" or host.engine_of):
                raise ConfigError(
                    f"{role.section}: role {role.name!r} is served on role {role.engine_of!r}'s engine, which is not a "
                    f"declared vLLM role with an engine of its own"
                )
        self.seed = int(seed)
        self.start_timeout_s = float(start_timeout_s or 0)
        self.live: dict[str, Any] = {}
        self.placement: WorkerPlacement | None = None
        # Tests set this: task roles then run as plain objects in this process (no Ray), like ``attach``.
        self.in_process = False

    def role(self, name: str) -> Role:
        try:
            return self.roles[name]
        except KeyError:
            raise OrchestratorError(f"no worker role {name!r} is declared (declared: {', '.join(self.roles)})") from None

    # -- placement ---------------------------------------------------------------------
    def reserve(self, cfg: Any) -> None:
        """Reserve GPUs for roles that run at the same time (one placement-group bundle each).

        Nothing on CPU, and nothing when the policy engine makes room for the trainer in turn.
        """
        bundles = [r.bundle for r in self.roles.values() if r.bundle and r.gpus > 0]
        if bundles and self.release_mode("policy", "trainer") == "none":
            self.placement = make_placement_group(cfg, [r.bundle for r in self.roles.values() if r.bundle])

    def release_mode(self, name: str, task: str) -> str:
        """What role ``name`` does before task role ``task`` runs (``placement.release_mode``)."""
        if name not in self.roles or task not in self.roles:
            return "none"
        role, other = self.roles[name], self.roles[task]
        have = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return release_mode(role.release, role.gpus, other.gpus, have)

    def _actor(self, role: Role, cls: type, *args: Any) -> Any:
        opts = actor_options(role.resources, tensor_parallel_size=role.tensor_parallel_size, placement=self.placement, kind=role.bundle)
        return ray.remote(cls).options(**opts).remote(*args)

    # -- long-lived workers ------------------------------------------------------------
    def attach(self, name: str, worker: Any) -> Any:
        """Use ``worker`` (any object with the role's methods) as role ``name``'s worker."""
        self.role(name)
        self.live[name] = worker
        return worker

    def serve(self, name: str, path: str | None = None, sha256: str | None = None) -> Any:
        """Role ``name``'s worker, serving checkpoint ``path`` (endpoints serve their own model); a
        role with ``engine_of`` is its host role's engine, now serving ``path``."""
        role = self.role(name)
        if role.engine_of:
            return self.serve(role.engine_of, path, sha256)
        worker = self.live.get(name)
        if role.kind == "endpoint":
            if worker is None:
                from workers.endpoint import EndpointWorker

                worker = self.live[name] = EndpointWorker(dict(role.endpoint), f"{role.section}.endpoint")
            return worker
        if role.kind != "vllm":
            raise OrchestratorError(f"role {name!r} is a {role.kind} role; it has no engine to serve a model")
        if path is None:
            raise OrchestratorError(f"role {name!r}: which checkpoint to serve was not given")
        if worker is None:
            from workers.vllm_worker import VLLMWorker

            worker = self.live[name] = self._started(self._actor(role, VLLMWorker, path, dict(role.engine), self.seed), role)
        else:
            seconds = call(worker, "sync_weights", path, sha256)
            if seconds:  # in place, or waking from sleep / rebuilding after a release
                log.info("%s engine now serves %s (%.2fs)", name, path, seconds)
        return worker

    def _started(self, actor: Any, role: Role) -> Any:
        """``actor`` once it is up; a clear error if it is not within the start timeout.

        An engine that cannot be placed (no free GPU) or whose worker process died while
        starting would otherwise leave the round waiting forever.
        """
        what = f"the {role.name} role's vLLM engine ({role.section})"
        try:
            ray.get(actor.info.remote(), timeout=self.start_timeout_s or None)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise OrchestratorError(
                f"{what} did not start within {self.start_timeout_s:.0f}s (generation.start_timeout_s): the cluster may "
                f"lack the resources it asks for, or the engine hung while starting; see the worker logs above"
            ) from None
        except ray.exceptions.RayActorError as exc:
            cause = str(exc).strip().splitlines()[-1][:300]
            raise OrchestratorError(
                f"{what} failed to start ({cause}); the engine's ERROR lines above give the reason. On CPU, "
                f"'less than requested memory for kv' means its gpu_memory_utilization share is too small for the "
                f"weights plus a KV cache, or other processes hold the memory"
            ) from None
        return actor

    # -- tasks -------------------------------------------------------------------------
    def run(self, name: str, cls: type, method: str, *args: Any) -> Any:
        """``cls(...).method(*args)`` in a fresh actor of task role ``name``, ended after the call."""
        with self.hold(name, cls) as worker:
            return call(worker, method, *args)

    @contextmanager
    def hold(self, name: str, cls: type, *init_args: Any) -> Iterator[Any]:
        """A fresh ``cls(*init_args)`` of task role ``name`` for the ``with`` block (``call`` its methods)."""
        role = self.role(name)
        if role.kind != "task":
            raise OrchestratorError(f"role {name!r} is a {role.kind} role, not a task")
        if self.in_process:
            yield cls(*init_args)
            return
        actor = self._actor(role, cls, *init_args)
        try:
            yield actor
        finally:
            ray.kill(actor)

    def release_for(self, task: str) -> dict[str, float]:
        """Live engines that share an accelerator with task role ``task`` make room for it."""
        metrics: dict[str, float] = {}
        for name, worker in list(self.live.items()):
            mode = self.release_mode(name, task)
            if mode == "none":
                continue
            done = call(worker, "release", mode)
            if mode == "shutdown" and hasattr(worker, "__ray_terminate__"):
                ray.kill(worker)  # also frees its Ray GPU reservation; serve() starts a new one
                del self.live[name]
            log.info("%s engine released for %s (%s) in %.1fs", name, task, done["how"], done["seconds"])
            metrics.update({"time/release_s": float(done["seconds"]), "release/slept": float(done["how"] == "sleep")})
        return metrics

    # -- teardown ----------------------------------------------------------------------
    def stop(self, name: str) -> None:
        worker = self.live.pop(name, None)
        if worker is None:
            return
        try:
            call(worker, "shutdown")
        except Exception:  # the worker may already be gone; nothing to clean then
            pass
        if hasattr(worker, "__ray_terminate__"):
            ray.kill(worker)

    def stop_all(self) -> None:
        for name in list(self.live):
            self.stop(name)
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
