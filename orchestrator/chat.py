"""Chat prompts as messages, and the one place a tokenizer's chat template is applied.

Records carry prompts as ``[{"role", "content"}, ...]`` ending with a user turn, so multi-turn
prompts (a refinement turn after an earlier answer) and system messages flow through every stage.
The sampler (workers/vllm_worker.py) and the trainer (workers/trainer.py) both tokenize through
``encode`` / ``encode_pair`` here, so the prompt ids the trainer trains on are exactly the ids the
policy sampled from.

Text is never control. A special-token string written inside a message's content (``<|im_end|>``
in a model's answer, a user's prompt, a self-instructed task) is tokenized as the plain text it
is, never as the control token: otherwise a response could close its turn and forge another (a
judge's ``Score: 5`` turn, say). Only the chat template's own control tokens are control ids.
How (``_render``): the contents' special-token strings are swapped for private-use placeholders,
the template renders that text (so a template that trims or branches on contents still does),
the render is split at the template's control tokens, and each text run between them is tokenized
with the placeholders back in place and ``split_special_tokens=True``. The split is where the
tokenizer itself would split, so a prompt with no special-token text gets exactly the ids of the
tokenizer's own ``apply_chat_template`` (tests/test_chat.py checks the tiny and SmolLM2 tokenizers).
The sampler gives vLLM these ids (``prompt_token_ids``; vLLM never tokenizes our text) and the
trainer trains on ``encode_pair``'s, so both see the same ids for the same text. (Not an escape
such as a zero-width space: that changes the text the model reads and trains on. Not
``split_special_tokens`` on the whole render: that splits the template's own tokens too.)
"""

from __future__ import annotations

import functools
import re
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


# Placeholders for special-token text inside contents while the template renders: private-use
# characters, which no template writes (``_render`` checks) and which carry no meaning to it.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}([0-9]+){_CLOSE}")


# The shapes special tokens commonly take in text (ChatML / Llama-3 ``<|...|>``, ``<s>``, ``</s>``,
# ``[INST]``): for text that goes where no tokenizer of ours is (an OpenAI-compatible server).
SPECIAL_LIKE = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>|\[/?INST\]")
_WORD_JOINER = "\u2060"


def defuse_special_text(text: str) -> str:
    """``text`` with each special-token-like string broken by an invisible word joiner after its first
    character, so a server that applies its own chat template cannot read it as a control token."""
    return SPECIAL_LIKE.sub(lambda m: m.group(0)[0] + _WORD_JOINER + m.group(0)[1:], text)


def defuse_messages(messages: Messages) -> Messages:
    return [{**m, "content": defuse_special_text(m["content"])} for m in messages]


def control_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's control tokens, text -> id: its special tokens (added tokens marked special).

    Added tokens not marked special (Qwen's ``<think>``, say) are ordinary vocabulary the model
    writes itself; the tokenizer matches them in any text and so do we.
    """
    found = {str(t): i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", True)}
    for text in getattr(tokenizer, "all_special_tokens", []):
        found.setdefault(text, tokenizer.convert_tokens_to_ids(text))
    return found


@functools.lru_cache(maxsize=32)
def _regexes(tokens: tuple[tuple[str, bool, bool], ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(control, hidden): matches the control tokens; and those or a placeholder character (what
    ``_render`` hides in contents, so a content cannot fake a placeholder either)."""
    # Longest first, as the tokenizer matches; an lstrip / rstrip token takes the whitespace next
    # to it, as the tokenizer's own split does.
    parts = [
        (r"\s*" if lstrip else "") + re.escape(text) + (r"\s*" if rstrip else "")
        for text, lstrip, rstrip in sorted(tokens, key=lambda t: -len(t[0]))
    ]
    return re.compile("|".join(parts) or "(?!)"), re.compile("|".join([*parts, f"[{_OPEN}{_CLOSE}]"]))


def _control_regexes(tokenizer: Any, control: dict[str, int]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    added = {str(t): t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return _regexes(tuple(
        (text, bool(getattr(added.get(text), "lstrip", False)), bool(getattr(added.get(text), "rstrip", False)))
        for text in control
    ))


def _plain(tokenizer: Any, text: str, *, bos: bool = False) -> list[int]:
    """``text`` as plain-text ids: a special-token string in it is its characters, not the token."""
    if not text and not bos:
        return []
    return list(tokenizer.encode(text, add_special_tokens=bos, split_special_tokens=True))


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    control = control_tokens(tokenizer)
    split, hiding = _control_regexes(tokenizer, control)
    hidden_text: list[str] = []

    def hide(match: re.Match[str]) -> str:
        hidden_text.append(match.group(0))
        return f"{_OPEN}{len(hidden_text) - 1}{_CLOSE}"

    def unhide(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: hidden_text[int(m.group(1))], text)

    hidden = [{"role": m["role"], "content": hiding.sub(hide, m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(hidden, tokenize=False, add_generation_prompt=add_generation_prompt)
    if len(_PLACEHOLDER.findall(text)) != text.count(_OPEN) or text.count(_OPEN) != text.count(_CLOSE):
        raise ValueError("the chat template writes the private-use characters U+E000 / U+E001 that orchestrator.chat reserves")
    # Without the tokenizer's BOS, as apply_chat_template tokenizes: a template that wants a BOS
    # writes it, and it is split out below as a control token.
    ids: list[int] = []
    pos = 0
    for match in split.finditer(text):
        ids += _plain(tokenizer, unhide(text[pos: match.start()]))
        ids.append(control[match.group(0).strip()])
        pos = match.end()
    return ids + _plain(tokenizer, unhide(text[pos:]))


def _prefixed(tokenizer: Any, ids: list[int], assistant_prefix: str) -> list[int]:
    return ids + _plain(tokenizer, assistant_prefix)


def encode(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = True, assistant_prefix: str = "") -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, opening the assistant turn.

    ``assistant_prefix`` (e.g. ``Score:``) is appended as plain text tokens: the start of the
    assistant's reply, so the next token continues it.
    """
    return _prefixed(tokenizer, _render(tokenizer, list(messages), add_generation_prompt), assistant_prefix)


def encode_text(tokenizer: Any, text: str, *, assistant_prefix: str = "") -> list[int]:
    """Token ids of a raw (non-chat) prompt: the text with the tokenizer's own BOS, no template."""
    return _prefixed(tokenizer, _plain(tokenizer, text, bos=True), assistant_prefix)


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

