"""ExPO extrapolation (orchestrator/expo.py): exact to the formula, streaming, and strict about inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.errors import OrchestratorError
from orchestrator.expo import extrapolate, extrapolate_tensor

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two same-dtype tensors (finite, same sign)."""
    ia, ib = a.view(INT_VIEW[a.dtype]).long(), b.view(INT_VIEW[b.dtype]).long()
    return int((ia - ib).abs().max())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 2.5, 25.0])
def test_small_tensors_match_the_formula_to_the_last_ulp(dtype, alpha):
    g = torch.Generator().manual_seed(0)
    t0 = torch.randn(4096, generator=g).to(dtype)
    t1 = (t0.double() + 0.01 * torch.randn(4096, generator=g, dtype=torch.float64)).to(dtype)
    got = extrapolate_tensor(t1, t0, alpha)
    exact = ((1 + alpha) * t1.double() - alpha * t0.double()).to(dtype)  # the formula, rounded once
    assert got.dtype == dtype
    assert ulps(got, exact) <= 1


def test_alpha_zero_and_equal_tensors_are_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    t0, t1 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert bitwise_equal(extrapolate_tensor(t1, t0, 0.0), t1)
    assert bitwise_equal(extrapolate_tensor(t1, t1.clone(), 7.0), t1)  # an unchanged tensor stays as it is
    ids = torch.arange(10)
    assert bitwise_equal(extrapolate_tensor(ids, ids.clone(), 0.5), ids)
    with pytest.raises(OrchestratorError, match="non-floating-point tensor differs"):
        extrapolate_tensor(ids, ids + 1, 0.5)


def test_a_real_saved_checkpoint_every_parameter_checked(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    weak = Path(tiny_checkpoint)
    strong = tmp_path / "strong"
    shutil.copytree(weak, strong)
    tensors = load_file(str(strong / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) if "norm" not in k else v for k, v in tensors.items()}
    save_file(moved, str(strong / "model.safetensors"), metadata={"format": "pt"})

    metrics = extrapolate(weak, strong, 0.5, tmp_path / "expo")
    out = load_file(str(tmp_path / "expo" / "model.safetensors"))
    base = load_file(str(weak / "model.safetensors"))
    assert out.keys() == moved.keys() and metrics["expo/tensors"] == len(out)
    for name, t1 in moved.items():
        exact = (1.5 * t1.double() - 0.5 * base[name].double()).to(t1.dtype)
        assert ulps(out[name], exact) <= 1, name
        if "norm" in name:  # unchanged by training: unchanged by extrapolation
            assert bitwise_equal(out[name], t1), name
    assert metrics["expo/tensors_changed"] == sum("norm" not in k for k in moved)
    delta = sum(float(((moved[k].double() - base[k].double()) ** 2).sum()) for k in moved) ** 0.5
    norm = sum(float((moved[k].double() ** 2).sum()) for k in moved) ** 0.5
    assert metrics["expo/update_rel_norm"] == pytest.approx(delta / norm, rel=1e-9) and delta > 0
    # config and tokenizer come from the strong checkpoint, and transformers loads the result
    assert (tmp_path / "expo" / "tokenizer_config.json").read_bytes() == (strong / "tokenizer_config.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "expo")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], out["model.embed_tokens.weight"])

    zero = extrapolate(weak, strong, 0.0, tmp_path / "zero")
    assert zero["expo/tensors_changed"] == 0
    back = load_file(str(tmp_path / "zero" / "model.safetensors"))
    assert all(bitwise_equal(back[k], moved[k]) for k in moved)


def test_sharded_checkpoints_and_tied_embeddings(tmp_path):
    # Shards split differently in the two checkpoints; a tied lm_head is simply not stored.
    g = torch.Generator().manual_seed(3)
    names = {"embed.weight": (8, 4), "layer.weight": (4, 4), "norm.weight": (4,)}
    t0 = {k: torch.randn(s, generator=g) for k, s in names.items()}
    t1 = {k: v + 0.1 for k, v in t0.items()}
    weak = tmp_path / "weak"
    weak.mkdir()
    save_file({k: t0[k] for k in ("embed.weight",)}, str(weak / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({k: t0[k] for k in ("layer.weight", "norm.weight")}, str(weak / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    strong = checkpoint(tmp_path / "strong", t1)
    extrapolate(weak, strong, 1.0, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in names:
        assert ulps(out[k], (2 * t1[k].double() - t0[k].double()).float()) <= 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {**t, "b": torch.zeros(3)}, r"hold different tensors .*only in strong=.*\['b'\]"),
        (lambda t: {**t, "a": torch.zeros(2, 3)}, r"tensor a is F32\[2\] in weak=.* but F32\[2, 3\]"),
        (lambda t: {**t, "a": t["a"].double()}, r"tensor a is F32\[2\] in weak=.* but F64\[2\]"),
    ],
)
def test_mismatched_checkpoints_are_refused(tmp_path, change, message):
    weak = checkpoint(tmp_path / "weak", {"a": torch.ones(2)})
    strong = checkpoint(tmp_path / "strong", change({"a": torch.ones(2)}))
    with pytest.raises(OrchestratorError, match=message):
        extrapolate(weak, strong, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_never_overwritten(tmp_path):
    weak = checkpoint(tmp_path / "weak", {"a": torch.ones(2)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OrchestratorError, match="exists"):
        extrapolate(weak, weak, 0.5, tmp_path / "out")
    assert json.dumps(sorted(p.name for p in (tmp_path / "out").iterdir())) == '["keep"]'
