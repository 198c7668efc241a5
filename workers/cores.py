"""CPU settings every worker process makes first."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

# Test-only fault injection: ORCHESTRATOR_HANG_AT=<point>@<flag file>[,...] makes the first worker that
# reaches <point> write its pid to <flag file> and hang there, so a test can kill that worker (or let
# a timeout fire) in the middle of a stage. Later workers pass (the flag exists), or hang at the next
# spec naming the same point.
HANG_ENV = "ORCHESTRATOR_HANG_AT"
# A Trainer checkpoint folder is complete (every file written and fsynced) once this file exists.
STATE_COMPLETE = "checkpoint.complete"
STATE_INPUTS = "inputs.json"


def auto_switch(setting: Any, auto: Callable[[], bool]) -> bool:
    """A true/false setting, or "auto" = ``auto()`` (asked only then: it may import vLLM or probe a GPU)."""
    if isinstance(setting, str) and setting.lower() == "auto":
        return bool(auto())
    if isinstance(setting, str):
        return setting.lower() in ("true", "1", "yes")
    return bool(setting)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without, bf16 is emulated and slow."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_cores(threads: int | None) -> int:
    """Let this worker use ``threads`` cores (None = all of the machine's); returns the count.

    Ray pins OMP_NUM_THREADS=1 in actors, and starts workers at niceness 15, where they (and the
    engine processes they spawn) lose every contest for the CPU; both are undone here.
    """
    n = int(threads or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):  # not allowed, or not on this platform: keep Ray's
        pass
    import torch

    torch.set_num_threads(n)
    return n


class CoreWorker:
    """A worker that sets its cores first (``use_cores``); ``threads`` is what it got."""

    def __init__(self, threads: int | None = None):
        self.threads = use_cores(threads)


def run_args(seed: int, use_cuda: bool) -> dict[str, Any]:
    """TrainingArguments every training worker sets alike: seeded; a log entry per step (the
    metrics are read from log_history); the worker saves the result itself, so the Trainer saves
    and evaluates nothing; no reporting to outside services."""
    return dict(
        seed=seed, data_seed=seed, logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_pin_memory=use_cuda, use_cpu=not use_cuda,
    )


def length_batches(seqs: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``seqs`` in batches of ``batch_size``, shortest first (little padding per batch)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """``(ids, mask)`` of ``seqs``, right-padded with ``pad_id`` to the longest."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def padded_batches(seqs: list[list[int]], pad_id: int, batch_size: int) -> Iterator[tuple[list[int], Any, Any]]:
    """``(indices, ids, mask)`` per batch of ``seqs``, batched by length (little padding), right-padded."""
    for idx in length_batches(seqs, batch_size):
        yield (idx, *pad_right([seqs[i] for i in idx], pad_id))


def hang_point(point: str) -> None:
    """Hang here forever if the test-only ``HANG_ENV`` names ``point`` with a flag file not yet made."""
    for spec in filter(None, os.environ.get(HANG_ENV, "").split(",")):
        want, _, flag = spec.partition("@")
        if want != point or not flag:
            continue
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue  # that one hung already: the next spec for this point, if any
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        while True:
            time.sleep(1)


def inputs_key(**inputs: Any) -> str:
    """sha256 of a training's inputs (pairs, base checkpoint, settings): saved state is resumed only
    by a training with the same key."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def resume_point(state_dir: str | None, key: str) -> str | None:
    """The latest complete Trainer checkpoint under ``state_dir`` saved by a training with inputs
    ``key`` (None: start from step 0). State from other inputs or half-written folders is removed."""
    if not state_dir:
        return None
    root = Path(state_dir)
    marker = root / STATE_INPUTS
    if root.exists() and (not marker.is_file() or json.loads(marker.read_text() or "{}").get("key") != key):
        shutil.rmtree(root)  # another training's state (the pairs or settings changed): never resume it
    root.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        tmp = root / f".{STATE_INPUTS}.tmp"
        tmp.write_text(json.dumps({"key": key}))
        os.replace(tmp, marker)
    done = [d for d in root.glob("checkpoint-*") if (d / STATE_COMPLETE).is_file() and d.name.split("-")[-1].isdigit()]
    for d in root.glob("checkpoint-*"):
        if d not in done:
            shutil.rmtree(d, ignore_errors=True)  # a save the kill interrupted
    return str(max(done, key=lambda d: int(d.name.split("-")[-1]))) if done else None


def state_args(save_steps: Any, state_dir: str | None) -> dict[str, Any]:
    """TrainingArguments that save the Trainer's state every ``save_steps`` optimizer steps into
    ``state_dir`` (nothing without both). Old checkpoints are removed by :func:`state_callback`, after
    the new one is complete, not by the Trainer's rotation, which deletes before that."""
    if not state_dir or not save_steps:
        return {}
    return {"output_dir": state_dir, "save_strategy": "steps", "save_steps": int(save_steps), "save_total_limit": None}


def state_callback() -> Any:
    """A TrainerCallback that makes each saved state durable and marks it complete, keeps only the
    newest, and skips the save at the last step (the worker saves the final model itself)."""
    from transformers import TrainerCallback

    class DurableState(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                for f in folder.rglob("*"):
                    if f.is_file():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                (folder / STATE_COMPLETE).write_text(str(state.global_step))
                for old in Path(args.output_dir).glob("checkpoint-*"):
                    if old != folder:
                        shutil.rmtree(old, ignore_errors=True)
                hang_point(f"train_saved:{state.global_step}")
            return control

    return DurableState()
