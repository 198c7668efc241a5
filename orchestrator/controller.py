"""The controller: one driver process that owns the run directory, MLflow and the Ray workers.

Recipes (orchestrator/recipes) hold the algorithm and call into this for everything with side
effects: ``Round.stage`` makes a stage resumable (skip when its output file exists), timed and
logged; ``Round.checkpoint`` does the same for a named checkpoint of the round; ``ctl.workers``
holds the workers by role (orchestrator/roles.py). The controller has no slot per worker and no
knowledge of any recipe, filter or eval: those declare the roles they need and use them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import ray
from omegaconf import DictConfig

from orchestrator import signals
from orchestrator.config import resolve_run_dir, to_plain
from orchestrator.console import Console
from orchestrator.data import load_prompts
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.models import check_checkpoint_dir, checkpoint_fingerprint, fsync_dir, resolve_model_path, seal_checkpoint
from orchestrator.redact import redact_config
from orchestrator.roles import Role, Workers, resumable_keys
from orchestrator.store import RoundDir, RunStore, chain_digest, publish_dir, write_json, write_jsonl
from orchestrator.tracking import Tracker, default_artifact_location, default_uri
from orchestrator.types import Prompt, Record

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)

# The named checkpoint of a round that the next round starts from, unless the round promotes another.
POLICY = "policy"


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "", user_keys: frozenset[str] = frozenset()) -> list[str]:
    """Keys whose values differ. A key in one config only counts when the user set it on the command
    line (``user_keys``, e.g. ``+filter.rm.step=2``): otherwise it is the code's change (a key added
    since the run started has its default; a dropped one is no longer read) and resume goes on."""
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if key not in old or key not in new:
            if any(path == k or path.startswith(k + ".") or k.startswith(path + ".") for k in user_keys):
                keys.append(path)
            continue
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, path + ".", user_keys)
        elif a != b:
            keys.append(path)
    return keys


def override_keys(overrides: Iterable[str]) -> frozenset[str]:
    """The config keys that command-line overrides set (``+a.b=1``, ``++a.b=1``, ``~a.b``, ``a.b=1``)."""
    return frozenset(o.lstrip("+~").split("=", 1)[0] for o in overrides if o.strip())


class Round:
    """One round's directory, MLflow child run, stage bookkeeping and named checkpoints."""

    def __init__(self, ctl: "Controller", index: int):
        self.ctl = ctl
        self.index = index
        self.dir: RoundDir = ctl.store.round(index)
        self.state = ctl.store.round_state(index)
        # Hash of everything the round has done so far (stage files, checkpoints), in order: each
        # stage records it as its inputs, so a stage made before an earlier one was redone is stale.
        self.inputs = ""

    def stage(self, name: str, cls: type[R], fn: Callable[[], tuple[list[R], dict[str, float]]]) -> list[R]:
        """Run ``fn`` unless the stage's output exists, is intact and was made from the same inputs;
        write it atomically; log its metrics once."""
        found = self.dir.reuse(name, cls, self.inputs)
        if found is not None:
            log.info("round %d: %s already done, reusing %s", self.index, name, self.dir.file(name))
            records, digest = found
            self.ctl.console.print(f"round {self.index}  {name} already done: {len(records)} records reused")
        else:
            log.info("round %d: %s ...", self.index, name)
            t0 = time.perf_counter()
            with self.ctl.console.step(self.index, name) as step:
                records, metrics = fn()
                step.note = f"{len(records)} records"
            metrics = {**metrics, f"time/{name}_s": time.perf_counter() - t0}
            digest = self.dir.write(name, records, metrics, self.inputs)
            self.unlog(name)  # a fresh result: whatever was logged under this name was another one
            log.info("round %d: %s done in %.1fs (%d records)", self.index, name, metrics[f"time/{name}_s"], len(records))
        self.inputs = chain_digest(self.inputs, name, digest)
        self.log_stage(name)
        return records

    def unlog(self, name: str) -> None:
        if name in self.state.get("logged", []):
            self.state["logged"].remove(name)

    def log_stage(self, name: str) -> None:
        logged = self.state.setdefault("logged", [])
        if name in logged:
            return
        # The intent goes to the manifest first: a kill while logging leaves it there, and the
        # resumed run then logs only what MLflow is missing, never a metric twice.
        logging_now = self.state.setdefault("logging", [])
        if name in logging_now:
            self.ctl.tracker.log_round_metrics_missing(self.index, self.dir.metrics(name))
        else:
            logging_now.append(name)
            self.ctl.store.save()
            self.ctl.tracker.log_round_metrics(self.index, self.dir.metrics(name))
        logging_now.remove(name)
        logged.append(name)
        self.ctl.store.save()

    def checkpoint(self, name: str, stage: str, build: Callable[[Path], dict[str, float]]) -> str:
        """The round's checkpoint ``name``, built once by ``build(tmp_dir)``; returns its path.

        ``build`` writes a complete Hugging Face checkpoint into the (fresh, unique) folder it is
        given and returns the stage's metrics. The folder is renamed into place, then the path and
        sha256 go to the manifest (``rounds.N.checkpoints.NAME``) and the round's MLflow run (tags
        ``checkpoint.NAME`` and ``checkpoint.NAME.sha256``), and the metrics are logged as stage
        ``stage``. A rerun reuses a published checkpoint, so a killed run never trains twice.
        """
        path = self.dir.checkpoint(name)
        if self.dir.has_checkpoint(name) and self.dir.stale_checkpoint(stage, self.inputs):
            log.warning("round %d: checkpoint %s was built from other inputs (an earlier stage was redone); rebuilding it", self.index, name)
            shutil.rmtree(path)
            self.state.get("checkpoints", {}).pop(name, None)
            self.unlog(stage)
        if self.dir.has_checkpoint(name):
            log.info("round %d: checkpoint %s exists, reusing %s", self.index, name, path)
            self.ctl.console.print(f"round {self.index}  checkpoint {name} already built: reused")
        else:
            tmp = self.dir.checkpoint_tmp(name)
            try:
                t0 = time.perf_counter()
                with self.ctl.console.step(self.index, stage):
                    metrics = build(tmp)
                write_json(self.dir.metrics_file(stage), {**metrics, f"time/{stage}_s": time.perf_counter() - t0})
                seal_checkpoint(tmp)  # the builder's seal checked (or one written), all fsynced before the rename
                self.dir.write_meta(stage, b"", self.inputs)
                publish_dir(tmp, path)
                fsync_dir(path.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.adopt(name, str(path))
        self.inputs = chain_digest(self.inputs, f"checkpoint:{name}", self.state["checkpoints"][name]["sha256"])
        self.log_stage(stage)
        return str(path)

    def adopt(self, name: str, path: str) -> None:
        """Record ``path`` as the round's checkpoint ``name`` (once): its sha256 in the manifest and
        the round's MLflow tags. ``checkpoint`` adopts what it builds; ``orchestrate-eval`` adopts
        the checkpoint it evaluates, which lives outside the run."""
        recorded = self.state.setdefault("checkpoints", {})
        if name in recorded:
            return
        digest = checkpoint_fingerprint(path)
        recorded[name] = {"path": path, "sha256": digest}
        self.ctl.store.save()
        self.ctl.tracker.tag_round(self.index, **{f"checkpoint.{name}": path, f"checkpoint.{name}.sha256": digest})

    def promote(self, name: str) -> None:
        """Make checkpoint ``name`` (already built) the policy the next round starts from."""
        if name not in self.state.get("checkpoints", {}):
            raise OrchestratorError(f"round {self.index}: cannot promote checkpoint {name!r}: it was not built")
        self.ctl.store.update_round(self.index, policy=name)
        self.ctl.tracker.tag_round(self.index, policy_checkpoint=name)


class Controller:
    def __init__(self, cfg: DictConfig, roles: Iterable[Role], overrides: Iterable[str] = ()):
        """``overrides``: the command line's, so that resume can tell a key the user added from one the code did."""
        self.cfg = cfg
        self.user_keys = override_keys(overrides)
        self.store = RunStore(resolve_run_dir(cfg))
        self.tracker: Tracker | None = None
        self.workers = Workers(roles, seed=int(cfg.seed), start_timeout_s=float(cfg.generation.start_timeout_s))
        self.console = Console.from_cfg(cfg, self.store.root)
        self.workers.actor_class_hook = self.console.actor_class  # worker logs and progress under the run dir
        self.start_model = ""

    # -- setup -----------------------------------------------------------------------
    def open_store(self) -> None:
        # The manifest keeps the config with its secrets masked, so resume compares masked forms
        # (the stored one masked again: a run from before masking stored real values). A rotated
        # password is then no change; a different host or any other value still is.
        config = redact_config(to_plain(self.cfg))
        if self.cfg.resume:
            if not self.store.exists():
                raise ConfigError(f"resume=true but run_dir={self.store.root} holds no run (no manifest.json)")
            self.store.load()
            allowed = resumable_keys(self.workers.roles.values())
            changed = [
                k for k in config_diff(redact_config(self.store.manifest["config"]), config, user_keys=self.user_keys)
                if not any(k == p or k.startswith(p + ".") for p in allowed)
            ]
            if changed:
                raise ConfigError(
                    f"resume=true with a changed config ({', '.join(changed)}); only {', '.join(allowed)} "
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
            self.store.create(config)
            log.info("new run in %s", self.store.root)

    def preflight(self) -> None:
        """Check every input a run needs before anything is written, so a typo costs seconds."""
        self.start_model = resolve_model_path(self.cfg.model)
        load_prompts(self.cfg.data.prompts)
        if "judge" in self.workers.roles and self.workers.roles["judge"].kind == "vllm":
            check_checkpoint_dir(str(self.cfg.judge.model), what="judge.model")

    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        cl = self.cfg.cluster
        address = cl.get("address") or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=self.console.workers_to_console, logging_level=self.console.ray_log_level)
        else:
            # Logical CPUs: enough for every role's worker to exist at once, whatever the core
            # count; the workers set their own thread counts.
            wanted = sum(float(r.resources.get("num_cpus", 0) or 0) for r in self.workers.roles.values())
            num_cpus = cl.get("num_cpus") or max(os.cpu_count() or 1, int(wanted + 0.999))
            ray.init(num_cpus=num_cpus, num_gpus=cl.get("num_gpus"), include_dashboard=False,
                     log_to_driver=self.console.workers_to_console, logging_level=self.console.ray_log_level)
        self.workers.reserve(self.cfg)

    def start_tracking(self) -> None:
        uri = self.cfg.tracking.uri or default_uri(self.store)
        artifacts = None if self.cfg.tracking.uri else default_artifact_location(self.store)
        self.tracker = Tracker(uri, self.cfg.tracking.experiment, self.store, artifacts)
        self.tracker.start(redact_config(to_plain(self.cfg)), self.store.root / "config.yaml", run_name=self.store.root.name)
        log.info("MLflow: %s (experiment %s, parent run %s)", self.tracker.display_uri, self.cfg.tracking.experiment, self.tracker.parent_id)

    @contextmanager
    def session(self) -> Iterator["Controller"]:
        """Open store, Ray and MLflow; mark the run finished or failed on the way out."""
        self.preflight()
        with self.store.locked():  # one writer per run dir; a second is refused before it writes
            self.console.quiet_logs()
            self.open_store()
            self.store.manifest.setdefault("start_model", {"path": self.start_model})
            self.store.save()
            self.start_ray()
            signals.install()  # ray.init replaced our SIGTERM handler with its own (sys.exit)
            self.start_tracking()
            status = "FAILED"
            try:
                yield self
                status = "FINISHED"
            except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (the CLI turns it into one)
                status = "KILLED"
                raise
            finally:
                self.store.manifest["status"] = status.lower()
                self.store.save()
                if self.tracker:
                    self.tracker.finish(status)
                # Ctrl-C / SIGTERM: a busy actor would finish its call before its shutdown ran.
                self.workers.stop_all(timeout_s=5.0 if status == "KILLED" else 60.0)
                if status == "FAILED":
                    self.console.failed()
                self.console.finished(self.tracker, status)

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
        except BaseException as exc:
            self.tracker.end_round(index, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        self.model_path(index)  # a round is done only once the next round has a policy to start from
        wall = time.perf_counter() - t0
        self.tracker.log_round_metrics(index, {"time/round_s": wall})
        self.store.update_round(index, status="done", wall_s=wall)
        self.tracker.end_round(index)
        self.console.round_done(index)
        log.info("round %d: done in %.1fs", index, wall)

    def _policy_checkpoint(self, index: int) -> dict[str, str]:
        state = self.store.round_state(index)
        name = state.get("policy", POLICY)
        found = state.get("checkpoints", {}).get(name)
        if not found or not (Path(found["path"]) / "config.json").exists():
            raise OrchestratorError(f"round {index} has no {name!r} checkpoint to start the next round from ({self.store.round(index).path})")
        return found

    def model_path(self, index: int) -> str:
        """The policy after round ``index`` (0 = the starting model): the round's promoted checkpoint."""
        return self.start_model if index == 0 else self._policy_checkpoint(index)["path"]

    def checkpoint_sha256(self, index: int) -> str | None:
        """The manifest's checksum of the policy after round ``index`` (None for the starting model)."""
        return self._policy_checkpoint(index)["sha256"] if index > 0 else None

    def policy(self, index: int) -> Any:
        """The policy role's engine, serving the policy that starts round ``index``."""
        return self.workers.serve("policy", self.model_path(index - 1), self.checkpoint_sha256(index - 1))

    def judge(self, index: int) -> Any:
        """The judge for round ``index``: the policy itself (the paper), a fixed local model, or an endpoint."""
        if "judge" not in self.workers.roles:
            return self.policy(index)
        if self.workers.roles["judge"].kind == "endpoint":  # serves its own model; judge.model is not a path then
            return self.workers.serve("judge")
        return self.workers.serve("judge", str(check_checkpoint_dir(str(self.cfg.judge.model), what="judge.model")))

    def used_prompts(self, before: int) -> tuple[list[Prompt], list[Prompt]]:
        """Prompts of rounds < ``before``: all of them, and the self-instructed ones among them."""
        used = [p for i in range(1, before) if self.store.round(i).has("prompts") for p in self.store.round(i).read("prompts", Prompt)]
        return used, [p for p in used if p.source == "self_instruct"]

    def rng(self, index: int, stage: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}/{index}/{stage}")

    # -- artifacts -------------------------------------------------------------------
    def log_round_artifacts(self, rnd: Round, names: list[str], sample: list[Record]) -> None:
        for name in names:
            if rnd.dir.has(name):
                self.tracker.log_round_artifact(rnd.index, rnd.dir.file(name), "data")
        sample_file = rnd.dir.path / "generations_sample.jsonl"
        write_jsonl(sample_file, sample)
        self.tracker.log_round_artifact(rnd.index, sample_file, "data")
