"""The controller: one driver process that owns the run directory, MLflow and the Ray workers.

Recipes (orchestrator/recipes) hold the algorithm and call into this for everything with side
effects: ``Round.stage`` makes a stage resumable (skip when its output file exists), timed and
logged; ``Controller.policy`` / ``judge`` / ``train`` reach the workers.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import ray
from omegaconf import DictConfig, OmegaConf

from orchestrator.config import resolve_run_dir
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.data import load_prompts
from orchestrator.models import check_checkpoint_dir, checkpoint_fingerprint, resolve_model_path
from orchestrator.placement import (
    WorkerPlacement, actor_options, make_placement_group, needs_gpu, release_mode, worker_resources,
)
from orchestrator.store import RoundDir, RunStore, publish_dir, write_json, write_jsonl
from orchestrator.tracking import Tracker, default_artifact_location, default_uri
from orchestrator.types import Pair, Prompt, Record, TrainResult

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)

# Keys that may change when a run is resumed; any other difference is refused. Besides where the
# run lives and how many rounds it has, these are how the work runs, not what it computes: memory
# shares, resources, threads, placement, micro-batching (the effective batch stays), so a run
# stopped by an out-of-memory kill can continue with smaller settings.
RESUMABLE_KEYS = (
    "rounds", "resume", "tracking.uri", "cluster", "run_dir", "storage",
    "generation.engine.gpu_memory_utilization", "generation.engine.max_num_seqs", "generation.engine.threads",
    "generation.engine.cpu_reserved_cores", "generation.engine.cpu_bind", "generation.engine.enable_sleep_mode",
    "generation.engine.enforce_eager", "generation.resources", "generation.start_timeout_s",
    "generation.release_for_training", "judge.resources", "judge.engine.gpu_memory_utilization",
    "train.resources", "train.threads", "train.micro_batch_size",
    "eval.judge.engine.gpu_memory_utilization", "eval.judge.resources",
)  # fmt: skip


def call(worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a worker method whether the worker is a Ray actor handle or a local object."""
    fn = getattr(worker, method)
    if hasattr(fn, "remote"):
        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


class Round:
    """One round's directory, MLflow child run and stage bookkeeping."""

    def __init__(self, ctl: "Controller", index: int):
        self.ctl = ctl
        self.index = index
        self.dir: RoundDir = ctl.store.round(index)
        self.state = ctl.store.round_state(index)

    def stage(self, name: str, cls: type[R], fn: Callable[[], tuple[list[R], dict[str, float]]]) -> list[R]:
        """Run ``fn`` unless the stage's output exists; write it atomically; log its metrics once."""
        if self.dir.has(name):
            log.info("round %d: %s already done, reusing %s", self.index, name, self.dir.file(name))
            records = self.dir.read(name, cls)
        else:
            log.info("round %d: %s ...", self.index, name)
            t0 = time.perf_counter()
            records, metrics = fn()
            metrics = {**metrics, f"time/{name}_s": time.perf_counter() - t0}
            self.dir.write(name, records, metrics)
            log.info("round %d: %s done in %.1fs (%d records)", self.index, name, metrics[f"time/{name}_s"], len(records))
        self.log_stage(name)
        return records

    def log_stage(self, name: str) -> None:
        logged = self.state.setdefault("logged", [])
        if name in logged:
            return
        self.ctl.tracker.log_round_metrics(self.index, self.dir.metrics(name))
        logged.append(name)
        self.ctl.store.save()


class Controller:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.store = RunStore(resolve_run_dir(cfg))
        self.tracker: Tracker | None = None
        self._policy = None
        self._judge = None
        self.placement: WorkerPlacement | None = None
        self.start_model = ""

    # -- setup -----------------------------------------------------------------------
    def open_store(self) -> None:
        config = plain(self.cfg)
        if self.cfg.resume:
            if not self.store.exists():
                raise ConfigError(f"resume=true but run_dir={self.store.root} holds no run (no manifest.json)")
            self.store.load()
            changed = [
                k for k in config_diff(self.store.manifest["config"], config)
                if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_KEYS)
            ]
            if changed:
                raise ConfigError(
                    f"resume=true with a changed config ({', '.join(changed)}); only {', '.join(RESUMABLE_KEYS)} "
                    f"may change on resume. Start a new run_dir to change the others"
                )
            self.store.manifest["config"] = config
            self.store.manifest["status"] = "running"
            self.store.save()
            log.info("resuming run in %s", self.store.root)
        else:
            if self.store.exists():
                raise ConfigError(
                    f"run_dir={self.store.root} already holds a run; add resume=true to continue it, or pick another run_dir"
                )
            self.store.create(config, OmegaConf.to_yaml(self.cfg, resolve=True))
            log.info("new run in %s", self.store.root)

    def preflight(self) -> None:
        """Check every input a run needs before anything is written, so a typo costs seconds."""
        self.start_model = resolve_model_path(self.cfg.model)
        load_prompts(self.cfg.data.prompts)
        spec = str(self.cfg.judge.model)
        if spec != "policy" and not self.cfg.judge.endpoint.base_url:
            check_checkpoint_dir(spec, what="judge.model")

    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        cl = self.cfg.cluster
        address = cl.get("address") or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Logical CPUs: enough for every worker kind to exist at once, whatever the core count;
            # the workers set their own thread counts.
            wanted = sum(float(self.cfg[k].resources.num_cpus) for k in ("generation", "judge", "train"))
            num_cpus = cl.get("num_cpus") or max(os.cpu_count() or 1, int(wanted + 0.999))
            ray.init(num_cpus=num_cpus, num_gpus=cl.get("num_gpus"), include_dashboard=False, log_to_driver=True)
        # GPUs for several worker kinds: reserve them together (one bundle per kind) so that a
        # multi-GPU node gives generation and training GPUs of their own. None on CPU.
        kinds = ["generation", "train"] + ([] if str(self.cfg.judge.model) == "policy" or self.cfg.judge.endpoint.base_url else ["judge"])
        if needs_gpu(self.cfg, kinds) and self.release_mode() == "none":  # shared in turn: no bundles of their own
            self.placement = make_placement_group(self.cfg, kinds)

    def release_mode(self) -> str:
        """How the policy engine makes room for training (see ``placement.release_mode``)."""
        gen = worker_resources(self.cfg.generation.resources, name="generation.resources").get("GPU", 0)
        train = worker_resources(self.cfg.train.resources, name="train.resources").get("GPU", 0)
        have = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return release_mode(self.cfg.generation.get("release_for_training", "auto"), gen, train, have)

    def start_tracking(self) -> None:
        uri = self.cfg.tracking.uri or default_uri(self.store)
        artifacts = None if self.cfg.tracking.uri else default_artifact_location(self.store)
        self.tracker = Tracker(uri, self.cfg.tracking.experiment, self.store, artifacts)
        self.tracker.start(plain(self.cfg), self.store.root / "config.yaml", run_name=self.store.root.name)
        log.info("MLflow: %s (experiment %s, parent run %s)", uri, self.cfg.tracking.experiment, self.tracker.parent_id)

    @contextmanager
    def session(self) -> Iterator["Controller"]:
        """Open store, Ray and MLflow; mark the run finished or failed on the way out."""
        self.preflight()
        self.open_store()
        self.store.manifest.setdefault("start_model", {"path": self.start_model})
        self.store.save()
        self.start_ray()
        self.start_tracking()
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.store.manifest["status"] = status.lower()
            self.store.save()
            if self.tracker:
                self.tracker.finish(status)
            self.shutdown_workers()

    # -- rounds ----------------------------------------------------------------------
    def pending_rounds(self) -> Iterator[int]:
        """Rounds 1..cfg.rounds that are not done yet."""
        for index in range(1, int(self.cfg.rounds) + 1):
            if self.store.round_state(index).get("status") == "done":
                log.info("round %d: done already", index)
                continue
            yield index

    @contextmanager
    def round(self, index: int) -> Iterator[Round]:
        """A round inside its MLflow child run; marked done only if the body finishes."""
        rnd = Round(self, index)
        self.store.update_round(index, status="running")
        self.tracker.round_run(index)
        t0 = time.perf_counter()
        try:
            yield rnd
        except BaseException:
            self.tracker.end_round(index, "FAILED")
            raise
        wall = time.perf_counter() - t0
        self.tracker.log_round_metrics(index, {"time/round_s": wall})
        self.store.update_round(index, status="done", wall_s=wall)
        self.tracker.end_round(index)
        log.info("round %d: done in %.1fs", index, wall)

    def model_path(self, index: int) -> str:
        """The policy after round ``index`` (0 = the starting model)."""
        if index == 0:
            return self.start_model
        path = self.store.round(index).checkpoint
        if not (path / "config.json").exists():
            raise OrchestratorError(f"round {index} has no checkpoint at {path}")
        return str(path)

    def used_prompts(self, before: int) -> tuple[list[Prompt], list[Prompt]]:
        """Prompts of rounds < ``before``: all of them, and the self-instructed ones among them."""
        used = [p for i in range(1, before) if self.store.round(i).has("prompts") for p in self.store.round(i).read("prompts", Prompt)]
        return used, [p for p in used if p.source == "self_instruct"]

    def evaluate(self, rnd: Round) -> None:
        """Per-round evaluation of the new policy (orchestrator.eval), every ``eval.every`` rounds."""
        every = int(self.cfg.eval.get("every", 0) or 0)
        if every <= 0 or rnd.index % every != 0:
            return
        from orchestrator.eval.stage import evaluate_round

        evaluate_round(self, rnd)

    def rng(self, index: int, stage: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}/{index}/{stage}")

    # -- workers ---------------------------------------------------------------------
    def _actor(self, cls: type, resources: Any, *args: Any, kind: str | None = None) -> Any:
        """A Ray actor with the kind's resources; in the kind's placement-group bundle if there is one."""
        tp = int(self.cfg.generation.engine.get("tensor_parallel_size", 1) or 1) if kind == "generation" else 1
        opts = actor_options(resources, tensor_parallel_size=tp, placement=self.placement, kind=kind)
        return ray.remote(cls).options(**opts).remote(*args)

    def policy(self, index: int) -> Any:
        """The generation worker, serving the policy that starts round ``index``."""
        return self.serve(self.model_path(index - 1), self.checkpoint_sha256(index - 1))

    def serve(self, path: str, sha256: str | None = None, what: str = "the policy's vLLM engine") -> Any:
        """The generation worker serving ``path``: started on first use, given new weights after."""
        if self._policy is None:
            engine = plain(self.cfg.generation.engine)
            self._policy = self.start_engine(path, engine, self.cfg.generation.resources, what, kind="generation")
        else:
            seconds = call(self._policy, "sync_weights", path, sha256)
            if seconds:  # in place, or waking from sleep / rebuilding after a release
                log.info("policy engine now serves %s (%.2fs)", path, seconds)
        return self._policy

    def start_engine(self, path: str, engine: dict, resources: Any, what: str, kind: str | None = None) -> Any:
        """A vLLM worker actor on ``path``, returned once its engine is up (see ``started``)."""
        from workers.vllm_worker import VLLMWorker

        return self.started(self._actor(VLLMWorker, resources, path, engine, int(self.cfg.seed), kind=kind), what)

    def started(self, actor: Any, what: str) -> Any:
        """``actor`` once it is up; a clear error if it is not within ``generation.start_timeout_s``.

        An engine that cannot be placed (no free GPU) or whose worker process died while starting
        would otherwise leave the round waiting forever.
        """
        timeout = float(self.cfg.generation.get("start_timeout_s", 0) or 0)
        try:
            ray.get(actor.info.remote(), timeout=timeout or None)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise OrchestratorError(
                f"{what} did not start within {timeout:.0f}s (generation.start_timeout_s): the cluster may lack the "
                f"resources it asks for, or the engine hung while starting; see the worker logs above"
            ) from None
        except ray.exceptions.RayActorError as exc:
            cause = str(exc).strip().splitlines()[-1][:300]
            raise OrchestratorError(
                f"{what} failed to start ({cause}); the engine's ERROR lines above give the reason. On CPU, "
                f"'less than requested memory for kv' means its gpu_memory_utilization share is too small for the "
                f"weights plus a KV cache, or other processes hold the memory"
            ) from None
        return actor

    def checkpoint_sha256(self, index: int) -> str | None:
        """The manifest's checksum of round ``index``'s checkpoint (None for the starting model)."""
        return self.store.round_state(index).get("checkpoint_sha256") if index > 0 else None

    def judge(self, index: int) -> Any:
        """The judge for round ``index``: the policy itself (the paper), a fixed local model, or an endpoint."""
        spec = str(self.cfg.judge.model)
        if spec == "policy":
            return self.policy(index)
        if self._judge is None:
            if self.cfg.judge.endpoint.base_url:
                from workers.endpoint import EndpointWorker

                self._judge = EndpointWorker(plain(self.cfg.judge.endpoint))
            else:
                path = str(check_checkpoint_dir(spec, what="judge.model"))
                engine = {**plain(self.cfg.generation.engine), **plain(self.cfg.judge.get("engine", {}) or {})}
                self._judge = self.start_engine(path, engine, self.cfg.judge.resources, "the judge's vLLM engine", kind="judge")
        return self._judge

    def train(self, rnd: Round, pairs: list[Pair]) -> str:
        """DPO from the round's starting policy (also the reference); returns the new checkpoint."""
        from workers.trainer import TrainerWorker

        if rnd.dir.has_checkpoint():
            log.info("round %d: checkpoint exists, skipping training", rnd.index)
        else:
            if not pairs:
                raise OrchestratorError(
                    f"round {rnd.index}: no preference pairs to train on (every prompt tied or was unscored); "
                    f"see {rnd.dir.metrics_file('pairs')}"
                )
            base = self.model_path(rnd.index - 1)
            shutil.rmtree(rnd.dir.checkpoint_tmp, ignore_errors=True)
            released = self.release_for_training()
            trainer = self._actor(TrainerWorker, self.cfg.train.resources, self.cfg.train.get("threads"), kind="train")
            try:
                result = TrainResult.from_dict(
                    call(
                        trainer, "train", [p.to_dict() for p in pairs], base, str(rnd.dir.checkpoint_tmp),
                        plain(self.cfg.train), int(self.cfg.seed) + rnd.index,
                    )
                )
            finally:
                ray.kill(trainer)
            metrics = {
                **result.metrics, **released,
                "train/steps": float(result.steps), "train/pairs": float(result.num_pairs), "time/train_s": result.wall_s,
            }
            write_json(rnd.dir.metrics_file("train"), metrics)
            publish_dir(rnd.dir.checkpoint_tmp, rnd.dir.checkpoint)
        path = str(rnd.dir.checkpoint)
        if "checkpoint_sha256" not in rnd.state:
            digest = checkpoint_fingerprint(path)
            self.store.update_round(rnd.index, checkpoint=path, checkpoint_sha256=digest)
            self.tracker.tag_round(rnd.index, checkpoint=path, checkpoint_sha256=digest)
        rnd.log_stage("train")
        return path

    def release_for_training(self) -> dict[str, float]:
        """Free the GPU the policy engine shares with the trainer (see ``release_mode``)."""
        mode = self.release_mode()
        if mode == "none" or self._policy is None:
            return {}
        done = call(self._policy, "release", mode)
        if mode == "shutdown" and hasattr(self._policy, "__ray_terminate__"):
            ray.kill(self._policy)  # also frees its Ray GPU reservation; policy() starts a new one
            self._policy = None
        log.info("policy engine released for training (%s) in %.1fs", done["how"], done["seconds"])
        return {"time/release_s": float(done["seconds"]), "release/slept": float(done["how"] == "sleep")}

    def shutdown_workers(self) -> None:
        from orchestrator.eval.stage import shutdown_fixed_judge

        shutdown_fixed_judge(self)  # the fixed eval judge, when orchestrator.eval started one
        for worker in (self._policy, self._judge):
            if worker is not None and hasattr(worker, "shutdown"):
                try:
                    call(worker, "shutdown")
                except Exception:  # the worker may already be gone; nothing to clean then
                    pass
                if hasattr(worker, "__ray_terminate__"):
                    ray.kill(worker)
        self._policy = self._judge = None
        if self.placement is not None:
            self.placement.remove()
            self.placement = None

    # -- artifacts -------------------------------------------------------------------
    def log_round_artifacts(self, rnd: Round, names: list[str], sample: list[Record]) -> None:
        for name in names:
            if rnd.dir.has(name):
                self.tracker.log_round_artifact(rnd.index, rnd.dir.file(name), "data")
        sample_file = rnd.dir.path / "generations_sample.jsonl"
        write_jsonl(sample_file, sample)
        self.tracker.log_round_artifact(rnd.index, sample_file, "data")


def resolved_config_path(store: RunStore) -> Path:
    return store.root / "config.yaml"
