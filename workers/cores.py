"""CPU settings every worker process makes first."""

from __future__ import annotations

import os
from typing import Any, Iterator


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


def padded_batches(seqs: list[list[int]], pad_id: int, batch_size: int) -> Iterator[tuple[list[int], Any, Any]]:
    """``(indices, ids, mask)`` per batch of ``seqs``, batched by length (little padding), right-padded."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, : len(seqs[i])] = 1
        yield idx, ids, mask
