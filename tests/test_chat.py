"""orchestrator.chat: message checks, the instruction / transcript views, and template encoding
on the tiny test tokenizer (ChatML) and, when it is already converted, the default SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import chat
from orchestrator.chat import user

MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    *user("What is the capital of France?"),
    {"role": "assistant", "content": "Paris."},
    *user("Refine your answer."),
]


@pytest.fixture(scope="module")
def tok():
    from tiny_model import build_tokenizer

    return build_tokenizer()


# -- messages -----------------------------------------------------------------------------
def test_as_messages_accepts_a_string_and_copies_lists():
    assert chat.as_messages("hi") == [{"role": "user", "content": "hi"}]
    got = chat.as_messages(MULTI_TURN)
    assert got == MULTI_TURN and got is not MULTI_TURN and got[0] is not MULTI_TURN[0]


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("", "content"),
        ([], "non-empty list"),
        (None, "non-empty list"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": ""}], "content"),
        ([{"role": "user", "content": ["a"]}], "content"),
        ([{"content": "x"}], "exactly"),
        ([*user("q"), {"role": "assistant", "content": "a"}], "end with a user turn"),
        ([{"role": "system", "content": "s"}], "end with a user turn"),
    ],
)
def test_as_messages_rejects(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        chat.as_messages(value)


def test_last_user_and_transcript():
    assert chat.last_user(MULTI_TURN) == "Refine your answer."
    # A lone user message is just its content: the default judge prompt is unchanged.
    assert chat.transcript(user("What is 2+2?")) == "What is 2+2?"
    assert chat.transcript(MULTI_TURN) == (
        "System: You answer briefly.\n\nUser: What is the capital of France?\n\nAssistant: Paris.\n\nUser: Refine your answer."
    )


# -- encoding -------------------------------------------------------------------------------
def test_encode_renders_every_turn_and_opens_the_reply(tok):
    ids = chat.encode(tok, MULTI_TURN)
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nRefine your answer.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(chat.encode(tok, MULTI_TURN, add_generation_prompt=False)).endswith("Refine your answer.<|im_end|>\n")


def test_encode_handles_list_and_mapping_results(tok):
    """``apply_chat_template`` returns a BatchEncoding (transformers 5), a dict or a plain list."""
    want = chat.encode(tok, user("hi"))

    class Returns:
        def __init__(self, value):
            self.value = value

        def apply_chat_template(self, *args, **kwargs):
            return self.value

    assert chat.encode(Returns(list(want)), user("hi")) == want
    assert chat.encode(Returns({"input_ids": list(want)}), user("hi")) == want
    assert chat.encode(Returns(tok.apply_chat_template(user("hi"), tokenize=True, add_generation_prompt=True)), user("hi")) == want


def test_assistant_prefix_is_plain_text_after_the_opened_turn(tok):
    base = chat.encode(tok, user("Rate this."))
    ids = chat.encode(tok, user("Rate this."), assistant_prefix="Score:")
    assert ids[: len(base)] == base and ids[len(base):] == tok.encode("Score:", add_special_tokens=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\nScore:")


def test_encode_text_has_no_template(tok):
    assert chat.encode_text(tok, "Task 1:") == tok.encode("Task 1:", add_special_tokens=True)
    assert "<|im_start|>" not in tok.decode(chat.encode_text(tok, "Task 1:", assistant_prefix=" x"))


def test_encode_pair_splits_after_the_sampled_prompt(tok):
    prompt_ids, completion_ids = chat.encode_pair(tok, MULTI_TURN, "The capital of France is Paris.")
    assert prompt_ids == chat.encode(tok, MULTI_TURN)
    # The reply ends with the template's end of turn: training teaches the model to stop there.
    assert tok.decode(completion_ids) == "The capital of France is Paris.<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in completion_ids


def test_encode_pair_refuses_a_template_that_rewrites_the_prompt():
    from tiny_model import build_tokenizer

    # The generation prompt opens "assistant" but a written reply is headed "bot": the sampled
    # prompt is no prefix of prompt + reply, and training on it would teach another context.
    odd = build_tokenizer()
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\\n' "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="not render the prompt as a prefix"):
        chat.encode_pair(odd, user("hi"), "hello")


# -- the default model's tokenizer, when it has been converted already -----------------------
def _default_checkpoint() -> Path | None:
    found = sorted(Path("~/.cache/selfplay-orchestrator/models").expanduser().glob("SmolLM2-135M-Instruct-*/tokenizer_config.json"))
    return found[-1].parent if found else None


@pytest.mark.slow
@pytest.mark.skipif(_default_checkpoint() is None, reason="the default SmolLM2 checkpoint is not converted on this host")
def test_default_tokenizer_round_trip():
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(str(_default_checkpoint()))
    prompt_ids, completion_ids = chat.encode_pair(smol, MULTI_TURN, "Paris is the capital of France.")
    assert prompt_ids == chat.encode(smol, MULTI_TURN)
    assert smol.decode(prompt_ids).endswith("<|im_start|>user\nRefine your answer.<|im_end|>\n<|im_start|>assistant\n")
    assert smol.decode(prompt_ids).count("<|im_start|>") == 5
    assert smol.eos_token_id in completion_ids  # <|im_end|>
    assert smol.decode(completion_ids).startswith("Paris is the capital of France.<|im_end|>")
