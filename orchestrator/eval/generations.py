"""The held-out prompt sets, the train/eval overlap check, and each round's cached responses.

Two sets: the held-out prompts (``eval.prompts``, compared pairwise) and the IF prompts
(``eval.if_prompts``, checked programmatically). Neither may appear among the training prompts.
The evaluated model answers each prompt once with ``eval.decoding``; the answers are cached in
``rounds/round_XXX/eval_generations.jsonl`` (written atomically), so a resumed run never redoes them,
and greedy answers also in ``eval.answer_cache`` (answer_cache.py), so another run of the same model
reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig

from orchestrator import chat
from orchestrator.chat import Messages
from orchestrator.config import to_plain
from orchestrator.data import eval_prompts_path, load_prompts
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.eval import ifeval
from orchestrator.eval.answer_cache import AnswerCache
from orchestrator.roles import call
from orchestrator.section import Section
from orchestrator.store import RoundDir, read_jsonl, write_jsonl
from orchestrator.types import GenerationRequest, Prompt, Record

GENERATIONS_FILE = "eval_generations.jsonl"
# The two prompt sets, as ``Response.set``.
HELD_OUT, IF = "eval", "if"

Key = tuple[str, str]  # (set, prompt_id)


@dataclass
class Response(Record):
    """One cached answer of the evaluated model."""

    set: str  # HELD_OUT or IF
    prompt_id: str
    messages: Messages
    text: str
    num_tokens: int
    finish_reason: str

    @property
    def key(self) -> Key:
        return self.set, self.prompt_id


# -- prompt sets and overlap --------------------------------------------------------------------
def load_eval_prompts(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The first ``eval.max_prompts`` held-out prompts (null: the set shipped in the package)."""
    prompts = load_prompts(cfg["prompts"] or eval_prompts_path(), what="eval.prompts", source="eval")
    n = cfg["max_prompts"]
    return prompts[: int(n)] if n else prompts


def load_if_items(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The first ``eval.if_max_prompts`` IF prompts (null: all, 0: none), validated."""
    n = cfg["if_max_prompts"]
    if n == 0:
        return []
    try:
        return ifeval.load_items(cfg["if_prompts"], int(n) if n else None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval.if_prompts={cfg['if_prompts'] or ifeval.DATA_FILE}: {exc}") from None


def normalise(text: str) -> str:
    return " ".join(str(text).lower().split())


def check_no_overlap(eval_texts: Sequence[str], train: Sequence[str | Prompt], what: str = "eval prompts") -> None:
    """Refuse eval prompts that also appear among the training prompts (case/whitespace-insensitive)."""
    seen = {normalise(t.text if isinstance(t, Prompt) else t) for t in train}
    shared = [t for t in eval_texts if normalise(t) in seen]
    if shared:
        example = shared[0] if len(shared[0]) <= 100 else shared[0][:100] + "..."
        raise ConfigError(
            f"{len(shared)} of the {what} also appear among the training prompts (e.g. {example!r}); "
            f"held-out prompts must never be trained on: remove them from data.prompts or point eval.prompts elsewhere"
        )


def held_out_sets(cfg: Mapping[str, Any], train: Sequence[str | Prompt]) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """Both prompt sets of the ``eval`` section, once neither overlaps ``train``."""
    prompts, items = load_eval_prompts(cfg), load_if_items(cfg)
    check_no_overlap([p.text for p in prompts], train, what="eval prompts")
    check_no_overlap([it["prompt"] for it in items], train, what="IF eval prompts")
    return prompts, items


def preflight(cfg: DictConfig, train_prompts: Sequence[Prompt]) -> None:
    """Before the first round: the prompt sets load and none is among ``train_prompts``
    (ConfigError otherwise). Nothing to check with ``eval.every=0``."""
    ev = Section("eval", to_plain(cfg.eval))
    if int(ev["every"]) > 0:
        held_out_sets(ev, train_prompts)


def wanted(prompts: Sequence[Prompt], items: Sequence[Mapping[str, Any]]) -> list[tuple[Key, Messages]]:
    """Every prompt the evaluated model answers: (key, messages), held-out prompts first."""
    return [((HELD_OUT, p.id), p.messages) for p in prompts] + [((IF, it["id"]), chat.user(it["prompt"])) for it in items]


# -- the cache ----------------------------------------------------------------------------------
def cached(rdir: RoundDir, file: str = GENERATIONS_FILE) -> dict[Key, Response]:
    path = rdir.path / file
    return {r.key: r for r in read_jsonl(path, Response)} if path.exists() else {}


def has_responses(rdir: RoundDir) -> bool:
    return (rdir.path / GENERATIONS_FILE).exists()


def generate_cached(
    policy: Any, rdir: RoundDir, want: Sequence[tuple[Key, Messages]], decoding: Mapping[str, Any],
    file: str = GENERATIONS_FILE, shared: AnswerCache | None = None,
) -> tuple[dict[Key, Response], int, int]:
    """One answer per wanted prompt; cached ones (in the round's ``file``) are reused, then those in
    ``shared`` (the same model's greedy answers from another run, answer_cache.py).

    Returns (all cached answers by key, how many were generated now, how many came from ``shared``).
    """
    cache = cached(rdir, file)
    # A cached answer counts only for the same prompt (a changed prompt file is answered anew).
    missing = [(key, msgs) for key, msgs in want if key not in cache or cache[key].messages != msgs]
    reused = 0
    if missing and shared is not None:
        found = shared.lookup([msgs for _, msgs in missing], Response)
        for ((kind, pid), msgs), hit in zip(missing, found):
            if hit is not None:
                cache[(kind, pid)] = Response(kind, pid, msgs, hit.text, hit.num_tokens, hit.finish_reason)
        reused = sum(hit is not None for hit in found)
        missing = [m for m, hit in zip(missing, found) if hit is None]
        if reused:
            write_jsonl(rdir.path / file, list(cache.values()))
    if missing:
        request = GenerationRequest(
            prompts=[msgs for _, msgs in missing],
            n=1,
            temperature=float(decoding["temperature"]),
            top_p=float(decoding["top_p"]),
            max_tokens=int(decoding["max_tokens"]),
            chat=True,
        )
        completions = call(policy, "generate", request)
        if len(completions) != len(missing):
            raise OrchestratorError(f"eval: the policy returned {len(completions)} completions for {len(missing)} prompts")
        for ((kind, pid), msgs), comp in zip(missing, completions):
            cache[(kind, pid)] = Response(kind, pid, msgs, comp.texts[0], int(comp.num_tokens[0]), str(comp.finish_reasons[0]))
        write_jsonl(rdir.path / file, list(cache.values()))
        if shared is not None:
            shared.add([cache[key] for key, _ in missing], Response)
    return cache, len(missing), reused
