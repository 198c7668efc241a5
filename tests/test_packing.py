"""workers/packing.py: prefix-shared, padding-free DPO rows give each reply the log-probability and the
gradient it gets in its own unpadded row, on a tiny random Llama (sdpa and eager attention)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tiny_model import make_tiny_checkpoint  # noqa: E402
from workers import packing  # noqa: E402

# Three pairs of unequal prompt and reply lengths (ids from the tiny vocabulary); the last reply is empty.
EXAMPLES = [
    {"prompt_ids": [3, 40, 41, 42], "chosen_ids": [50, 51, 52], "rejected_ids": [60, 61, 62, 63, 64], "weight": 1.0, "epsilon": 0.0},
    {"prompt_ids": [3, 70], "chosen_ids": [80, 81, 82, 83, 84, 85], "rejected_ids": [90], "weight": 0.5, "epsilon": 0.1},
    {"prompt_ids": [3, 100, 101, 102, 103], "chosen_ids": [110, 111], "rejected_ids": [], "weight": 1.0, "epsilon": 0.0},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def load(base: str, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=attn).eval()


def own_row_logps(model, prompt: list[int], reply: list[int]):
    """The reply's summed log-prob with prompt + reply alone in a row (no mask, no padding)."""
    if not reply:
        return torch.zeros(())
    ids = torch.tensor([prompt + reply])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0][len(prompt) - 1 :].sum()


def test_pack_layout():
    batch = packing.pack(EXAMPLES[:2])
    p0, p1 = EXAMPLES[0], EXAMPLES[1]
    assert batch["input_ids"][0].tolist() == (p0["prompt_ids"] + p0["chosen_ids"] + p0["rejected_ids"]
                                             + p1["prompt_ids"] + p1["chosen_ids"] + p1["rejected_ids"])  # fmt: skip
    # The rejected reply takes the chosen reply's positions: both continue the prompt.
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8] + [0, 1, 2, 3, 4, 5, 6, 7, 2]
    mask = batch["attention_mask"][0, 0]
    assert mask.shape == (21, 21)
    assert mask[7, :7].tolist() == [True] * 4 + [False] * 3  # the first rejected token: the prompt, not the chosen
    assert mask[7, 7] and not mask[7, 8]  # itself, nothing after it
    assert not mask[12:, :12].any() and not mask[:12, 12:].any()  # pairs never see each other
    # Each reply's first token is predicted from the prompt's last position.
    assert batch["logits_index"].tolist()[:3] == [3, 4, 5] and batch["logits_index"].tolist()[3:8] == [3, 7, 8, 9, 10]
    assert batch["labels"].tolist()[:8] == p0["chosen_ids"] + p0["rejected_ids"]
    assert batch["owner"].tolist() == [0] * 3 + [2] * 5 + [1] * 6 + [3] * 1  # chosen j, rejected B + j
    assert batch["reply_tokens"].tolist() == [3, 6, 5, 1]
    assert batch["pair_weight"].tolist() == [1.0, 0.5] and batch["pair_epsilon"].tolist() == pytest.approx([0.0, 0.1])
    assert "ref_chosen_logps" not in batch


def test_pack_truncates_like_trl():
    """max_length cuts prompt + reply from the end, per reply, as TRL's collator does (keep_start)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    example = {k: v for k, v in EXAMPLES[0].items() if k.endswith("_ids")}
    batch = packing.pack([example], max_length=6)
    padded = DataCollatorForPreference(pad_token_id=0, max_length=6)([example])
    kept = padded["completion_mask"].sum(dim=1).tolist()  # reply tokens left: chosen 2, rejected 2
    assert batch["reply_tokens"].tolist() == kept == [2, 2]
    assert batch["labels"].tolist() == [50, 51, 60, 61]
    with pytest.raises(ValueError, match="empty prompt"):
        packing.pack([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_equal_own_rows(base, attn):
    model = load(base, attn)
    examples = [EXAMPLES[0], EXAMPLES[2], EXAMPLES[1]]  # the empty reply mid-row: nothing shifts after it
    with torch.no_grad():
        chosen, rejected = packing.pair_logps(model, packing.pack(examples))
        for j, ex in enumerate(examples):
            assert chosen[j].item() == pytest.approx(own_row_logps(model, ex["prompt_ids"], ex["chosen_ids"]).item(), abs=1e-4)
            assert rejected[j].item() == pytest.approx(own_row_logps(model, ex["prompt_ids"], ex["rejected_ids"]).item(), abs=1e-4)
    assert rejected[1].item() == 0.0 and chosen[0].item() < -1.0  # a random model: far from certain


def test_packed_gradient_equals_own_rows(base):
    """One backward through the packed row gives the gradient of the same loss over separate rows:
    the shared prompt collects both replies' gradients."""
    weights = torch.tensor([1.0, -0.7, 0.4])  # arbitrary mix, so chosen and rejected pull differently

    def grads(loss_fn):
        model = load(base, "sdpa")
        loss_fn(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def packed_loss(model):
        chosen, rejected = packing.pair_logps(model, packing.pack(EXAMPLES))
        return (weights * (chosen - 0.5 * rejected)).sum()

    def own_rows_loss(model):
        terms = [own_row_logps(model, e["prompt_ids"], e["chosen_ids"]) - 0.5 * own_row_logps(model, e["prompt_ids"], e["rejected_ids"])
                 for e in EXAMPLES]
        return (weights * torch.stack(terms)).sum()

    a, b = grads(packed_loss), grads(own_rows_loss)
    assert a.keys() == b.keys() and len(a) > 5
    scale = max(g.abs().max().item() for g in b.values())
    assert scale > 1e-3
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-4 * scale
