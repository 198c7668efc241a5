"""CPU settings every worker process makes first."""

from __future__ import annotations

import os


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
