"""ExPO model extrapolation (Zheng et al. 2024; algorithms.md 4.1): theta = theta_1 + alpha * (theta_1 - theta_0).

``extrapolate(weak, strong, alpha, out)`` reads two Hugging Face checkpoints tensor by tensor and
writes the extrapolated one, so memory stays near one tensor of each input, not two whole models:
the output's safetensors header is written first (names, dtypes, shapes and offsets are known from
the inputs' headers) and each tensor's bytes follow as they are computed.

- Every floating-point tensor is extrapolated, in float64, then rounded once to its own dtype:
  alpha = 0 gives theta_1 bit for bit, a tensor equal in both inputs stays bit for bit (buffers, a
  frozen embedding), and any other value is within one ulp of (1 + alpha) * theta_1 - alpha * theta_0.
  The official code touches ``named_parameters`` only; persistent buffers that differ would be
  extrapolated here too, which is the same first-order argument applied consistently.
- Tied embeddings: a tied ``lm_head`` is not stored, so it follows the extrapolated embedding.
- Integer and boolean tensors (position ids and the like) must be equal in both and are copied.
- Names, shapes and dtypes must match exactly; anything else is refused with one line.
- Non-tensor files (config, tokenizer, generation config, the shard index) come from theta_1.
- LoRA: checkpoints here are merged (the trainer merges adapters), so this is the paper's formula
  on merged weights, which equals scaling the adapter delta by (1 + alpha) when theta_0 is its base.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import OrchestratorError
from orchestrator.models import SEAL, seal_checkpoint

if TYPE_CHECKING:
    import torch


def read_header(file: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensors of one safetensors file ({name: {dtype, shape, data_offsets}}) and its metadata."""
    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return header, header.pop("__metadata__", {})


def tensor_files(checkpoint: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file that holds it} over every shard of a checkpoint."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise OrchestratorError(f"{checkpoint}: no .safetensors files (ExPO needs safetensors checkpoints)")
    return {name: file for file in files for name in read_header(file)[0]}


def check_compatible(weak: Path, strong: Path) -> dict[str, Path]:
    """The weak checkpoint's file of each tensor, once names, shapes and dtypes all match."""
    w, s = tensor_files(weak), tensor_files(strong)
    if set(w) != set(s):
        only_w, only_s = sorted(set(w) - set(s)), sorted(set(s) - set(w))
        raise OrchestratorError(
            f"ExPO: the checkpoints hold different tensors (only in weak={weak}: {only_w[:3]}; only in strong={strong}: {only_s[:3]})"
        )
    headers = {f: read_header(f)[0] for f in {*w.values(), *s.values()}}
    for name in s:
        hw, hs = headers[w[name]][name], headers[s[name]][name]
        if hw["shape"] != hs["shape"] or hw["dtype"] != hs["dtype"]:
            raise OrchestratorError(
                f"ExPO: tensor {name} is {hw['dtype']}{hw['shape']} in weak={weak} but {hs['dtype']}{hs['shape']} in strong={strong}"
            )
    return w


def extrapolate_tensor(theta_1: "torch.Tensor", theta_0: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """theta_1 + alpha * (theta_1 - theta_0) in float64, rounded once to theta_1's dtype."""
    if not theta_1.is_floating_point():
        if not bool((theta_1 == theta_0).all()):
            raise OrchestratorError("ExPO: a non-floating-point tensor differs between the checkpoints")
        return theta_1
    t1 = theta_1.double()
    return (t1 + alpha * (t1 - theta_0.double())).to(theta_1.dtype)


def extrapolate(weak: str | Path, strong: str | Path, alpha: float, out: str | Path) -> dict[str, float]:
    """Write theta_strong + alpha * (theta_strong - theta_weak) to ``out`` (which must not exist).

    Returns metrics: tensors written, how many changed, and the relative size of the update
    ``|theta_1 - theta_0| / |theta_1|`` over all floating-point weights (what alpha scales).
    """
    import torch
    from safetensors import safe_open

    weak, strong, out = Path(weak), Path(strong), Path(out)
    alpha = float(alpha)
    if out.exists():
        raise OrchestratorError(f"ExPO: out={out} exists; choose a new folder")
    weak_files = check_compatible(weak, strong)
    out.mkdir(parents=True)
    for item in strong.iterdir():  # config, tokenizer, generation config, shard index
        if item.is_file() and item.suffix != ".safetensors" and item.name != SEAL:  # strong's seal is not ours
            shutil.copy2(item, out / item.name)
    delta_sq = base_sq = 0.0
    written = changed = 0
    with ExitStack() as stack:
        # safe_open maps the files: a tensor is read when it is asked for, and only then.
        weak_open = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(weak_files.values())}
        for file in sorted(strong.glob("*.safetensors")):
            header, metadata = read_header(file)
            names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
            strong_open = stack.enter_context(safe_open(str(file), framework="pt"))
            with open(out / file.name, "wb") as fh:
                fh.write(_header_bytes(header, names, metadata))
                for name in names:
                    theta_1 = strong_open.get_tensor(name)
                    theta_0 = weak_open[weak_files[name]].get_tensor(name)
                    new = extrapolate_tensor(theta_1, theta_0, alpha)
                    if theta_1.is_floating_point():
                        diff = theta_1.double() - theta_0.double()
                        delta_sq += float((diff * diff).sum())
                        base_sq += float((theta_1.double() ** 2).sum())
                        changed += int(bool((new != theta_1).any()))
                    fh.write(new.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    written += 1
                fh.flush()
                os.fsync(fh.fileno())
    seal_checkpoint(out)  # sealed where it was written, as every checkpoint (orchestrator.models)
    return {
        "expo/alpha": alpha,
        "expo/tensors": float(written),
        "expo/tensors_changed": float(changed),
        "expo/update_rel_norm": (delta_sq**0.5) / (base_sq**0.5) if base_sq else 0.0,
    }


def _header_bytes(header: dict[str, dict], names: list[str], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``names`` in that order, packed back to back; metadata kept
    (transformers refuses a file without ``format: pt``)."""
    layout: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        start, end = header[name]["data_offsets"]
        layout[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"], "data_offsets": [offset, offset + end - start]}
        offset += end - start
    raw = json.dumps(layout, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw
