"""Greedy eval answers shared across runs (``eval.answer_cache``).

Every run of an experiment evaluates its starting model first: on the CPU default that is 227
greedy answers, about two minutes of a round's wall time, and the same answers every time. A greedy
answer is a function of the model's files, the prompt, the decoding and the engine, so it is kept
under a key of exactly those: the model's fingerprint (the sha256 of every model file,
``orchestrator.models.checkpoint_fingerprint``), the decoding settings, the engine settings and
the vLLM version. A run that evaluates a model another run already answered the same prompts with
reuses those answers; any change of weights, tokenizer, template, decoding, engine or vLLM is a new
key and they are generated afresh. Sampled decoding (temperature > 0) is never shared: each run
draws its own answers.

The store is one JSONL file per key (``Response`` records), rewritten atomically; two runs that
add to the same key at once can lose each other's additions, never corrupt the file (it is a cache:
the answers are generated again). Each run still writes the answers it used into its own round
folder, so a run folder never depends on the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from orchestrator.store import read_jsonl, write_jsonl

log = logging.getLogger(__name__)


def engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # noqa: BLE001 - no vLLM here (an endpoint or a test worker): key on its absence
        return "none"


class AnswerCache:
    """The answers one model gave with one decoding on one engine, by prompt messages."""

    def __init__(self, root: str | Path, model: str, decoding: Mapping[str, Any], engine: Mapping[str, Any]):
        key = json.dumps({"model": model, "decoding": dict(decoding), "engine": dict(engine), "vllm": engine_version()},
                         sort_keys=True, default=str)  # fmt: skip
        self.path = Path(root).expanduser() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.jsonl"

    def _load(self, cls: type) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            return {_prompt_key(r.messages): r for r in read_jsonl(self.path, cls)}
        except (OSError, ValueError, TypeError) as exc:  # a damaged cache is regenerated, never trusted
            log.warning("eval answer cache %s unreadable (%s); answering afresh", self.path, exc)
            return {}

    def lookup(self, messages: Sequence[Any], cls: type) -> list[Any | None]:
        """The stored answer (a ``cls`` record) to each prompt, None where there is none."""
        stored = self._load(cls)
        return [stored.get(_prompt_key(m)) for m in messages]

    def add(self, responses: Sequence[Any], cls: type) -> None:
        stored = self._load(cls)
        stored.update({_prompt_key(r.messages): r for r in responses})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.path, list(stored.values()))


def _prompt_key(messages: Any) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def answer_cache(ev: Mapping[str, Any], model: str | None, engine: Mapping[str, Any]) -> AnswerCache | None:
    """The shared cache for answers of the model fingerprinted ``model``: None when ``eval.answer_cache``
    is null, the model has no fingerprint, or the decoding samples."""
    root = ev["answer_cache"]
    decoding = ev["decoding"]
    if not root or not model or float(decoding["temperature"]) != 0.0:
        return None
    return AnswerCache(root, model, decoding, engine)
