"""TrainerWorker: DPO on a tiny random Llama (full and LoRA), weighted DPO, and its errors."""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from confs import section  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from orchestrator import chat  # noqa: E402
from tiny_model import make_tiny_checkpoint  # noqa: E402
from workers import trainer as trainer_mod  # noqa: E402
from workers.trainer import TrainerWorker  # noqa: E402

METRIC_KEYS = [
    "train/loss",
    "train/rewards_chosen",
    "train/rewards_rejected",
    "train/rewards_margins",
    "train/rewards_accuracies",
    "train/logps_chosen",
    "train/logps_rejected",
    "train/pairs_per_s",
]


def make_pairs(n: int = 8, **extra) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "messages": chat.user(f"What is {i} plus {i}?"),
            "chosen": f"The answer is {2 * i}.",
            "rejected": "I am sorry, but I cannot help with that request.",
            "chosen_score": 5.0,
            "rejected_score": 1.0,
            **extra,
        }
        for i in range(n)
    ]


def make_cfg(**over) -> dict:
    """conf/train/dpo.yaml, with a learning rate that moves a tiny model in a step and small batches."""
    small = {
        "learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 2, "max_length": 256,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    return section("train", **{**small, **over})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="module")
def worker() -> TrainerWorker:
    return TrainerWorker(threads=2)


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_checkpoint(out: str, base: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = set(os.listdir(out))
    assert "model.safetensors" in names and "config.json" in names and "generation_config.json" in names
    assert not any(n.startswith("adapter_") for n in names), names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    # The config round-trips unchanged (dropout, pad id and use_cache restored); only the weights moved.
    base_cfg, out_cfg = AutoModelForCausalLM.from_pretrained(base).config, model.config
    assert out_cfg.attention_dropout == base_cfg.attention_dropout == 0.0
    assert out_cfg.use_cache == base_cfg.use_cache
    assert max_abs_diff(weights(out), weights(base)) > 1e-4


def check_result(result: dict, out: str, n_pairs: int, batch: int, epochs: int = 1) -> None:
    assert result["checkpoint"] == out
    assert result["num_pairs"] == n_pairs
    assert result["steps"] == math.ceil(n_pairs / batch) * epochs
    assert result["wall_s"] > 0
    metrics = result["metrics"]
    for key in METRIC_KEYS:
        assert key in metrics, key
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["train/pairs_per_s"] > 0
    assert metrics["train/dropout.attention_dropout"] == 0.1
    assert all(isinstance(v, float) for v in metrics.values())


def test_full_finetune(base, worker, tmp_path):
    out = str(tmp_path / "out")
    # 10 pairs, batch 4 (2 x 2 accumulation): a ragged last batch, 3 optimizer steps per epoch.
    result = worker.train(make_pairs(10), base, out, make_cfg(), seed=1)
    check_result(result, out, 10, 4)
    check_checkpoint(out, base)
    assert result["metrics"]["train/packed"] == 1.0  # the default: prefix-shared rows, our loss
    assert result["metrics"]["train/bf16"] == 0.0
    assert result["metrics"]["train/lr_last"] < result["metrics"]["train/lr_first"]


def test_lora_merged(base, worker, tmp_path):
    out = str(tmp_path / "out")
    result = worker.train(make_pairs(8), base, out, make_cfg(method="lora", batch_size=8, micro_batch_size=4), seed=1)
    check_result(result, out, 8, 8)
    check_checkpoint(out, base)
    # Merged LoRA keeps the base's parameter names (no lora_A / base_layer keys).
    assert weights(out).keys() == weights(base).keys()


def test_weighted_matches_plain_at_defaults(base, worker, tmp_path, monkeypatch):
    """The weighted loss with w=1, eps=0 is TRL's sigmoid loss: same metrics, same weights."""
    cfg = make_cfg(dropout=0.0, batch_size=4, micro_batch_size=4, pack=False)
    plain = worker.train(make_pairs(4), base, str(tmp_path / "plain"), cfg, seed=3)
    monkeypatch.setattr(trainer_mod, "_needs_weighted", lambda pairs: True)
    weighted = worker.train(make_pairs(4), base, str(tmp_path / "weighted"), cfg, seed=3)
    assert weighted["metrics"]["train/weighted"] == 1.0 and plain["metrics"]["train/weighted"] == 0.0
    for key in METRIC_KEYS[:-1]:
        assert weighted["metrics"][key] == pytest.approx(plain["metrics"][key], rel=1e-4, abs=1e-6), key
    assert max_abs_diff(weights(str(tmp_path / "plain")), weights(str(tmp_path / "weighted"))) < 1e-6


def test_packed_matches_padded(base, worker, tmp_path):
    """train.pack: the same training as TRL's padded rows (its stock trainer), up to float rounding:
    the same log-probs and loss at every step and the same weights after three steps. Pairs of unequal
    reply lengths, two pairs a pass, so both the padding and the block-diagonal mask are exercised."""
    pairs = make_pairs(12)
    for i, p in enumerate(pairs):
        p["chosen"] = p["chosen"] + " Indeed." * (i % 4)
    results = {}
    for pack in (False, True):
        cfg = make_cfg(dropout=0.0, batch_size=4, micro_batch_size=2, pack=pack)
        results[pack] = worker.train(pairs, base, str(tmp_path / f"pack{pack}"), cfg, seed=5)
    padded, packed = results[False]["metrics"], results[True]["metrics"]
    assert padded["train/packed"] == padded["train/weighted"] == 0.0 and packed["train/packed"] == 1.0
    for key in ("train/first_logps_chosen", "train/first_logps_rejected", "train/first_loss",
                "train/logps_chosen", "train/logps_rejected", "train/loss", "train/last_loss", "train/rewards_margins"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-3, abs=1e-4), key
    base_w, a, b = weights(base), weights(str(tmp_path / "packFalse")), weights(str(tmp_path / "packTrue"))
    moved = max_abs_diff(a, base_w)
    assert moved > 1e-3 and max_abs_diff(a, b) < 0.01 * moved


def test_weighted_zero_weight_and_half_epsilon_do_not_move(base, worker, tmp_path):
    """w=0 zeroes the loss; eps=0.5 has zero gradient where policy == reference (the first step).

    Zero-weight pairs alone leave every weight exactly where it was. For eps=0.5 the gradient is
    measured instead of the weights: the policy equals its reference only up to float rounding
    where the reference pass packs its rows differently from training (seen on an AVX2-only CPU,
    not on an AVX512 one), and Adam scales that ~1e-7 gradient into a step of the usual size."""
    cfg = make_cfg(dropout=0.0, batch_size=8, micro_batch_size=4)
    zero = worker.train(make_pairs(8, weight=0.0), base, str(tmp_path / "zero"), cfg, seed=0)
    assert zero["metrics"]["train/loss"] == 0.0 and zero["metrics"]["train/first_grad_norm"] == 0.0
    assert max_abs_diff(weights(str(tmp_path / "zero")), weights(base)) == 0.0

    pairs = make_pairs(4, weight=0.0) + make_pairs(4, epsilon=0.5)
    result = worker.train(pairs, base, str(tmp_path / "out"), cfg, seed=0)
    assert result["steps"] == 1
    metrics = result["metrics"]
    assert metrics["train/weighted"] == 1.0
    assert metrics["train/pair_weight_mean"] == 0.5 and metrics["train/pair_epsilon_mean"] == 0.25
    # loss = mean over the batch of 0 (w=0) and log 2 (eps=0.5 at logits 0).
    assert metrics["train/loss"] == pytest.approx(0.5 * math.log(2), rel=1e-4)
    plain = worker.train(make_pairs(8), base, str(tmp_path / "plain"), cfg, seed=0)["metrics"]
    assert metrics["train/first_grad_norm"] < 1e-5 * plain["train/first_grad_norm"]


def test_first_step_measures_dropout_noise(base, worker, tmp_path):
    """The first step's loss is ln 2 and its rewards 0 while the policy equals its reference, as long as
    both see the same network: with train.dropout=0 it is so; with 0.1 the policy's dropout alone moves
    them (the reference's log-probs are taken without it). train/first_* is what a round logs of it."""
    first = {}
    for dropout in (0.0, 0.1):
        cfg = make_cfg(dropout=dropout, batch_size=4, micro_batch_size=4)
        first[dropout] = worker.train(make_pairs(8), base, str(tmp_path / f"d{dropout}"), cfg, seed=0)["metrics"]
    assert first[0.0]["train/first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first[0.0]["train/first_rewards_chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first[0.0]["train/first_rewards_margins"] == pytest.approx(0.0, abs=1e-4)
    assert abs(first[0.1]["train/first_loss"] - math.log(2)) > 1e-3
    assert abs(first[0.1]["train/first_rewards_chosen"]) > 1e-3


def test_bf16_autocast_trains_the_fp32_weights_like_fp32(base, worker, tmp_path):
    """train.bf16=true: autocast in the passes, fp32 weights and optimizer: the checkpoint is fp32,
    the first step is the reference up to bf16 rounding, and the update goes where fp32's goes."""
    from safetensors import safe_open

    runs = {}
    for bf16 in (False, True):
        cfg = make_cfg(dropout=0.0, bf16=bf16)
        runs[bf16] = worker.train(make_pairs(8), base, str(tmp_path / f"bf16_{bf16}"), cfg, seed=0)["metrics"]
        assert runs[bf16]["train/bf16"] == float(bf16)
    with safe_open(str(tmp_path / "bf16_True" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert runs[True]["train/first_loss"] == pytest.approx(math.log(2), abs=0.02)
    assert abs(runs[True]["train/first_rewards_margins"]) < 0.05
    assert runs[True]["train/loss"] == pytest.approx(runs[False]["train/loss"], rel=0.05)
    w0, w32, w16 = weights(base), weights(str(tmp_path / "bf16_False")), weights(str(tmp_path / "bf16_True"))
    moved32 = torch.cat([(w32[k] - w0[k]).flatten() for k in w0])
    moved16 = torch.cat([(w16[k] - w0[k]).flatten() for k in w0])
    assert torch.nn.functional.cosine_similarity(moved32, moved16, dim=0) > 0.9
    assert not torch.equal(moved32, moved16)  # the passes did run in bf16: its rounding shows in the update


def test_bf16_auto_follows_the_hardware():
    from workers.cores import cpu_has_fast_bf16

    assert trainer_mod.use_bf16(False) is False and trainer_mod.use_bf16("true") is True
    expected = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_fast_bf16()
    assert trainer_mod.use_bf16("auto") is expected


def chosen_token_nll(base: str, pairs: list[dict]) -> float:
    """Mean over pairs of the chosen reply's mean token NLL under ``base``, computed here directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    out = []
    for p in pairs:
        prompt_ids, reply_ids = chat.encode_pair(tok, p["messages"], p["chosen"])
        ids = torch.tensor([prompt_ids + reply_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        token_logp = logp.gather(1, targets[:, None])[:, 0][-len(reply_ids):]
        out.append(-token_logp.mean().item())
    return sum(out) / len(out)


def test_upo_loss_adds_length_normalised_nll(base, worker, tmp_path):
    """train.loss=upo: eps=0.5 pairs give log 2 at the first step (policy == reference), plus
    nll_weight x the chosen reply's mean token NLL, which matches a direct computation."""
    pairs = make_pairs(4, epsilon=0.5)
    cfg = make_cfg(dropout=0.0, batch_size=4, micro_batch_size=4, loss="upo", upo={"nll_weight": 0.5})
    result = worker.train(pairs, base, str(tmp_path / "out"), cfg, seed=0)
    m = result["metrics"]
    assert result["steps"] == 1 and m["train/weighted"] == 1.0
    expected_nll = chosen_token_nll(base, pairs)
    assert expected_nll > 1.0  # a random model: far from 0, so the term is visible in the loss
    assert m["train/nll_chosen"] == pytest.approx(expected_nll, rel=1e-4)
    assert m["train/loss"] == pytest.approx(math.log(2) + 0.5 * expected_nll, rel=1e-4)

    # The plain DPO loss has no NLL term and does not log one.
    plain = worker.train(pairs, base, str(tmp_path / "plain"), make_cfg(dropout=0.0, batch_size=4, micro_batch_size=4), seed=0)
    assert "train/nll_chosen" not in plain["metrics"]
    assert plain["metrics"]["train/loss"] == pytest.approx(math.log(2), rel=1e-4)

    # loss=dpo with train.nll_weight (RPO): the same NLL term on plain pairs (epsilon 0).
    rpo_pairs = make_pairs(4)
    rpo = worker.train(rpo_pairs, base, str(tmp_path / "rpo"),
                       make_cfg(dropout=0.0, batch_size=4, micro_batch_size=4, nll_weight=0.25), seed=0)["metrics"]
    assert rpo["train/nll_weight"] == 0.25
    assert rpo["train/nll_chosen"] == pytest.approx(chosen_token_nll(base, rpo_pairs), rel=1e-4)
    assert rpo["train/loss"] == pytest.approx(math.log(2) + 0.25 * rpo["train/nll_chosen"], rel=1e-4)


def test_errors(base, worker, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="no pairs to train on"):
        worker.train([], base, out, make_cfg())
    with pytest.raises(ValueError, match="epsilon"):
        worker.train(make_pairs(2, epsilon=0.7), base, out, make_cfg())
    with pytest.raises(ValueError, match="weight"):
        worker.train(make_pairs(2, weight=-1.0), base, out, make_cfg())
    with pytest.raises(ValueError, match=r"pair 0 \(p0\): messages must end with a user turn"):
        answered = [*chat.user("Hi."), {"role": "assistant", "content": "Hello."}]
        worker.train(make_pairs(2, messages=answered), base, out, make_cfg())
    # Defaults live in the YAML only: an incomplete section names the missing key.
    incomplete = make_cfg()
    del incomplete["batch_size"]
    with pytest.raises(KeyError, match="train.batch_size missing"):
        worker.train(make_pairs(2), base, out, incomplete)
    incomplete = make_cfg(method="lora")
    del incomplete["lora"]["alpha"]
    with pytest.raises(KeyError, match="train.lora.alpha missing"):
        worker.train(make_pairs(2), base, out, incomplete)
    assert not os.path.exists(out)


def test_trainer_prompt_ids_are_the_samplers(base, tmp_path):
    """For the same messages, the ids the trainer trains on as the prompt are the ids VLLMWorker
    feeds the engine (both chat.encode); replies end with the template's <|im_end|>; a prompt that
    fills max_length is dropped as TRL drops it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from workers.vllm_worker import VLLMWorker

    tok = AutoTokenizer.from_pretrained(base)
    multi = [
        {"role": "system", "content": "Answer briefly."},
        *chat.user("What is 2 plus 2?"),
        {"role": "assistant", "content": "4."},
        *chat.user("Refine your answer."),
    ]
    long = chat.user("The quick brown fox jumps over the lazy dog. " * 20)
    pairs = [*make_pairs(1), *make_pairs(1, prompt_id="multi", messages=multi), *make_pairs(1, prompt_id="long", messages=long)]
    plain_cls, *_ = trainer_mod._make_trainer_classes()
    args = DPOConfig(output_dir=str(tmp_path), max_length=200, report_to="none", use_cpu=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    prepared = plain_cls(model=model, args=args, train_dataset=trainer_mod._dataset(pairs, False), processing_class=tok).train_dataset

    assert len(chat.encode(tok, long)) >= 200 and len(prepared) == 2  # the long prompt is dropped
    sampler = VLLMWorker.__new__(VLLMWorker)  # no engine: only its prompt tokenization
    sampler.tokenizer = tok
    for pair, row in zip(pairs, prepared):
        assert row["prompt_ids"] == sampler._token_ids(pair["messages"], True) == chat.encode(tok, pair["messages"])
        assert tok.decode(row["chosen_ids"]) == pair["chosen"] + "<|im_end|>\n"
        assert tok.decode(row["rejected_ids"]) == pair["rejected"] + "<|im_end|>\n"
    assert tok.decode(prepared[1]["prompt_ids"]).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")


def test_multi_turn_pairs_train(base, worker, tmp_path):
    multi = [{"role": "system", "content": "Answer briefly."}, *chat.user("Hello."), {"role": "assistant", "content": "Hi."}]
    pairs = [{**p, "messages": [*multi, *p["messages"]]} for p in make_pairs(4)]
    out = str(tmp_path / "out")
    result = worker.train(pairs, base, out, make_cfg(batch_size=4), seed=2)
    check_result(result, out, 4, 4)
    assert "train/dropped_pairs" not in result["metrics"]


# -- SFT mode (ALMA) ------------------------------------------------------------------------------
def make_demos(n: int = 6) -> list[dict]:
    return [
        {"prompt_id": f"d{i}", "messages": chat.user(f"What is {i} plus {i}?"), "response": f"The answer is {2 * i}."}
        for i in range(n)
    ]


def reply_nll(path: str, demos: list[dict]) -> float:
    """Mean token NLL of the replies (and their end of turn) under the checkpoint at ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    total, count = 0.0, 0
    for d in demos:
        prompt_ids, reply_ids = chat.encode_pair(tok, d["messages"], d["response"])
        ids = torch.tensor([prompt_ids + reply_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        token_logp = logp.gather(1, targets[:, None])[:, 0][len(prompt_ids) - 1:]
        total, count = total - token_logp.sum().item(), count + len(reply_ids)
    return total / count


def test_sft_trains_on_the_replies_and_saves_a_checkpoint(base, worker, tmp_path):
    from transformers import AutoTokenizer

    out = str(tmp_path / "sft")
    demos = make_demos(6)
    # 6 examples, batch 4 (2 x 2): a ragged last batch, 2 steps per epoch, 2 epochs
    result = worker.sft(demos, base, out, make_cfg(epochs=2), seed=3)
    assert result["checkpoint"] == out and result["num_pairs"] == 6 and result["steps"] == 4
    m = result["metrics"]
    assert m["train/examples"] == 6 and m["train/examples_per_s"] > 0 and "train/dropped_examples" not in m
    assert math.isfinite(m["train/loss"]) and 0 <= m["train/mean_token_accuracy"] <= 1
    assert m["train/dropout.attention_dropout"] == 0.1 and m["train/lr_last"] < m["train/lr_first"]
    # only the reply tokens are trained: "The answer is N." plus the template's end of turn
    tok = AutoTokenizer.from_pretrained(base)
    assert m["train/reply_tokens_mean"] == pytest.approx(
        sum(len(chat.encode_pair(tok, d["messages"], d["response"])[1]) for d in demos) / 6)
    check_checkpoint(out, base)
    assert reply_nll(out, demos) < reply_nll(base, demos) - 0.5  # the replies became much more likely


def test_sft_lora_and_its_errors(base, worker, tmp_path):
    out = str(tmp_path / "lora")
    result = worker.sft(make_demos(4), base, out, make_cfg(method="lora", batch_size=4, micro_batch_size=4), seed=0)
    assert result["steps"] == 1 and weights(out).keys() == weights(base).keys()
    bad = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="no demonstrations to train on"):
        worker.sft([], base, bad, make_cfg())
    with pytest.raises(ValueError, match=r"demonstration 1 \(d1\): a demonstration needs a non-empty \"response\""):
        worker.sft([make_demos(2)[0], {**make_demos(2)[1], "response": " "}], base, bad, make_cfg())
    incomplete = make_cfg()
    del incomplete["epochs"]
    with pytest.raises(KeyError, match="train.epochs missing"):
        worker.sft(make_demos(2), base, bad, incomplete)
    assert not os.path.exists(bad)
