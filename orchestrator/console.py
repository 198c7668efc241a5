"""What a person sees while a run goes: one live line per stage, a summary row per round, and
where to look afterwards; worker output goes to RUN_DIR/logs/<role>.log instead of the console.

Progress crosses from the workers (Ray actors, possibly on other nodes) to the driver as a small
JSON file per role, RUN_DIR/progress/<role>.json, rewritten atomically at most twice a second.
A file needs no Ray object to look up, keeps working when a worker runs in-process (tests), and
a reader never blocks a worker: the driver polls the newest file while a stage runs. The file's
path reaches the worker through an environment variable that the actor sets on itself when it
starts (``logged_actor_class``), so nothing has to travel with each call.

Worker side: ``Progress`` (any loop), ``vllm_progress`` (vLLM's ``use_tqdm``) and
``trainer_progress`` (a transformers callback: steps and loss). Driver side: ``Console``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PROGRESS_ENV = "ORCHESTRATOR_PROGRESS_FILE"
WORKER_MODES = ("file", "console")
# Loggers of libraries the driver uses that print INFO lines nobody needs to follow a run.
NOISY_LOGGERS = ("mlflow", "alembic", "ray", "urllib3", "filelock")
TAIL_LINES = 25


# -- worker side ------------------------------------------------------------------------------


class Progress:
    """Counts one piece of work in a worker (``done`` of ``total`` ``unit``) into the progress file
    named by $ORCHESTRATOR_PROGRESS_FILE; a no-op where it is not set."""

    def __init__(self, what: str, total: int | float | None, unit: str = "it", min_interval_s: float = 0.5):
        self.path = os.environ.get(PROGRESS_ENV) or None
        self.what, self.unit = what, unit
        self.total = float(total) if total else None
        self.done = 0.0
        self.info: dict[str, Any] = {}
        self.started = time.time()
        self.min_interval_s = min_interval_s
        self._written = 0.0
        self._write(force=True)

    def update(self, n: float = 1, **info: Any) -> None:
        self.advance_to(self.done + n, **info)

    def advance_to(self, done: float, **info: Any) -> None:
        self.done = float(done)
        if self.total is not None and self.done > self.total:
            self.total = self.done  # vLLM counts samples against a total of requests when n > 1
        self.info.update({k: v for k, v in info.items() if v is not None})
        self._write(force=self.total is not None and self.done >= self.total)

    def close(self) -> None:
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if self.path is None or (not force and now - self._written < self.min_interval_s):
            return
        self._written = now
        record = {"what": self.what, "unit": self.unit, "done": self.done, "total": self.total,
                  "started": self.started, "updated": now, "info": self.info, "pid": os.getpid()}
        try:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:  # progress is a nicety: a full or read-only disk must not fail the work
            pass


_OUT_SPEED = re.compile(r"output:\s*([0-9.]+)\s*toks/s")


class _VLLMBar:
    """What vLLM's ``_run_engine`` uses of a tqdm bar, counted into a ``Progress``."""

    def __init__(self, what: str, unit: str, total: int | None = None, **_: Any):
        self.progress = Progress(what, total, unit)
        self.n = 0
        self.total = total
        self._postfix: Any = None
        self._t0 = time.perf_counter()

    @property
    def postfix(self) -> Any:
        return self._postfix

    @postfix.setter
    def postfix(self, text: Any) -> None:
        # vLLM writes its speed here: "est. speed input: 512.00 toks/s, output: 115.20 toks/s"
        self._postfix = text
        found = _OUT_SPEED.search(str(text))
        if found and self.progress.what == "generate":  # scoring decodes one token: its speed says nothing
            self.progress.info["tok/s"] = float(found.group(1))

    @property
    def format_dict(self) -> dict[str, Any]:
        return {"elapsed": max(time.perf_counter() - self._t0, 1e-9), "n": self.n, "total": self.total}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.progress.update(n)

    def close(self) -> None:
        self.progress.close()

    def refresh(self, *_: Any, **__: Any) -> None:
        pass

    set_postfix = set_postfix_str = set_description = refresh

    def __enter__(self) -> "_VLLMBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def vllm_progress(what: str, unit: str = "req") -> Any:
    """A ``use_tqdm`` for ``LLM.generate``: its request bar goes to the progress file (and nowhere
    else, so worker logs hold no carriage-return bars); vLLM's other bars (adding requests) pass
    their iterable through silently."""

    def make(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        if iterable is not None:
            return iterable
        return _VLLMBar(what, unit, total=kwargs.get("total"))

    return make


def trainer_progress() -> Any:
    """A transformers ``TrainerCallback`` that counts optimizer steps and reports the latest loss."""
    from transformers import TrainerCallback

    class _TrainerProgress(TrainerCallback):
        progress: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.progress = Progress("train", state.max_steps or None, "steps")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress:
                self.progress.advance_to(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if self.progress and logs and isinstance(logs.get("loss"), (int, float)):
                self.progress.advance_to(state.global_step, loss=float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress:
                self.progress.close()

    return _TrainerProgress()


def redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so the subprocesses it
    starts afterwards, e.g. vLLM's engine core, too) to ``path``, appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # a crash then leaves its last lines in the file
        except Exception:
            pass


def logged_actor_class(cls: type, role: str, run_dir: Path | str, redirect: bool) -> type:
    """``cls`` whose instances, first thing in the worker process, report progress to
    RUN_DIR/progress/<role>.json and (``redirect``) write their output to RUN_DIR/logs/<role>.log.
    Same name as ``cls``, so Ray's process titles (``ray::VLLMWorker.generate``) do not change."""
    run_dir = Path(run_dir)
    log_file, progress_file = run_dir / "logs" / f"{role}.log", run_dir / "progress" / f"{role}.json"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        os.environ[PROGRESS_ENV] = str(progress_file)
        if redirect:
            redirect_output(log_file)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"==== {role}: {cls.__name__} started in pid {os.getpid()} at {stamp} ====", flush=True)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__qualname__": cls.__qualname__, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__})


# -- driver side ------------------------------------------------------------------------------


def read_progress(progress_dir: Path, since: float) -> dict[str, Any] | None:
    """The newest progress record written at or after ``since`` (None: no worker reported yet)."""
    best = None
    try:
        files = list(progress_dir.glob("*.json"))
    except OSError:
        return None
    for file in files:
        try:
            rec = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now, or not ours
        if float(rec.get("updated", 0)) >= since and (best is None or rec["updated"] > best["updated"]):
            best = {**rec, "role": file.stem}
    return best


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_count(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def progress_text(rec: dict[str, Any], width: int = 20) -> str:
    """``generate ━━━━━━──── 96/192 req  3.2 req/s  ETA 0:30  loss 0.6931`` for a progress record."""
    done, total, unit = float(rec.get("done", 0)), rec.get("total"), rec.get("unit", "it")
    elapsed = max(float(rec.get("updated", 0)) - float(rec.get("started", 0)), 1e-9)
    rate = done / elapsed if done > 0 else 0.0
    parts = [str(rec.get("what", ""))]
    if total:
        if width > 0:
            filled = int(width * min(done / float(total), 1.0))
            parts.append("━" * filled + "─" * (width - filled))
        parts.append(f"{_fmt_count(done)}/{_fmt_count(float(total))} {unit}")
    else:
        parts.append(f"{_fmt_count(done)} {unit}")
    if rate > 0:
        if rate < 0.1:  # slow stages (a CPU DPO step takes minutes): time per item, not "0.00 steps/s"
            parts.append(f"{fmt_duration(1.0 / rate)}/{unit.rstrip('s')}")
        else:
            parts.append(f"{rate:.2f} {unit}/s" if rate < 10 else f"{rate:.0f} {unit}/s")
        if total and done < float(total):
            parts.append(f"ETA {fmt_duration((float(total) - done) / rate)}")
    info = rec.get("info") or {}
    if isinstance(info.get("tok/s"), (int, float)) and info["tok/s"] > 0:
        parts.append(f"{info['tok/s']:.0f} tok/s")
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.4f}")
    return "  ".join(parts)


@dataclass
class Step:
    """One stage on the console; ``note`` (e.g. "256 records") goes on its final line."""

    label: str
    started: float
    wall_started: float
    note: str = ""
    last: dict[str, Any] | None = None
    printed_at: float = 0.0


class Console:
    """The driver's console for one run directory.

    On a terminal a step's line is redrawn in place twice a second; without one (a pipe, a CI
    log) it is printed at most every ``interval_s`` while the step runs, and once at its end.
    """

    def __init__(self, run_dir: Path | str, workers: str = "file", interval_s: float = 60.0, stream: Any = None,
                 live: bool | None = None, refresh_s: float = 0.5):
        if workers not in WORKER_MODES:
            from orchestrator.errors import ConfigError

            raise ConfigError(f"log.workers={workers!r} is invalid: one of {', '.join(WORKER_MODES)}")
        self.run_dir = Path(run_dir)
        self.workers_to_console = workers == "console"
        self.interval_s = float(interval_s)
        self._stream = stream
        self._live = live
        self.refresh_s = refresh_s
        self.steps: list[Step] = []
        self._lock = threading.RLock()
        self._line_shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._summarised: set[int] = set()
        self.started = time.time()

    @classmethod
    def from_cfg(cls, cfg: Any, run_dir: Path | str) -> "Console":
        log_cfg = cfg.get("log") or {}
        return cls(run_dir, workers=str(log_cfg.get("workers", "file")), interval_s=float(log_cfg.get("progress_interval_s", 60)))

    @property
    def ray_log_level(self) -> int:
        """Ray's own driver messages ("Started a local Ray instance") only with worker output on."""
        return logging.INFO if self.workers_to_console else logging.WARNING

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def progress_dir(self) -> Path:
        return self.run_dir / "progress"

    @property
    def stream(self) -> Any:
        return self._stream if self._stream is not None else sys.stdout  # at write time: the redacting one

    @property
    def live(self) -> bool:
        if self._live is None:
            try:
                return bool(self.stream.isatty())
            except Exception:
                return False
        return self._live

    # -- setup --------------------------------------------------------------------------------
    def actor_class(self, cls: type, role: Any) -> type:
        """``Workers``' hook for each actor it starts: progress and logs of role ``role``."""
        name = getattr(role, "name", str(role))
        if getattr(role, "kind", "task") != "task":
            where = "this console" if self.workers_to_console else self.logs_dir / f"{name}.log"
            self.print(f"  starting the {name} worker ({cls.__name__}); its log: {where}")
        return logged_actor_class(cls, name, self.run_dir, redirect=not self.workers_to_console)

    def quiet_logs(self) -> None:
        """The driver's INFO lines stay in its log file (Hydra's RUN_DIR/hydra/cli.log) and leave the
        console to this class; warnings and errors still show. Nothing changes with
        ``log.workers=console`` (everything on the console, as before)."""
        if self.workers_to_console:
            return
        root = logging.getLogger()
        for handler in root.handlers:
            if type(handler) is logging.StreamHandler and handler.level < logging.WARNING:
                handler.setLevel(logging.WARNING)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    # -- output -------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        stream = self.stream
        stream.write(text)
        stream.flush()

    def _clear(self) -> None:
        if self._line_shown:
            self._write("\r\x1b[2K")
            self._line_shown = False

    def print(self, text: str) -> None:
        """A whole line, above the live line (which the next refresh redraws)."""
        with self._lock:
            self._clear()
            self._write(text + "\n")

    def _line(self, step: Step) -> str:
        elapsed = fmt_duration(time.perf_counter() - step.started)
        rec = read_progress(self.progress_dir, step.wall_started)
        if rec is not None:
            step.last = rec
            return f"{step.label}  {progress_text(rec)}  [{elapsed}]"
        return f"{step.label}  ...  [{elapsed}]"

    def refresh(self) -> None:
        """Redraw (terminal) or, when due, print (no terminal) the innermost step's line."""
        with self._lock:
            if not self.steps:
                return
            step = self.steps[-1]
            line = self._line(step)
            if self.live:
                width = shutil.get_terminal_size((120, 24)).columns
                self._write("\r\x1b[2K" + line[: max(width - 1, 20)])
                self._line_shown = True
            elif time.perf_counter() - step.printed_at >= self.interval_s:
                step.printed_at = time.perf_counter()
                self._write(line + "\n")

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # a display glitch must never end the run
                pass

    @contextmanager
    def step(self, index: int, name: str) -> Iterator[Step]:
        """One stage of round ``index`` on its own line, live while it runs."""
        label = f"round {index}  {name:<12}"
        now = time.perf_counter()
        step = Step(label, now, time.time(), printed_at=now)
        with self._lock:
            self.steps.append(step)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="console", daemon=True)
                self._thread.start()
        ok, stopped = False, False
        try:
            yield step
            ok = True
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (orchestrator.signals): stopped, not failed
            stopped = True
            raise
        finally:
            with self._lock:
                self.steps.remove(step)
                if not self.steps:
                    self._stop.set()
                self._line(step)  # the last progress record, for the final line
                seconds = time.perf_counter() - step.started
                end = (f"done in {fmt_duration(seconds)}" if ok
                       else f"stopped after {fmt_duration(seconds)}" if stopped else f"FAILED after {fmt_duration(seconds)}")
                details = [step.note] if step.note else []
                if step.last is not None:
                    details.append(progress_text(step.last, width=0))
                self.print(f"{label}  {end}" + (f"  ({'; '.join(details)})" if details else ""))
            if self._thread is not None and not self.steps:
                self._thread.join(timeout=2)

    # -- rounds and the end of a run ----------------------------------------------------------
    def round_done(self, index: int) -> None:
        """The round's row of ``orchestrate-report`` (with round 0's, the first time it has one)."""
        from orchestrator import report

        try:
            rows = [r for r in report.collect(self.run_dir) if r["round"] <= index and r["round"] not in self._summarised]
        except (OSError, ValueError):
            return
        if not rows:
            return
        self._summarised.update(r["round"] for r in rows)
        text = report.format_table(rows, rule=False)
        self.print("\n".join("  " + line for line in text.splitlines()))

    def failed(self) -> None:
        """After a failure: the last lines of each worker log written since the run (or its last
        stage) started, and where the whole log is."""
        try:
            self._show_log_tails()
        except Exception:  # never hide the failure being reported with one of our own
            pass

    def _show_log_tails(self) -> None:
        since = min((s.wall_started for s in self.steps), default=self.started)
        try:
            logs = sorted((p for p in self.logs_dir.glob("*.log") if p.stat().st_mtime >= since - 1),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return
        for path in logs[:3]:
            lines = tail(path, TAIL_LINES)
            self.print(f"---- last {len(lines)} lines of {path} ----")
            for line in lines:
                self.print("  " + line)
            self.print(f"---- (whole log: {path}) ----")

    def finished(self, tracker: Any, status: str) -> None:
        """Where to look now: the run directory, the MLflow UI command, the report command."""
        try:
            self._show_where(tracker, status)
        except Exception:  # never hide the run's own failure with one of ours
            pass

    def _show_where(self, tracker: Any, status: str) -> None:
        self.print(f"run {status.lower()}: {self.run_dir}")
        if tracker is not None:
            for line in mlflow_hint(tracker):
                self.print(line)
        self.print(f"  table of the rounds: orchestrate-report {self.run_dir}")
        if not self.workers_to_console:
            self.print(f"  worker logs: {self.logs_dir}/<role>.log; driver log: {self.run_dir / 'hydra'}")


def ui_page(experiment_id: str, run_id: str | None = None, tab: str | None = None) -> str:
    """The MLflow UI's page (the part after the server's address) of an experiment, a run, a run's tab.

    MLflow 3.17's UI opens every experiment in its GenAI view unless the address says
    ``workflowType=machine_learning`` (or the browser remembers that choice): with its
    workflow switch on, which it always is in this version, it ignores the experiment's
    ``mlflow.experimentKind`` tag (orchestrator/tracking.py sets it anyway).
    """
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + (f"/{tab}" if tab else "")
    return page + "?workflowType=machine_learning"


def mlflow_hint(tracker: Any) -> list[str]:
    """How to open this run in the MLflow UI: the command for a local store, the page for a server."""
    uri = str(getattr(tracker, "display_uri", "") or "")
    page = ui_page(tracker.experiment_id, tracker.parent_id)
    charts = ui_page(tracker.experiment_id, tracker.parent_id, "model-metrics")
    if uri.startswith(("http://", "https://")):
        return [f"  MLflow: {uri.rstrip('/')}/{page}", f"    round charts: {uri.rstrip('/')}/{charts}"]
    venv_mlflow = Path(sys.executable).parent / "mlflow"
    on_path = shutil.which("mlflow")
    exe = "mlflow" if on_path and (not venv_mlflow.exists() or Path(on_path).resolve() == venv_mlflow.resolve()) else str(venv_mlflow)
    return [
        f"  MLflow UI: {exe} ui --backend-store-uri {uri}",
        f"    then open http://127.0.0.1:5000/{page}",
        f"    round charts (one point per round): http://127.0.0.1:5000/{charts}",
    ]


def tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file (read from its end: worker logs grow large)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - 64 * 1024, 0))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # a progress bar redraws with "\r": keep what the line showed last
    lines = [line.rstrip("\r").split("\r")[-1] for line in data.split("\n")]
    return [line for line in lines if line.strip()][-n:]
