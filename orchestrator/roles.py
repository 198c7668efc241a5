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

Worker faults. Every wait on a worker has a limit (``cluster.timeouts``: per role, else per kind).
A worker that dies (OOM-killed, ``ray.kill``, its node gone) or does not answer in time is one
:class:`WorkerFault` line: which role and class, on which node, why, and the resume command. What
is redone once, on a fresh worker, before that line:

- a call to a serving engine (generate, judge, score...): a pure function of the checkpoint and
  the request, so the fresh engine (same checkpoint, checksum checked, same seed) redoes the call;
- a task (``run``: training, reward models, embeddings): its inputs are all in its arguments; a
  training resumes from its last saved optimizer step (``train.save_steps``);
- not the lockstep peers of ``hold`` (CRM): they are reported at once.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import ray

from orchestrator.config import resolve_run_dir, to_plain
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.placement import WorkerPlacement, actor_options, make_placement_group, release_mode, worker_resources

log = logging.getLogger(__name__)

KINDS = ("vllm", "endpoint", "task")

# Run-level keys a resume may change: where the run lives and how many rounds it has, and where
# the shared eval answers live (a cache: what is found there is what would be generated). Each role
# adds its own execution keys (see ``Role.resumable``).
RUN_RESUMABLE = ("rounds", "resume", "tracking.uri", "cluster", "run_dir", "storage", "log", "eval.answer_cache")

# vLLM engine settings that change how an engine runs, never what it computes.
ENGINE_EXECUTION_KEYS = (
    "gpu_memory_utilization", "max_num_seqs", "threads", "cpu_reserved_cores", "cpu_bind", "enable_sleep_mode",
    "enforce_eager", "fast_top_p", "in_process",
)  # fmt: skip

# Endpoint client settings that change how requests are made, never what is asked (workers/endpoint.py).
ENDPOINT_EXECUTION_KEYS = ("timeout_s", "max_retries", "backoff_s", "max_backoff_s", "concurrency")


def endpoint_resumable(section: str) -> tuple[str, ...]:
    """The keys of an endpoint role under ``section`` that a resume may change."""
    return (f"{section}.resources", *(f"{section}.endpoint.{k}" for k in ENDPOINT_EXECUTION_KEYS))


# Waiting on a worker ends in one of these when the worker is gone, whatever killed it.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
# Calls that only tidy up: never worth a fresh engine.
NO_RETRY = ("shutdown", "release", "info")
# The limits when cluster.timeouts has none: one engine call (a generate / judge batch) and one task.
DEFAULT_TIMEOUTS = {"engine": 14400.0, "task": 86400.0}


class WorkerFault(OrchestratorError):
    """A worker died or hung: one line naming it, its node, why, and how to resume."""

    def __init__(self, message: str, *, role: str = "", lost: bool = True):
        super().__init__(message)
        self.role = role
        self.lost = lost  # the worker is gone (a retry on a fresh one may finish the work)

    def after_retry(self, how: str) -> "WorkerFault":
        """The same line, saying that a retry on ``how`` failed as well."""
        head, sep, hint = str(self).partition("; rerun ")
        return WorkerFault(f"{head} (after one retry on {how}){sep}{hint}", role=self.role, lost=self.lost)


# Actor id -> (its Workers, its role): ``call`` finds there the limits and the retry of an actor.
_OWNERS: dict[str, tuple["Workers", str]] = {}


def _actor_id(worker: Any) -> str | None:
    actor_id = getattr(worker, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


def call(worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a worker method whether the worker is a Ray actor handle or a local object."""
    fn = getattr(worker, method)
    if not hasattr(fn, "remote"):
        return fn(*args, **kwargs)
    owner = _OWNERS.get(_actor_id(worker) or "")
    if owner is None:
        return _unwrap(lambda: ray.get(fn.remote(*args, **kwargs)))
    workers, name = owner
    return workers.invoke(name, worker, method, args, kwargs)


def call_each(calls: Iterable[tuple[Any, str, tuple[Any, ...]]]) -> list[Any]:
    """``call`` for several workers at once: Ray actors all start before any result is awaited, so they
    run in parallel; local objects run one after another. Results in the order given."""
    pending = []
    for worker, method, args in calls:
        fn = getattr(worker, method)
        pending.append((worker, method, fn.remote(*args)) if hasattr(fn, "remote") else (None, method, fn(*args)))
    out = []
    for worker, method, value in pending:
        owner = _OWNERS.get(_actor_id(worker) or "") if worker is not None else None
        if worker is None:
            out.append(value)
        elif owner is None:
            out.append(_unwrap(lambda v=value: ray.get(v)))
        else:
            out.append(owner[0].wait(owner[1], worker, method, value))
    return out


def _unwrap(get: Any) -> Any:
    """``get()``, with an OrchestratorError raised inside a worker re-raised here as its one line."""
    try:
        return get()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OrchestratorError):
            raise type(cause)(str(cause)) from None
        raise


def _cause(exc: BaseException) -> str:
    """Why Ray says an actor is gone, in a few words (its error text ends with "... because X.")."""
    text = str(exc)
    found = re.findall(r"because (.+?)\.?$", text, flags=re.M)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _init_error(exc: BaseException) -> str | None:
    """The one line of an OrchestratorError that a worker's ``__init__`` raised (Ray keeps only its text)."""
    found = re.findall(r"^orchestrator\.[\w.]+\.(\w+): (.+)$", str(exc), flags=re.M)
    return found[-1][1].strip() if found else None


def node_of(worker: Any) -> str:
    """Where an actor runs or ran: its node's IP, id and custom resources (two nodes may share an IP)."""
    try:
        from ray._private import state

        address = (state.actors(_actor_id(worker)) or {}).get("Address") or {}
        ip, node_id = address.get("IPAddress") or "?", address.get("NodeID") or ""
        node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
        custom = sorted(k for k in node.get("Resources", {}) if k not in ("CPU", "GPU", "memory", "object_store_memory")
                        and not k.startswith(("node:", "accelerator_type:")))  # fmt: skip
        return f"{ip} (node {node_id[:8]}{', ' + ', '.join(custom) if custom else ''})"
    except Exception:  # the GCS may be unreachable as well; the rest of the line still helps
        return "an unknown node"


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
            resumable=("train.resources", "train.threads", "train.micro_batch_size", "train.save_steps"),
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
        # What each engine serves, so a fresh engine can take over from a dead one.
        self.serving: dict[str, tuple[str, str | None]] = {}
        self.timeouts: dict[str, Any] = dict(DEFAULT_TIMEOUTS)
        self.resume_hint = "rerun the same command with resume=true and the same run_dir"
        self.placement: WorkerPlacement | None = None
        # Tests set this: task roles then run as plain objects in this process (no Ray), like ``attach``.
        self.in_process = False
        # ``hook(cls, role) -> cls`` for each actor started: the controller's console sends the
        # actor's output to RUN_DIR/logs/<role>.log and its progress to the console (orchestrator/console.py).
        self.actor_class_hook: Any = None

    def role(self, name: str) -> Role:
        try:
            return self.roles[name]
        except KeyError:
            raise OrchestratorError(f"no worker role {name!r} is declared (declared: {', '.join(self.roles)})") from None

    # -- placement ---------------------------------------------------------------------
    def reserve(self, cfg: Any) -> None:
        """Reserve GPUs for roles that run at the same time (one placement-group bundle each).

        Nothing on CPU, and nothing when the policy engine makes room for the trainer in turn.
        Also reads the limits on waiting for workers (``cluster.timeouts``) and the run dir that
        the one line of a worker fault names.
        """
        self.configure_faults(cfg)
        bundles = [r.bundle for r in self.roles.values() if r.bundle and r.gpus > 0]
        if bundles and self.release_mode("policy", "trainer") == "none":
            self.placement = make_placement_group(cfg, [r.bundle for r in self.roles.values() if r.bundle])

    def configure_faults(self, cfg: Any) -> None:
        cluster = cfg.get("cluster") or {}
        self.timeouts = {**DEFAULT_TIMEOUTS, **to_plain(cluster.get("timeouts") or {})}
        try:
            self.resume_hint = f"rerun the same command with run_dir={resolve_run_dir(cfg)} resume=true"
        except Exception:  # a config without run_dir (a test's): the generic hint stays
            pass

    def timeout(self, name: str) -> float | None:
        """Seconds one call to role ``name``'s worker may take: ``cluster.timeouts.<role>``, else its kind's
        (``engine`` or ``task``); None = no limit."""
        value = self.timeouts.get(self._limit_name(name))
        return None if value in (None, 0) else float(value)

    def _limit_name(self, name: str) -> str:
        """The ``cluster.timeouts`` entry that bounds role ``name``: its own, else its kind's."""
        return name if name in self.timeouts else ("task" if self.role(name).kind == "task" else "engine")

    def _timeout_key(self, name: str) -> str:
        return f"cluster.timeouts.{self._limit_name(name)}"

    def release_mode(self, name: str, task: str) -> str:
        """What role ``name`` does before task role ``task`` runs (``placement.release_mode``)."""
        if name not in self.roles or task not in self.roles:
            return "none"
        role, other = self.roles[name], self.roles[task]
        have = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return release_mode(role.release, role.gpus, other.gpus, have)

    def _actor(self, role: Role, cls: type, *args: Any) -> Any:
        opts = actor_options(role.resources, tensor_parallel_size=role.tensor_parallel_size, placement=self.placement, kind=role.bundle)
        if self.actor_class_hook is not None:
            cls = self.actor_class_hook(cls, role)
        actor = ray.remote(cls).options(**opts).remote(*args)
        _OWNERS[_actor_id(actor)] = (self, role.name)
        return actor

    # -- faults ------------------------------------------------------------------------
    def fault(self, name: str, worker: Any, what: str, *, lost: bool = True) -> WorkerFault:
        role = self.role(name)
        cls = getattr(getattr(worker, "_ray_actor_creation_function_descriptor", None), "class_name", "") or "worker"
        return WorkerFault(
            f"the {name} worker ({cls}, {role.section}) on {node_of(worker)} {what}; {self.resume_hint}", role=name, lost=lost
        )

    def wait(self, name: str, worker: Any, method: str, ref: Any) -> Any:
        """The result of ``ref`` (role ``name``'s ``worker`` running ``method``) within the role's limit."""
        limit = self.timeout(name)
        try:
            return _unwrap(lambda: ray.get(ref, timeout=limit))
        except ray.exceptions.GetTimeoutError:
            fault = self.fault(name, worker, f"did not finish {method} within {limit:.0f}s ({self._timeout_key(name)}); it was stopped")
            self._kill(worker)
            raise fault from None
        except LOST as exc:
            raise self.fault(name, worker, f"died during {method} ({_cause(exc)})") from None

    def invoke(self, name: str, worker: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``worker.method(*args, **kwargs)`` on role ``name``'s actor; an engine that dies or hangs is
        replaced by a fresh one (same checkpoint) and the call redone there, once."""
        serves = name in self.serving and method not in NO_RETRY
        live = self.live.get(name)
        if serves and live is not None and _actor_id(live) != _actor_id(worker):
            worker = live  # a handle from before the engine was replaced: the call goes to the new one
        try:
            return self.wait(name, worker, method, getattr(worker, method).remote(*args, **kwargs))
        except WorkerFault as fault:
            if not serves or self.live.get(name) is None:
                raise
            log.warning("%s; redoing %s once on a fresh engine", str(fault).split("; ")[0], method)
            self._kill(worker)
            del self.live[name]
            path, sha256 = self.serving[name]
            fresh = self.serve(name, path, sha256)
            try:
                return self.wait(name, fresh, method, getattr(fresh, method).remote(*args, **kwargs))
            except WorkerFault as again:
                raise again.after_retry("a fresh engine") from None

    def _kill(self, worker: Any, *, forget: bool = False) -> None:
        """End ``worker``. Its id stays known unless ``forget``: a recipe may still hold the handle of a
        replaced engine, and its calls go to the live one."""
        if forget:
            _OWNERS.pop(_actor_id(worker) or "", None)
        try:
            ray.kill(worker)
        except Exception:  # already gone
            pass

    def _placed(self, actor: Any, role: Role) -> Any:
        """``actor`` once Ray has placed and built it; a fault line if that takes longer than the start
        limit (the cluster lacks what it asks for, e.g. after its node died)."""
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=self.start_timeout_s or None)
        except ray.exceptions.GetTimeoutError:
            self._kill(actor)
            raise WorkerFault(
                f"the {role.name} worker ({role.section}) could not be placed within {self.start_timeout_s:.0f}s "
                f"(generation.start_timeout_s): no live node has {actor_options(role.resources)} free (did a node "
                f"die?); {self.resume_hint}, with {role.section}.resources that the live nodes have",
                role=role.name, lost=False,
            ) from None
        except LOST as exc:
            mine = _init_error(exc)
            if mine:  # its __init__ raised our own one line (e.g. a checkpoint that fails its check)
                _OWNERS.pop(_actor_id(actor) or "", None)
                raise OrchestratorError(f"the {role.name} worker ({role.section}) failed to start: {mine}") from None
            # placed on a node that then died (Ray had not noticed yet), or killed while starting
            raise self.fault(role.name, actor, f"died while starting ({_cause(exc)})") from None
        log.info("%s worker on %s", role.name, node_of(actor))
        return actor

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
        self.serving[name] = (path, sha256)
        if worker is None:
            from workers.vllm_worker import VLLMWorker

            worker = self.live[name] = self._started(self._actor(role, VLLMWorker, path, dict(role.engine), self.seed, sha256), role)
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
            self._kill(actor)
            raise WorkerFault(
                f"{what} did not start within {self.start_timeout_s:.0f}s (generation.start_timeout_s): the cluster may "
                f"lack the resources it asks for (did a node die?), or the engine hung while starting; see the worker logs "
                f"above; {self.resume_hint}", role=role.name, lost=False,
            ) from None
        except ray.exceptions.RayActorError as exc:
            _OWNERS.pop(_actor_id(actor) or "", None)
            mine = _init_error(exc)
            if mine:  # our own one line (a checkpoint that fails its check): nothing to add
                raise OrchestratorError(f"{what} failed to start: {mine}") from None
            cause = str(exc).strip().splitlines()[-1][:300]
            raise OrchestratorError(
                f"{what} failed to start ({cause}); the engine's ERROR lines above give the reason. On CPU, "
                f"'less than requested memory for kv' means its gpu_memory_utilization share is too small for the "
                f"weights plus a KV cache, or other processes hold the memory"
            ) from None
        log.info("%s engine on %s", role.name, node_of(actor))
        return actor

    # -- tasks -------------------------------------------------------------------------
    def run(self, name: str, cls: type, method: str, *args: Any) -> Any:
        """``cls(...).method(*args)`` in a fresh actor of task role ``name``, ended after the call; a
        worker that dies or hangs is replaced by a fresh one once (a training resumes from its saved state)."""
        try:
            with self.hold(name, cls) as worker:
                return call(worker, method, *args)
        except WorkerFault as fault:
            if not fault.lost:
                raise
            log.warning("%s; running %s once more on a fresh worker", str(fault).split("; ")[0], method)
        try:
            with self.hold(name, cls) as worker:
                return call(worker, method, *args)
        except WorkerFault as again:
            raise again.after_retry("a fresh worker") from None

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
            yield self._placed(actor, role)
        finally:
            self._kill(actor, forget=True)

    def release_for(self, task: str) -> dict[str, float]:
        """Live engines that share an accelerator with task role ``task`` make room for it."""
        metrics: dict[str, float] = {}
        for name, worker in list(self.live.items()):
            mode = self.release_mode(name, task)
            if mode == "none":
                continue
            done = call(worker, "release", mode)
            if mode == "shutdown" and hasattr(worker, "__ray_terminate__"):
                self._kill(worker)  # also frees its Ray GPU reservation; serve() starts a new one
                del self.live[name]
            log.info("%s engine released for %s (%s) in %.1fs", name, task, done["how"], done["seconds"])
            metrics.update({"time/release_s": float(done["seconds"]), "release/slept": float(done["how"] == "sleep")})
        return metrics

    # -- teardown ----------------------------------------------------------------------
    def stop(self, name: str, timeout_s: float = 60.0) -> None:
        worker = self.live.pop(name, None)
        self.serving.pop(name, None)
        if worker is None:
            return
        try:
            if hasattr(worker.shutdown, "remote"):  # straight to Ray: a dead engine must not be replaced to be stopped
                ray.get(worker.shutdown.remote(), timeout=timeout_s)
            else:
                worker.shutdown()
        except Exception:  # the worker may already be gone or hung; nothing to clean then
            pass
        if hasattr(worker, "__ray_terminate__"):
            self._kill(worker, forget=True)

    def stop_all(self, timeout_s: float = 60.0) -> None:
        """``timeout_s``: how long each worker's ``shutdown`` may take before the actor is killed; a
        stopped run passes a short one, as ``shutdown`` queues behind whatever the actor is busy with."""
        for name in list(self.live):
            self.stop(name, timeout_s)
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
