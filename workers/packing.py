"""Prefix-shared, padding-free DPO batches: each pair's prompt runs once, its two replies beside it.

TRL's collator makes ``prompt + chosen`` and ``prompt + rejected`` two padded rows, so the prompt is
computed twice and every row is padded to the longest in the micro-batch. On the default run's pairs
that is 30 % padding at two pairs a micro-batch, and the doubled prompt is another fifth of the
real tokens. Here a micro-batch is one row without padding: for each pair ``prompt + chosen +
rejected``, where the rejected tokens take the positions the chosen ones have (they continue the
prompt) and the attention mask hides the chosen reply from them, so every reply token sees exactly
what it would in its own row. Pairs sharing a row never see each other (a block-diagonal mask).
The prompt's hidden states are the same function of the same inputs in both layouts, so the
log-probabilities are the same up to float rounding (tests/test_packing.py checks this against
TRL's padded rows on a tiny model and the gradients against unpacked rows), and the gradient
through the prompt is the sum of both replies', as it is with two rows.

Only reply positions go through the LM head (``logits_to_keep`` with the predicting positions):
the first token of each reply is predicted from the prompt's last position.

Memory: the kept logits are ``reply tokens x vocabulary`` floats per micro-batch (SmolLM2, one pair
of 256-token replies: 100 MB); the attention mask is ``row length^2`` booleans. The mask is dense,
so pairs sharing a row spend attention on each other's masked blocks: on the 2-core machine one and
two pairs a row trained equally fast (docs/speed.md).
"""

from __future__ import annotations

from typing import Any, Sequence


def pack(examples: Sequence[dict[str, Any]], max_length: int | None = None) -> dict[str, Any]:
    """One packed row for ``examples`` (``prompt_ids``, ``chosen_ids``, ``rejected_ids`` each, plus
    optional ``ref_chosen_logps`` / ``ref_rejected_logps`` / ``weight`` / ``epsilon``).

    ``max_length`` truncates ``prompt + reply`` as TRL does (keep the start), per reply. Returns
    tensors: ``input_ids`` / ``position_ids`` (1, T), ``attention_mask`` (1, 1, T, T) bool, True where
    a position may attend; ``logits_index`` (n,) the position predicting each reply token,
    ``labels`` (n,) those tokens, ``owner`` (n,) the sequence each belongs to (pair j's chosen reply
    is j, its rejected reply B + j), ``reply_tokens`` (2B,); the reference log-probs, weights and
    epsilons as (B,) tensors when the examples carry them.
    """
    import torch

    ids: list[int] = []
    positions: list[int] = []
    index: list[int] = []
    labels: list[int] = []
    owner: list[int] = []
    spans = []
    n = len(examples)
    for j, ex in enumerate(examples):
        prompt = list(ex["prompt_ids"])
        replies = []
        for reply in (ex["chosen_ids"], ex["rejected_ids"]):
            reply = list(reply)
            if max_length is not None:
                reply = reply[: max(0, max_length - len(prompt))]
            replies.append(reply)
        if not prompt:
            raise ValueError(f"pair {j} has an empty prompt: nothing to predict its reply's first token from")
        start = len(ids)
        p = len(prompt)
        chosen, rejected = replies
        ids += prompt + chosen + rejected
        positions += list(range(p)) + list(range(p, p + len(chosen))) + list(range(p, p + len(rejected)))
        for k, reply in enumerate(replies):
            first = start + p + (len(chosen) if k else 0)  # where this reply's tokens start in the row
            index += [start + p - 1] + [first + i for i in range(len(reply) - 1)] if reply else []
            labels += reply
            owner += [k * n + j] * len(reply)
        spans.append((start, p, len(chosen), len(rejected)))

    length = len(ids)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for start, p, c, r in spans:
        end = start + p + c + r
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        mask[start + p + c : end, start + p : start + p + c] = False  # the rejected reply never sees the chosen
    out: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": mask[None, None],
        "logits_index": torch.tensor(index, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "owner": torch.tensor(owner, dtype=torch.long),
        "reply_tokens": torch.tensor([c for _, _, c, _ in spans] + [r for *_, r in spans], dtype=torch.long),
    }
    for key, name in (("ref_chosen_logps", "ref_chosen_logps"), ("ref_rejected_logps", "ref_rejected_logps"),
                      ("weight", "pair_weight"), ("epsilon", "pair_epsilon")):  # fmt: skip
        if key in examples[0]:
            out[name] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
    return out


# The keys ``pack`` adds that are not model inputs.
NON_MODEL_KEYS = ("logits_index", "labels", "owner", "reply_tokens", "ref_chosen_logps", "ref_rejected_logps", "pair_weight", "pair_epsilon")


def pair_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed reply log-probabilities of a packed batch under ``model``: ``(chosen (B,), rejected (B,))``."""
    import torch

    mask = batch["attention_mask"]
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") != "sdpa":
        # eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    out = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
        logits_to_keep=batch["logits_index"], use_cache=False,
    )  # fmt: skip
    logits = out.logits[0].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"][:, None])[:, 0]
    sums = torch.zeros(batch["reply_tokens"].numel(), dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, batch["owner"], token_logps)
    chosen, rejected = sums.chunk(2)
    return chosen, rejected
