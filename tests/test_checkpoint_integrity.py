"""Checkpoint integrity: the seal covers every file that defines the model, is fsynced before a
checkpoint is published, and every load checks it (engine start, trainer, reward model); a
training killed mid-way resumes from its last saved optimizer step.

Faults are real: files edited, removed or added on disk; a training process SIGKILLed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.models import (
    SEAL,
    CheckpointMismatch,
    checkpoint_fingerprint,
    legacy_fingerprint,
    seal_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sealed(tiny_checkpoint, tmp_path) -> Path:
    """A sealed copy of the tiny model (config, weights, generation config, tokenizer, chat template)."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    (path / SEAL).unlink(missing_ok=True)
    seal_checkpoint(path)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_seal_lists_every_file_that_defines_the_model(sealed):
    listed = {line.split("  ", 1)[1] for line in (sealed / SEAL).read_text().splitlines()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= listed
    assert listed == {p.name for p in sealed.iterdir() if p.name != SEAL}
    assert verify_checkpoint(sealed) == checkpoint_fingerprint(sealed)
    assert verify_checkpoint(sealed, checkpoint_fingerprint(sealed)) == checkpoint_fingerprint(sealed)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"])
def test_an_edited_file_is_named(sealed, name):
    digest = checkpoint_fingerprint(sealed)
    f = sealed / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit, same size
    f.write_bytes(bytes(data))
    for expected in (None, digest):
        with pytest.raises(CheckpointMismatch) as exc:
            verify_checkpoint(sealed, expected)
        line = _one_line(exc)
        assert str(sealed) in line and f"{name} has sha256" in line and "its seal says" in line


def test_a_chat_template_change_is_caught(sealed):
    cfg = json.loads((sealed / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (sealed / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="tokenizer_config.json has sha256"):
        verify_checkpoint(sealed)


def test_missing_and_added_files_are_named(sealed):
    (sealed / "chat_template.json").write_text('{"chat_template": "forged"}')  # loaders prefer it
    with pytest.raises(CheckpointMismatch, match="chat_template.json was added after the checkpoint was sealed"):
        verify_checkpoint(sealed)
    (sealed / "chat_template.json").unlink()
    (sealed / "generation_config.json").unlink()
    with pytest.raises(CheckpointMismatch, match="generation_config.json is missing"):
        verify_checkpoint(sealed)


def test_a_resealed_checkpoint_does_not_match_the_manifest(sealed):
    recorded = checkpoint_fingerprint(sealed)
    (sealed / "config.json").write_text((sealed / "config.json").read_text().replace("}", ', "x": 1}', 1))
    seal_checkpoint(sealed, reseal=True)  # someone rewrote the seal to match their edit
    with pytest.raises(CheckpointMismatch) as exc:
        verify_checkpoint(sealed, recorded)
    assert "the run's manifest says " + recorded[:12] in _one_line(exc) and "seal was rewritten" in str(exc.value)


def test_the_writer_check_refuses_files_that_differ_from_their_seal(sealed):
    """What the driver sees must be what the trainer sealed (two nodes, one storage)."""
    (sealed / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointMismatch, match="tokenizer.json has sha256"):
        seal_checkpoint(sealed)


def test_unsealed_and_legacy_checkpoints(sealed):
    (sealed / SEAL).unlink()
    assert verify_checkpoint(sealed) is None  # a folder from outside the run: nothing to check against
    assert verify_checkpoint(sealed, checkpoint_fingerprint(sealed))
    # a manifest from before the seal recorded the safetensors' sha256 only
    assert verify_checkpoint(sealed, legacy_fingerprint(sealed)) == legacy_fingerprint(sealed)
    with pytest.raises(CheckpointMismatch, match="not the checkpoint this run wrote"):
        verify_checkpoint(sealed, "0" * 64)


def test_seal_fsyncs_every_file_and_the_folder(sealed, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    (sealed / SEAL).unlink()
    seal_checkpoint(sealed)
    assert {str(p) for p in sealed.iterdir()} | {str(sealed)} <= set(synced)


def test_engine_start_checks_the_checkpoint_before_building_vllm(sealed):
    from workers.vllm_worker import VLLMWorker

    digest = checkpoint_fingerprint(sealed)
    (sealed / "config.json").write_text("{}")
    with pytest.raises(CheckpointMismatch, match="config.json has sha256"):
        VLLMWorker(str(sealed), {}, 0, digest)


def test_reward_model_load_checks_the_checkpoint(sealed):
    from workers.reward_model import _load

    (sealed / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointMismatch, match="reward model .*tokenizer.json has sha256"):
        _load(str(sealed), "bradley_terry")


def _pairs(n: int) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            "chosen": f"The answer is {2 * i}.",
            "rejected": "I do not know.",
            "chosen_score": 5.0,
            "rejected_score": 1.0,
        }
        for i in range(n)
    ]


def _train_cfg(**over) -> dict:
    from confs import composed

    from orchestrator.config import to_plain

    cfg = to_plain(composed(["model=local", "model.path=/unused"]).train)
    return {**cfg, "batch_size": 1, "micro_batch_size": 1, "learning_rate": 1e-3, "max_length": 64, **over}


def test_trainer_load_checks_its_base(sealed, tmp_path):
    from workers.trainer import TrainerWorker

    (sealed / "generation_config.json").unlink()
    with pytest.raises(CheckpointMismatch, match="base checkpoint .*generation_config.json is missing"):
        TrainerWorker(1).train(_pairs(2), str(sealed), str(tmp_path / "out"), _train_cfg(), 0)


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from workers.trainer import TrainerWorker
    args = json.load(open(sys.argv[1]))
    result = TrainerWorker(1).train(args["pairs"], args["base"], args["out"], args["cfg"], 0, args["state"])
    json.dump(result, open(args["result"], "w"))
    """
)


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_saved_step(sealed, tmp_path):
    """SIGKILL the training process right after it saved step 2 of 6; the retry goes on from step 2 and
    ends where an uninterrupted training ends."""
    from safetensors.torch import load_file

    from workers.trainer import TrainerWorker

    state = tmp_path / "state"
    flag = tmp_path / "hung"
    args = {"pairs": _pairs(6), "base": str(sealed), "out": str(tmp_path / "killed"), "cfg": _train_cfg(save_steps=2),
            "state": str(state), "result": str(tmp_path / "r.json")}  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(args))
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "ORCHESTRATOR_HANG_AT": f"train_saved:2@{flag}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "args.json")], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, "the training ended before it saved step 2"
            assert time.monotonic() < deadline, "no save of step 2 within 300 s"
            time.sleep(0.2)
        os.kill(int(flag.read_text() or proc.pid), signal.SIGKILL)  # mid-training, after its save of step 2
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not (tmp_path / "r.json").exists()
    assert [p.name for p in state.glob("checkpoint-*")] == ["checkpoint-2"]

    resumed = TrainerWorker(1).train(args["pairs"], args["base"], str(tmp_path / "resumed"), args["cfg"], 0, str(state))
    assert resumed["metrics"]["train/resumed_from_step"] == 2.0 and resumed["steps"] == 6
    fresh = TrainerWorker(1).train(args["pairs"], args["base"], str(tmp_path / "fresh"), _train_cfg(save_steps=None), 0)
    assert fresh["metrics"]["train/resumed_from_step"] == 0.0 and fresh["steps"] == 6
    a, b = load_file(str(tmp_path / "resumed" / "model.safetensors")), load_file(str(tmp_path / "fresh" / "model.safetensors"))
    base = load_file(str(sealed / "model.safetensors"))
    assert any(not (a[k] == base[k]).all() for k in a)  # it trained
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a), "the resumed training did not end where a whole one ends"
    verify_checkpoint(tmp_path / "resumed")  # sealed by the trainer


def test_saved_state_of_other_inputs_is_never_resumed(tmp_path):
    from workers.cores import STATE_COMPLETE, resume_point

    state = tmp_path / "state"
    assert resume_point(str(state), "a") is None
    (state / "checkpoint-4").mkdir()
    (state / "checkpoint-4" / STATE_COMPLETE).write_text("4")
    (state / "checkpoint-6").mkdir()  # a save the kill cut short: no completion mark
    assert resume_point(str(state), "a") == str(state / "checkpoint-4")
    assert not (state / "checkpoint-6").exists()
    assert resume_point(str(state), "b") is None and not (state / "checkpoint-4").exists()
