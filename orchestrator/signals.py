"""SIGTERM handled as Ctrl-C is, so a stopped driver unwinds: the run is marked KILLED in its
manifest and MLflow, and its workers are stopped (``kill``, ``ray job stop``, a scheduler's stop).
Neither is raised inside an MLflow database write: it is delivered again a moment later."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

# The signal that stopped the run, if one did (Ray may re-raise a signal handler's exception as a
# plain KeyboardInterrupt, so the name is kept here, not only in the exception).
_stopped_by: list[str] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread wherever the driver is."""


# Code that a raised exception would leave half-done: MLflow's sqlite commit, interrupted, keeps
# the database locked, and the KILLED status could then not be written.
_UNSAFE = ("mlflow", "sqlalchemy", "sqlite3", "alembic")


def _in_unsafe_code(frame: FrameType | None) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_UNSAFE):
            return True
        frame = frame.f_back
    return False


def _on_stop(signum: int, frame: FrameType | None) -> None:
    if _in_unsafe_code(frame):
        threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()  # the same signal again, in a moment
        return
    name = signal.Signals(signum).name
    _stopped_by.append(name)
    signal.signal(signum, signal.SIG_DFL)  # a second signal during the cleanup ends the process at once
    raise Terminated(name) if signum == signal.SIGTERM else KeyboardInterrupt(name)


def install() -> None:
    """Install the handlers (again after ``ray.init``, which sets its own SIGTERM handler: sys.exit)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return
    if not _stopped_by:
        signal.signal(signal.SIGTERM, _on_stop)
        signal.signal(signal.SIGINT, _on_stop)
    # A file-size limit (ulimit -f) would kill the process mid-write; ignored, the write fails with
    # EFBIG instead, which the store reports as one line, and the previous file survives.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def stopped_by() -> str:
    """The signal that stopped the run: SIGTERM if one came, else SIGINT (Ctrl-C)."""
    return _stopped_by[0] if _stopped_by else "SIGINT"


def exit_status(name: str) -> int:
    return 128 + int(signal.Signals[name])
