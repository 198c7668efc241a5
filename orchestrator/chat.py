"""Chat prompts as messages, and the one place a tokenizer's chat template is applied.

Records carry prompts as ``[{"role", "content"}, ...]`` ending with a user turn, so multi-turn
prompts (a refinement turn after an earlier answer) and system messages flow through every stage.
The sampler (workers/vllm_worker.py) and the trainer (workers/trainer.py) both tokenize through
``encode`` / ``encode_pair`` here, so the prompt ids the trainer trains on are exactly the ids the
policy sampled from.

Special tokens are handled as the tokenizer does by default: a special-token string written
inside a message's content (``<|im_end|>``) becomes that control token. Every template and
prompt tokenization is in this module, so changing that later is a change here alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


Messages = list[Message]


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def as_messages(value: Any) -> Messages:
    """A prompt as messages: a str is one user message; a list of {role, content} is checked.

    Roles are system / user / assistant, contents non-blank strings, no other keys, and the last
    message is the user's (the turn the model answers). Raises ValueError naming the problem.
    """
    if isinstance(value, str):
        value = user(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} objects, got {value!r:.80}")
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must be an object with exactly \"role\" and \"content\", got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; want one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"messages[{i}] ({m['role']}) has no non-empty \"content\" string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"messages must end with a user turn (the one to answer), not {out[-1]['role']!r}")
    return out


def last_user(messages: Messages) -> str:
    """The instruction: the last user message (what dedup and train/eval overlap checks compare)."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def transcript(messages: Messages) -> str:
    """What a judge is shown as the user's question.

    A lone user message is its content, so single-turn judge prompts read as they always have;
    anything else is the conversation, one ``Role: content`` block per turn.
    """
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list, or (transformers 5, vLLM's wrappers) a dict / BatchEncoding.
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    # Tokenised in one go (not text, then encode) so a template that writes BOS does not get a second one.
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))


def _prefixed(tokenizer: Any, ids: list[int], assistant_prefix: str) -> list[int]:
    return ids + tokenizer.encode(assistant_prefix, add_special_tokens=False) if assistant_prefix else ids


def encode(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = True, assistant_prefix: str = "") -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, opening the assistant turn.

    ``assistant_prefix`` (e.g. ``Score:``) is appended as plain text tokens: the start of the
    assistant's reply, so the next token continues it.
    """
    return _prefixed(tokenizer, _render(tokenizer, list(messages), add_generation_prompt), assistant_prefix)


def encode_text(tokenizer: Any, text: str, *, assistant_prefix: str = "") -> list[int]:
    """Token ids of a raw (non-chat) prompt: the text with the tokenizer's own BOS, no template."""
    return _prefixed(tokenizer, tokenizer.encode(text, add_special_tokens=True), assistant_prefix)


def encode_pair(tokenizer: Any, messages: Messages, completion: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` for training on ``completion`` as the reply to ``messages``.

    The template renders the prompt with the assistant turn appended; the split is after
    ``encode(messages)``, so the prompt ids are the sampler's and the completion ends with the
    template's end of turn (``<|im_end|>`` in ChatML), which teaches the model to stop.
    """
    prompt_ids = encode(tokenizer, messages)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": completion}], False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a prefix of prompt + reply (it rewrites earlier "
            "turns or merges tokens across the boundary); training would see a different prompt than sampling did"
        )
    return prompt_ids, full[len(prompt_ids):]

