"""The run directory: round folders, stage outputs written atomically, and the manifest.

Layout::

    RUN_DIR/
      manifest.json            run-level state: config, MLflow run ids, per-round status
      manifest.prev.json       the manifest before its last save (to restore a damaged one)
      run.lock                 held by the one process writing the run: pid, host, Ray job, start
      config.yaml              the resolved config of the first start
                               (both with secrets masked: orchestrator/redact.py)
      rounds/round_001/
        prompts.jsonl          one file per stage, written to a temp name then renamed, so a file
        generations.jsonl      that exists is complete; resume restarts at the first missing one
        judgments.jsonl
        pairs.jsonl
        <stage>.metrics.json   the stage's metrics (what MLflow gets)
        <stage>.meta.json      its record count, size and sha256, and a hash of its inputs
                               (the round's earlier stages), so resume can tell a damaged or
                               stale file from a good one
        checkpoints/<name>/    the round's named checkpoints (safetensors + tokenizer): "policy"
                               (the trained model), and whatever a recipe or plug-in adds
                               ("judge", "rm_a", "expo", ...), each renamed into place
      mlflow.db                default tracking store
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from orchestrator.errors import OrchestratorError
from orchestrator.redact import redact_config
from orchestrator.types import Record

R = TypeVar("R", bound=Record)
log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_PREV = "manifest.prev.json"
LOCK = "run.lock"

# Test-only fault injection: ORCHESTRATOR_CRASH_AT=<point> ends the process at that point as a
# SIGKILL would (no cleanup, no atexit), so tests can kill the driver at an exact place.
CRASH_ENV = "ORCHESTRATOR_CRASH_AT"
CRASH_EXIT = 86

# Errors of a full or limited disk: the user can fix them (free space, raise a quota) and resume.
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class StorageError(OrchestratorError):
    """A run file could not be written (disk full, file too large) or is damaged."""


class RunLocked(OrchestratorError):
    """Another live process holds the run directory."""


_crash_seen: dict[str, int] = {}


def crash_point(point: str) -> None:
    """``ORCHESTRATOR_CRASH_AT=POINT`` ends the process the first time it reaches POINT, ``POINT#N`` the Nth time."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    name, _, nth = want.partition("#")
    if name == point:
        _crash_seen[point] = _crash_seen.get(point, 0) + 1
        if _crash_seen[point] == int(nth or 1):
            os._exit(CRASH_EXIT)


def _disk_error(path: Path, exc: OSError) -> StorageError:
    return StorageError(
        f"could not write {path}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)}); "
        f"the previous {path.name}, if any, is unchanged. Free space (or raise the limit) and resume with resume=true"
    )


def atomic_write_text(path: Path, text: str, *, replace: bool = True) -> None:
    """``text`` to ``path`` via a unique temp file, fsynced, then renamed: readers see the old file
    or the whole new one. ``replace=False`` refuses (FileExistsError) when ``path`` exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point(f"before_rename:{path.name}")
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # unlike rename, fails if path exists: no run is ever overwritten
            os.unlink(tmp)
        _fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in DISK_FULL:
            raise _disk_error(path, exc) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a power loss could otherwise undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonl_text(records: Iterable[Record | dict[str, Any]]) -> str:
    lines = []
    for rec in records:
        data = rec.to_dict() if isinstance(rec, Record) else rec
        lines.append(json.dumps(data, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_jsonl(path: Path, records: Iterable[Record | dict[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(records))


def parse_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a ValueError naming the line on bad JSON."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})") from None


def read_jsonl(path: Path, cls: type[R] | None = None) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        try:
            rows = [data for _, data in parse_jsonl(fh)]
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return [cls.from_dict(data) for data in rows] if cls is not None else rows


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; a leftover ``final_dir`` from a crash is replaced."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    crash_point(f"published:{final_dir.name}")


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chain_digest(previous: str, name: str, digest: str) -> str:
    """The inputs hash of the next stage: everything done before it in the round, in order."""
    return hashlib.sha256(f"{previous}\n{name}\n{digest}".encode()).hexdigest()


def count_records(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


def damage(data: bytes, meta: dict[str, Any]) -> str | None:
    """What is wrong with a stage file's ``data`` against the ``meta`` written with it (None: intact)."""
    records, size = count_records(data), len(data)
    if records != meta.get("records") or size != meta.get("bytes"):
        return f"{records} of {meta.get('records')} records, {size} of {meta.get('bytes')} bytes"
    if file_digest(data) != meta.get("sha256"):
        return "its sha256 differs from the one written with it"
    return None


class RunLock:
    """An exclusive lock on a run directory: ``RUN_DIR/run.lock``, flock'ed while held, holding the
    holder's pid, host, Ray job id and start time so a refusal can name it. The kernel drops a flock
    when its process dies, so a lock file left by a killed run is stale and is taken over."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.fd: int | None = None

    @staticmethod
    def holder() -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "ray_job_id": _ray_job_id(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns the stale holder it replaced, if any. RunLocked if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _read_holder(fd)
                os.close(fd)
                raise RunLocked(f"run_dir={self.path.parent} is in use by {describe(held)}{_orphaned(held)}; "
                                f"two writers would corrupt it: wait for that run to end or stop it") from None
            except OSError as exc:  # a filesystem without flock: fall back on the holder's pid
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                held = _read_holder(fd)
                if held and (held.get("host") != socket.gethostname() or _alive(int(held.get("pid", 0)))):
                    os.close(fd)
                    raise RunLocked(f"run_dir={self.path.parent} is in use by {describe(held)} (this filesystem has no "
                                    f"file locks; if that run is gone, delete {self.path})") from None
            if not _same_file(fd, self.path):  # its holder released (unlinked) it meanwhile: lock the new one
                os.close(fd)
                continue
            stale = _read_holder(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.holder()) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return stale or None

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink before unlocking: a waiter that then locks the old inode sees it is gone and retries.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _ray_job_id() -> str | None:
    """The Ray job submission id when this driver runs as a Ray job (``ray job submit``)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        return None
    return meta.get("job_submission_id") or os.environ.get("RAY_JOB_SUBMISSION_ID")


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        held = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return held if isinstance(held, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(held: dict[str, Any]) -> str:
    """A held lock whose pid is gone: a process it forked still has the lock file open."""
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0) or 0)):
        return " (that pid has exited, but a process it started still holds the lock: look for its leftover workers)"
    return ""


def describe(held: dict[str, Any]) -> str:
    if not held:
        return "another process (its lock file names no holder)"
    job = f", Ray job {held['ray_job_id']}" if held.get("ray_job_id") else ""
    return f"pid {held.get('pid')} on host {held.get('host')}{job}, started {held.get('started')}"


CHECKPOINT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def check_checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.match(str(name)):
        raise ValueError(f"checkpoint name {name!r}: want lowercase letters, digits and _ (e.g. policy, judge, rm_a)")
    return str(name)


class RoundDir:
    """One round's folder. A stage is done when its output file exists."""

    def __init__(self, root: Path, index: int):
        self.index = index
        self.path = root / "rounds" / f"round_{index:03d}"

    def file(self, stage: str) -> Path:
        return self.path / f"{stage}.jsonl"

    def metrics_file(self, stage: str) -> Path:
        return self.path / f"{stage}.metrics.json"

    def meta_file(self, stage: str) -> Path:
        return self.path / f"{stage}.meta.json"

    def has(self, stage: str) -> bool:
        return self.file(stage).exists()

    def write(self, stage: str, records: Iterable[Record | dict[str, Any]], metrics: dict[str, float],
              inputs: str | None = None) -> str:
        """Write the stage's metrics, data and meta (record count, size, sha256, ``inputs``), each
        atomically; returns the data's sha256. The old meta goes first, so at every instant the data
        file on disk either matches the meta beside it or has none (trusted as written whole): a
        failed or killed write leaves the previous data file as it was."""
        for leftover in self.path.glob(f".{stage}.*.tmp"):  # from a killed writer; the run lock makes them ours
            leftover.unlink(missing_ok=True)
        text = jsonl_text(records)
        write_json(self.metrics_file(stage), metrics)
        self.meta_file(stage).unlink(missing_ok=True)
        atomic_write_text(self.file(stage), text)
        crash_point(f"written:{stage}")
        return self.write_meta(stage, text.encode("utf-8"), inputs)

    def write_meta(self, stage: str, data: bytes, inputs: str | None) -> str:
        digest = file_digest(data)
        write_json(self.meta_file(stage), {"records": count_records(data), "bytes": len(data), "sha256": digest, "inputs": inputs})
        return digest

    def discard(self, stage: str) -> None:
        """Remove a stale stage's files (data first: without it the stage is simply not done)."""
        for path in (self.file(stage), self.meta_file(stage), self.metrics_file(stage)):
            path.unlink(missing_ok=True)

    def meta(self, stage: str) -> dict[str, Any] | None:
        """The stage's meta (None: written before stage files had one)."""
        path = self.meta_file(stage)
        if not path.exists():
            return None
        try:
            meta = read_json(path)
        except ValueError as exc:
            raise self.damaged(stage, f"{path.name} is not valid JSON ({exc})") from None
        return meta if isinstance(meta, dict) else None

    def verified(self, stage: str) -> tuple[bytes, dict[str, Any] | None]:
        """The stage file's bytes, checked against its meta; StorageError (one line) when damaged."""
        data = self.file(stage).read_bytes()
        meta = self.meta(stage)
        wrong = damage(data, meta) if meta is not None else None
        if wrong:
            raise self.damaged(stage, wrong)
        return data, meta

    def damaged(self, stage: str, what: str) -> StorageError:
        return StorageError(
            f"round {self.index}: {self.file(stage)} is damaged ({what}); delete it and resume again "
            f"(that stage and the later ones of round {self.index} are redone)"
        )

    def read(self, stage: str, cls: type[R]) -> list[R]:
        return self.parse(stage, self.verified(stage)[0], cls)

    def parse(self, stage: str, data: bytes, cls: type[R]) -> list[R]:
        try:
            rows = [row for _, row in parse_jsonl(data.decode("utf-8").splitlines())]
            return [cls.from_dict(row) for row in rows]
        except (ValueError, UnicodeDecodeError) as exc:  # a file from before stage metas, or edited by hand
            raise self.damaged(stage, str(exc)) from None

    def reuse(self, stage: str, cls: type[R], inputs: str) -> tuple[list[R], str] | None:
        """The finished stage's (records, sha256) if it can be reused: None when it is missing, or
        when it was made from other ``inputs`` (then it is discarded, to be redone); StorageError
        when it is damaged. A stage without a meta (an older run, or a kill just before the meta
        was written) is trusted as written whole, and gets its meta now."""
        if not self.has(stage):
            return None
        meta = self.meta(stage)
        if meta is not None and meta.get("inputs") not in (None, inputs):
            log.warning(
                "round %d: %s was made from other inputs (an earlier stage of the round was redone); redoing it",
                self.index, self.file(stage).name,
            )
            self.discard(stage)
            return None
        data, meta = self.verified(stage)
        records = self.parse(stage, data, cls)
        digest = meta["sha256"] if meta is not None else self.write_meta(stage, data, inputs)
        return records, digest

    def stale_checkpoint(self, stage: str, inputs: str) -> bool:
        """Whether the checkpoint built as ``stage`` was built from other inputs than ``inputs``."""
        meta = self.meta(stage)
        return meta is not None and meta.get("inputs") not in (None, inputs)

    def metrics(self, stage: str) -> dict[str, float]:
        path = self.metrics_file(stage)
        return read_json(path) if path.exists() else {}

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / check_checkpoint_name(name)

    def checkpoint_tmp(self, name: str) -> Path:
        """A fresh temporary folder for checkpoint ``name``: unique, so two writers never share one."""
        name = check_checkpoint_name(name)
        parent = self.path / "checkpoints"
        for leftover in parent.glob(f".{name}.tmp-*"):  # a killed build's; the run lock makes them ours
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def has_checkpoint(self, name: str) -> bool:
        return (self.checkpoint(name) / "config.json").exists()

    def stage_names(self) -> list[str]:
        """Stages with a data file and a meta (the ones resume can check)."""
        return sorted(p.name[: -len(".meta.json")] for p in self.path.glob("*.meta.json") if not p.name.startswith("."))


class RunStore:
    """Owns RUN_DIR and its manifest. The manifest is rewritten atomically on every change."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.manifest_path = self.root / MANIFEST
        self.manifest: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.manifest_path.exists()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold RUN_DIR's lock (RunLocked if a live process holds it); a stale lock is named and taken over."""
        lock = RunLock(self.root)
        stale = lock.acquire()
        if stale:
            log.warning(
                "run_dir=%s: taking over the lock of %s, which is no longer running", self.root, describe(stale)
            )
        try:
            yield
        finally:
            lock.release()

    def create(self, config: dict[str, Any], config_yaml: str | None = None) -> None:
        """A new run: ``config`` (plain, resolved) goes to the manifest and, unless ``config_yaml``
        is given (written as it is: its caller masks it), to config.yaml, with secrets masked. The
        run reads neither back for its values, only to compare configs on resume (masked forms).
        Never replaces an existing run (resume=true continues one)."""
        if self.exists():
            raise StorageError(f"run_dir={self.root} already holds a run; add resume=true to continue it, or pick another run_dir")
        self.root.mkdir(parents=True, exist_ok=True)
        safe = redact_config(config)
        if config_yaml is None:
            from omegaconf import OmegaConf

            config_yaml = OmegaConf.to_yaml(OmegaConf.create(safe))
        manifest = {"config": safe, "rounds": {}, "mlflow": {}, "status": "running"}
        try:
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                              replace=False)
        except FileExistsError:
            raise StorageError(f"run_dir={self.root} already holds a run; add resume=true to continue it, or pick another run_dir") from None
        atomic_write_text(self.root / "config.yaml", config_yaml)
        self.manifest = manifest

    def load(self) -> None:
        """Read the manifest and check every stage file against its meta: StorageError (one line) on damage."""
        try:
            manifest = read_json(self.manifest_path)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            prev = self.root / MANIFEST_PREV
            fix = (f"copy {prev.name} (its version before the last save) over it and resume again" if prev.exists()
                   else "start a new run_dir")
            raise StorageError(f"{self.manifest_path} is damaged ({exc}); {fix}") from None
        self.manifest = manifest
        self.verify()

    def verify(self) -> None:
        for rdir in self.round_dirs():
            for stage in rdir.stage_names():
                if rdir.has(stage):
                    rdir.verified(stage)

    def round_dirs(self) -> list[RoundDir]:
        found = (re.fullmatch(r"round_(\d+)", p.name) for p in (self.root / "rounds").glob("round_*") if p.is_dir())
        return [self.round(int(m.group(1))) for m in sorted(found, key=lambda m: int(m.group(1)) if m else -1) if m]

    def save(self) -> None:
        # Keep the manifest being replaced as manifest.prev.json (a hard link: no copy, atomic), so
        # a manifest damaged on disk can be restored from its previous version.
        if self.manifest_path.exists():
            prev_tmp = self.root / f".{MANIFEST_PREV}.{os.getpid()}.tmp"
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(self.manifest_path, prev_tmp)
                os.replace(prev_tmp, self.root / MANIFEST_PREV)
            except OSError:  # a filesystem without hard links: no backup, the save itself still counts
                prev_tmp.unlink(missing_ok=True)
        write_json(self.manifest_path, self.manifest)

    def round(self, index: int) -> RoundDir:
        return RoundDir(self.root, index)

    def round_state(self, index: int) -> dict[str, Any]:
        return self.manifest.setdefault("rounds", {}).setdefault(str(index), {})

    def update_round(self, index: int, **fields: Any) -> None:
        self.round_state(index).update(fields)
        self.save()

    def completed_rounds(self) -> list[int]:
        return sorted(int(k) for k, v in self.manifest.get("rounds", {}).items() if v.get("status") == "done")
