"""Typed records that flow between the stages of a round.

Every stage reads and writes lists of these records as JSONL in the round's directory, so each
record converts to and from a plain dict (``to_dict`` / ``from_dict``). Fields that later stages
may fill (a pair's ``weight`` from a filter, a generation's ``source`` checkpoint when several
checkpoints generate at once) exist from the start so that recipes and filters extend the spine
without changing the file formats. Prompts are chat messages (orchestrator.chat), checked when a
record is built, so a malformed prompt fails where it is read or made, not in a worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator import chat
from orchestrator.chat import Messages

T = TypeVar("T")


class Record:
    """Mixin: dict round-trip for the dataclasses below (unknown keys are rejected loudly)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class Prompt(Record):
    id: str
    messages: Messages
    # "seed", "self_instruct", "file", or anything a recipe introduces (e.g. "refine").
    source: str = "seed"
    category: str | None = None

    def __post_init__(self) -> None:
        self.messages = chat.as_messages(self.messages)

    @property
    def text(self) -> str:
        """The instruction (the last user turn): what dedup, overlap checks and demos compare."""
        return chat.last_user(self.messages)


@dataclass
class GenerationRequest(Record):
    """One sampling job for a generation worker: ``n`` samples for each prompt."""

    # Chat: messages (a str is one user message); raw (``chat=False``): text sent as it is.
    prompts: list[Messages] | list[str]
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    # Chat prompts are wrapped in the tokenizer's chat template; raw prompts are sent as they are.
    chat: bool = True
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.chat:
            self.prompts = [chat.as_messages(p) for p in self.prompts]
        elif not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("a raw (chat=False) GenerationRequest takes text prompts only")


@dataclass
class Completion(Record):
    """The samples for one prompt of a ``GenerationRequest`` (``texts[i]`` has ``num_tokens[i]``)."""

    texts: list[str]
    num_tokens: list[int]
    finish_reasons: list[str]


@dataclass
class Generation(Record):
    prompt_id: str
    messages: Messages
    index: int  # sample index within the prompt
    text: str
    num_tokens: int
    finish_reason: str = "stop"
    # Which checkpoint produced it: recipes that sample several checkpoints at once (ALMA) set this.
    source: str = "policy"

    def __post_init__(self) -> None:
        self.messages = chat.as_messages(self.messages)

    @property
    def key(self) -> str:
        return f"{self.prompt_id}/{self.index}"


@dataclass
class Judgment(Record):
    """The judge's verdict on one generation; ``score`` is None when no sample parsed."""

    prompt_id: str
    index: int
    score: float | None
    samples: list[float | None]  # one entry per judge sample (K of them in text mode)
    raw: list[str] = field(default_factory=list)  # judge outputs (text mode) for auditing
    mode: str = "text"  # "text" or "score_only"
    # score_only: the judge's probability on the score tokens at all (near 1 for a judge on task).
    mass: float | None = None
    # Reward functions and hybrids (orchestrator/rewards.py): each component's raw value, e.g.
    # {"llm": 3.2, "function": 0.5}. None for an LLM judge, and then not written, so judgment files
    # stay as they were.
    components: dict[str, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["components"] is None:
            del data["components"]
        return data


@dataclass
class Pair(Record):
    prompt_id: str
    messages: Messages
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    chosen_index: int = -1
    rejected_index: int = -1
    # Per-pair training weight / label-smoothing epsilon: filters (UPO) set these, DPO reads them.
    weight: float = 1.0
    epsilon: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.messages = chat.as_messages(self.messages)


@dataclass
class Demonstration(Record):
    """One supervised example: ``response`` is the reply to the prompt ``messages`` (ALMA's SFT seed
    and best-of-N data D_r, and its judge's rating targets). ``score``: the judge's score or a human
    rating, where there is one; ``source``: where the reply came from (a file, a checkpoint)."""

    prompt_id: str
    messages: Messages
    response: str
    score: float | None = None
    source: str = "seed"

    def __post_init__(self) -> None:
        self.messages = chat.as_messages(self.messages)
        if not isinstance(self.response, str) or not self.response.strip():
            raise ValueError("a demonstration needs a non-empty \"response\" string")


@dataclass
class TrainResult(Record):
    checkpoint: str
    num_pairs: int
    steps: int
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def group_by_prompt(items: list[Any]) -> dict[str, list[Any]]:
    """Group generations or judgments by ``prompt_id``, keeping first-seen order."""
    out: dict[str, list[Any]] = {}
    for item in items:
        out.setdefault(item.prompt_id, []).append(item)
    return out
