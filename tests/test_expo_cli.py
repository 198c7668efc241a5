"""``orchestrate-expo`` (orchestrator/expo_cli.py): a real extrapolation of the tiny checkpoint with a
fixed alpha (no vLLM), and one clear ``error:`` line, exit status 2, for each input it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT

from orchestrator.expo_cli import main


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    """(weak, strong): the tiny model and a copy with every weight moved a little."""
    strong = tmp_path_factory.mktemp("expo_cli") / "strong"
    shutil.copytree(tiny_checkpoint, strong)
    tensors = load_file(str(strong / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in tensors.items()},
              str(strong / "model.safetensors"), metadata={"format": "pt"})
    return Path(tiny_checkpoint), strong


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_a_fixed_alpha_writes_the_extrapolated_checkpoint(tmp_path, pair, capsys):
    weak, strong = pair
    out = tmp_path / "expo"
    code, stdout, _ = run_main(capsys, f"weak={weak}", f"strong={strong}", "alpha=0.3", f"out={out}")
    assert code == 0 and f"wrote {out}: alpha=0.3" in stdout
    got, t0, t1 = (load_file(str(p / "model.safetensors")) for p in (out, weak, strong))
    assert got.keys() == t1.keys()
    for name, theta_1 in t1.items():
        want = (1.3 * theta_1.double() - 0.3 * t0[name].double()).float()
        assert torch.allclose(got[name], want, rtol=0, atol=1e-6), name
        assert not torch.equal(got[name], theta_1), name  # it did move
    info = json.loads((out / "expo.json").read_text())
    assert info["alpha"] == 0.3 and info["weak"] == str(weak.resolve()) and info["strong"] == str(strong.resolve())
    assert info["metrics"]["expo/update_rel_norm"] > 0
    assert (out / "tokenizer_config.json").read_bytes() == (strong / "tokenizer_config.json").read_bytes()


def _mismatched(tmp_path, pair, change):
    weak, _ = pair
    other = tmp_path / "other"
    shutil.copytree(weak, other)
    tensors = load_file(str(other / "model.safetensors"))
    save_file(change(tensors), str(other / "model.safetensors"), metadata={"format": "pt"})
    return other


@pytest.mark.parametrize(
    "args, words",
    [
        (["alpha=0.3", "out=OUT"], ["missing strong=DIR"]),
        (["strong=STRONG", "alpha=0.3"], ["missing out=DIR"]),
        (["strong=STRONG", "out=OUT"], ["alpha=A", "alphas=[A,...]", "neither"]),
        (["strong=STRONG", "alpha=0.3", "alphas=[0.5]", "out=OUT"], ["not both"]),
        (["strong=STRONG", "alpha=-1", "out=OUT"], ["alpha='-1' is invalid", ">= 0"]),
        (["strong=STRONG", "alpha=big", "out=OUT"], ["alpha='big' is invalid", "number"]),
        (["strong=STRONG", "alphas=0.3", "out=OUT"], ["alphas=0.3 is invalid", "a list"]),
        (["strong=STRONG", "alphas=[0]", "out=OUT"], ["at least one alpha > 0"]),
        (["strong=STRONG", "alpha=0.3", "out=EXISTS"], ["exists; choose a new folder"]),
        (["strong=NOWHERE", "alpha=0.3", "out=OUT"], ["strong=", "no such directory"]),
        (["strong=STRONG", "alpha=0.3", "out=OUT", "beta=1"], ["unknown argument beta="]),
        (["strong=STRONG", "alpha=0.3", "out=OUT", "judge.mode=text"], ["only apply to a search"]),
        (["strong=SHAPE", "alpha=0.3", "out=OUT"], ["ExPO: tensor model.norm.weight is F32[128]", "but F32[64]"]),
        (["strong=DTYPE", "alpha=0.3", "out=OUT"], ["ExPO: tensor model.norm.weight is F32[128]", "but F64[128]"]),
        (["strong=NAMES", "alpha=0.3", "out=OUT"], ["ExPO: the checkpoints hold different tensors", "model.extra"]),
        (["strong=STRONG", "alphas=[0.5]", "out=OUT", "dev_prompts=/no/dev.jsonl"], ["dev_prompts=/no/dev.jsonl", "file not found"]),
        (["strong=STRONG", "alphas=[0.5]", "out=OUT", "generation.engine.nope=1"], ["config overrides generation.engine.nope=1"]),
    ],
)
def test_refused_inputs_give_one_error_line(tmp_path, pair, capsys, args, words):
    weak, strong = pair
    (tmp_path / "exists").mkdir()
    paths = {
        "STRONG": strong, "OUT": tmp_path / "out", "EXISTS": tmp_path / "exists", "NOWHERE": tmp_path / "nowhere",
        "SHAPE": lambda: _mismatched(tmp_path, pair, lambda t: {**t, "model.norm.weight": torch.ones(64)}),
        "DTYPE": lambda: _mismatched(tmp_path, pair, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].double()}),
        "NAMES": lambda: _mismatched(tmp_path, pair, lambda t: {**t, "model.extra": torch.ones(2)}),
    }
    resolved = []
    for arg in args:
        key, _, value = arg.partition("=")
        target = paths.get(value)
        resolved.append(f"{key}={target() if callable(target) else target}" if target is not None else arg)
    code, stdout, stderr = run_main(capsys, f"weak={weak}", *resolved)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_real_command_line(tmp_path, pair):
    """Through a new process, as the console script runs it: an error line, then a success."""
    weak, strong = pair
    cmd = [sys.executable, "-m", "orchestrator.expo_cli", f"weak={weak}", f"strong={strong}", f"out={tmp_path / 'out'}"]
    bad = subprocess.run(cmd + ["alpha=-2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: alpha='-2' is invalid: a number >= 0" and "Traceback" not in bad.stderr
    good = subprocess.run(cmd + ["alpha=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "out" / "expo.json").read_text())["alpha"] == 0.5
