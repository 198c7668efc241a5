"""The run directory: round folders, stage outputs written atomically, and the manifest.

Layout::

    RUN_DIR/
      manifest.json            run-level state: config, MLflow run ids, per-round status
      config.yaml              the resolved config of the first start
                               (both with secrets masked: orchestrator/redact.py)
      rounds/round_001/
        prompts.jsonl          one file per stage, written to a temp name then renamed, so a file
        generations.jsonl      that exists is complete; resume restarts at the first missing one
        judgments.jsonl
        pairs.jsonl
        <stage>.metrics.json   the stage's metrics (what MLflow gets)
        checkpoints/<name>/    the round's named checkpoints (safetensors + tokenizer): "policy"
                               (the trained model), and whatever a recipe or plug-in adds
                               ("judge", "rm_a", "expo", ...), each renamed into place
      mlflow.db                default tracking store
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from orchestrator.redact import redact_config
from orchestrator.types import Record

R = TypeVar("R", bound=Record)

MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, records: Iterable[Record | dict[str, Any]]) -> None:
    lines = []
    for rec in records:
        data = rec.to_dict() if isinstance(rec, Record) else rec
        lines.append(json.dumps(data, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def parse_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a ValueError naming the line on bad JSON."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})") from None


def read_jsonl(path: Path, cls: type[R] | None = None) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        try:
            rows = [data for _, data in parse_jsonl(fh)]
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return [cls.from_dict(data) for data in rows] if cls is not None else rows


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; a leftover ``final_dir`` from a crash is replaced."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


CHECKPOINT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def check_checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.match(str(name)):
        raise ValueError(f"checkpoint name {name!r}: want lowercase letters, digits and _ (e.g. policy, judge, rm_a)")
    return str(name)


class RoundDir:
    """One round's folder. A stage is done when its output file exists."""

    def __init__(self, root: Path, index: int):
        self.index = index
        self.path = root / "rounds" / f"round_{index:03d}"

    def file(self, stage: str) -> Path:
        return self.path / f"{stage}.jsonl"

    def metrics_file(self, stage: str) -> Path:
        return self.path / f"{stage}.metrics.json"

    def has(self, stage: str) -> bool:
        return self.file(stage).exists()

    def write(self, stage: str, records: Iterable[Record | dict[str, Any]], metrics: dict[str, float]) -> None:
        # Metrics first: a stage counts as done only once its data file exists, and then its
        # metrics are guaranteed to be there too.
        write_json(self.metrics_file(stage), metrics)
        write_jsonl(self.file(stage), records)

    def read(self, stage: str, cls: type[R]) -> list[R]:
        return read_jsonl(self.file(stage), cls)

    def metrics(self, stage: str) -> dict[str, float]:
        path = self.metrics_file(stage)
        return read_json(path) if path.exists() else {}

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / check_checkpoint_name(name)

    def checkpoint_tmp(self, name: str) -> Path:
        """A fresh temporary folder for checkpoint ``name``: unique, so two writers never share one."""
        tmp = self.path / "checkpoints" / f".{check_checkpoint_name(name)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def has_checkpoint(self, name: str) -> bool:
        return (self.checkpoint(name) / "config.json").exists()


class RunStore:
    """Owns RUN_DIR and its manifest. The manifest is rewritten atomically on every change."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.manifest_path = self.root / MANIFEST
        self.manifest: dict[str, Any] = {}

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def create(self, config: dict[str, Any], config_yaml: str | None = None) -> None:
        """A new run: ``config`` (plain, resolved) goes to the manifest and, unless ``config_yaml``
        is given (written as it is: its caller masks it), to config.yaml, with secrets masked. The
        run reads neither back for its values, only to compare configs on resume (masked forms)."""
        self.root.mkdir(parents=True, exist_ok=True)
        safe = redact_config(config)
        if config_yaml is None:
            from omegaconf import OmegaConf

            config_yaml = OmegaConf.to_yaml(OmegaConf.create(safe))
        atomic_write_text(self.root / "config.yaml", config_yaml)
        self.manifest = {"config": safe, "rounds": {}, "mlflow": {}, "status": "running"}
        self.save()

    def load(self) -> None:
        self.manifest = read_json(self.manifest_path)

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def round(self, index: int) -> RoundDir:
        return RoundDir(self.root, index)

    def round_state(self, index: int) -> dict[str, Any]:
        return self.manifest.setdefault("rounds", {}).setdefault(str(index), {})

    def update_round(self, index: int, **fields: Any) -> None:
        self.round_state(index).update(fields)
        self.save()

    def completed_rounds(self) -> list[int]:
        return sorted(int(k) for k, v in self.manifest.get("rounds", {}).items() if v.get("status") == "done")
