"""A tiny random Llama checkpoint with a real tokenizer, built offline for tests.

``make_tiny_checkpoint(path)`` writes a complete Hugging Face checkpoint (config, safetensors weights,
generation_config, tokenizer with a ChatML chat template) that loads with ``AutoModelForCausalLM`` /
``AutoTokenizer`` and is shaped so vLLM can serve it too: head_dim 64 (hidden 128, 2 heads, 2 kv heads),
intermediate 256, 2 layers, 512 positions, untied embeddings, float32.

The tokenizer is a byte-level BPE trained here on a few sentences, so any text encodes (no ``<unk>``) and
decoding round-trips. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

_SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2-Instruct uses; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A helpful assistant answers the question clearly and politely.",
    "Please explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea, the wind and the stars.",
    "What is the capital of France? The capital of France is Paris.",
    "Score the response on a scale from one to five points.",
    "The answer is correct, concise and well organised.",
    "Review the user's question and the corresponding response using the additive scoring system.",
    "Add one point if the response is relevant and provides some information.",
    "Score: 4. The response addresses most of the question but misses a detail.",
    "Numbers like 1, 2, 3, 4, 5, 10, 42 and 100 appear in many answers.",
    "def add(a, b):\n    return a + b\n",
    "Instruction: summarise the following paragraph in one sentence.",
    "I am sorry, but I cannot help with that request.",
    "Here is a step by step solution to the problem.",
]

VOCAB_SIZE = 512


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ~512 tokens) with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random LlamaForCausalLM checkpoint plus tokenizer into ``path``; return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,  # room for the judge prompt (~870 tokens with this tokenizer)
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # transformers 5 records its backend class name; the portable name loads in 4.x, 5.x and vLLM alike.
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    return path
