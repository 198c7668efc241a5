"""Reward models as a Ray actor: train a sequence classifier on labelled pairs, score pairs, MC dropout.

The first building block of the UPO and CRM pair filters (algorithms.md 5, 6). The class is plain
Python; a plug-in runs it with ``Workers.run(role, RewardModelWorker, method, ...)`` (importing this
module has no heavy side effects: torch / transformers / TRL are imported inside the methods).

The model is ``AutoModelForSequenceClassification`` built from a local causal-LM checkpoint (the
policy's backbone, its LM head dropped, a new linear head on the last non-pad token, initialised
from the seed; nothing is downloaded), fp32. ``cfg`` is the whole ``reward_model``
section (conf/reward_model/default.yaml), read strictly: a missing key is a KeyError naming it.

Two modes (``cfg["mode"]``):

* ``pairwise_classifier``: UPO's estimator f_psi (algorithms.md 5.1). Input: the pair template
  T(x, y_a, y_b) (``PAIR_TEMPLATE``, UPO's "good preference labeler" instruction with ``Q:``,
  ``Response #1:``, ``Response #2:``), rendered as one user message by ``orchestrator.chat.encode``
  (so the chat template is applied in the one place, the generation prompt opened: the classifier
  reads the position where the model would start its verdict). Two labels; each labelled pair is
  used in both orders (chosen first -> label 0, chosen second -> label 1), cross-entropy. Trained
  with ``transformers.Trainer`` (the model's own CE loss on ``labels``): TRL has no pairwise
  classification trainer, and ``RewardTrainer`` is a one-label BT loss.
  Scoring averages P(chosen better) over both orders, so a position bias cancels:
  ``p_chosen = (P(0 | T(x, c, r)) + P(1 | T(x, r, c))) / 2``; swapping chosen and rejected gives
  exactly ``1 - p_chosen``.
* ``bradley_terry``: a scalar reward model (CRM's RMs; UPO's r_phi). One label; r(x, y) is the
  score of the conversation with y as the assistant turn (``chat.encode_pair``, the trainer's and
  the sampler's ids, ending with the template's end of turn); loss
  ``-log sigmoid(r(x, y_w) - r(x, y_l))``. Trained with TRL 1.16's ``RewardTrainer``: it takes
  pre-tokenized ``chosen_ids`` / ``rejected_ids`` as they are (no re-templating), pads with the
  tokenizer's pad id and computes exactly that loss (no margin column, no reward centring), so no
  subclass is needed; its ``max_length`` filter is off (``None``) because truncation happens here.

Shared rules:

* Truncation: a sequence longer than ``max_length`` keeps its *last* ``max_length`` tokens, in
  training and scoring alike (the head reads the last token; in BT mode that keeps the reply and
  cuts the start of the prompt; in the pair template it keeps Response #2, and each response is
  the second one in one of the two orders). Counted as ``rm/truncated``.
* Held-out split: ``eval_fraction`` of the pairs, whole prompts at a time (a prompt's pairs are
  all in or all out), drawn with the seed; accuracy there is measured with the same code as
  ``score`` (pairwise: p_chosen > 0.5; BT: margin > 0).
* Dropout: ``cfg["dropout"]`` is set on the model config for training (every known dropout
  attribute, as workers/trainer.py does; Llama has ``attention_dropout``) and the base's values are
  restored before saving. ``mc_passes`` sets its own ``dropout`` at load (UPO: 0.1 at inference).
* Too few pairs to train (fewer than ``min_examples`` left after the held-out split): a ValueError
  with the numbers, before any model is loaded.
* The saved checkpoint is complete: model (config with ``num_labels``, ``id2label`` naming the mode
  and ``pad_token_id``), the base's tokenizer files with the chat template, and
  ``reward_model.json`` (mode, max_length, template, base, seed, metrics). ``score`` and
  ``mc_passes`` refuse a checkpoint that is not a sequence classifier of the right mode (a causal-LM
  checkpoint would otherwise load with a fresh random head).
* What trains: the whole model, or (``train_layers: k``) only the top k decoder layers, the final
  norm and the head, in a plain torch loop over the frozen layers' output computed once
  (workers/trunk.py); ``mc_passes`` then runs the frozen layers once and its dropout acts in the
  top k. LoRA: not implemented.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import tempfile
import time
from typing import Any

from orchestrator import chat
from orchestrator.section import Section
from orchestrator.types import Pair, TrainResult
from workers.cores import CoreWorker, length_batches, padded_batches, run_args, use_cores
from orchestrator.models import seal_checkpoint, verify_checkpoint
from workers.trainer import _set_dropout, save_checkpoint  # the DPO trainer's dropout attributes and checkpoint writer
from workers.trunk import Trunk, check_train_layers

log = logging.getLogger(__name__)

MODES = ("pairwise_classifier", "bradley_terry")
ID2LABEL = {
    "pairwise_classifier": {0: "first_better", 1: "second_better"},
    "bradley_terry": {0: "reward"},
}
METADATA_FILE = "reward_model.json"

# UPO's estimator prompt (code: src/alignment/inference/estimating/main.py get_estimation_prompt),
# with its "Reponse #2" typo fixed. The query is the conversation as a judge sees it (chat.transcript).
PAIR_TEMPLATE = (
    "You are a good preference labeler. Give you one query from human and two candidate responses answered "
    "by the same assistant, your job is to find the better response which is more helpful, harmless for the "
    "human query.\n\nQ: {query}\n\n\nResponse #1: {first} \n\n\nResponse #2: {second}"
)


def pair_messages(messages: chat.Messages, first: str, second: str) -> chat.Messages:
    """T(x, first, second) as one user message (the chat template is applied by ``chat.encode``)."""
    return chat.user(PAIR_TEMPLATE.format(query=chat.transcript(messages), first=first, second=second))


# -- inputs -----------------------------------------------------------------------------------


def _mode(cfg: Section) -> str:
    mode = cfg["mode"]
    if mode not in MODES:
        raise ValueError(f"reward_model.mode={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _pairs(examples: list[Any]) -> list[Pair]:
    """The examples as ``Pair`` records, checked where they arrive."""
    out = []
    for i, e in enumerate(examples):
        if isinstance(e, Pair):
            out.append(e)
            continue
        try:
            out.append(Pair.from_dict(e))
        except (TypeError, ValueError) as exc:
            name = e.get("prompt_id") if isinstance(e, dict) else type(e).__name__
            raise ValueError(f"example {i} ({name}): {exc}") from None
    return out


def split_by_prompt(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): about ``fraction`` of the pairs held out, whole prompts at a time, by seed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"reward_model.eval_fraction={fraction!r} must lie in [0, 1)")
    if fraction == 0.0 or not pairs:
        return list(pairs), []
    groups: dict[str, int] = {}
    for p in pairs:
        groups[p.prompt_id] = groups.get(p.prompt_id, 0) + 1
    ids = list(groups)
    random.Random(seed).shuffle(ids)
    target = max(1, round(fraction * len(pairs)))
    held: set[str] = set()
    count = 0
    for pid in ids:
        if count >= target:
            break
        held.add(pid)
        count += groups[pid]
    return [p for p in pairs if p.prompt_id not in held], [p for p in pairs if p.prompt_id in held]


def _fit(ids: list[int], max_length: int | None) -> tuple[list[int], bool]:
    """The last ``max_length`` ids (the head reads the last token), and whether any were cut."""
    if max_length and len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


class _Encoder:
    """Token ids for both modes, with truncation counted."""

    def __init__(self, tokenizer: Any, max_length: int | None):
        self.tokenizer = tokenizer
        self.max_length = int(max_length) if max_length else None
        self.truncated = 0

    def _count(self, fitted: tuple[list[int], bool]) -> list[int]:
        self.truncated += fitted[1]
        return fitted[0]

    def pair(self, p: Pair, chosen_first: bool) -> list[int]:
        first, second = (p.chosen, p.rejected) if chosen_first else (p.rejected, p.chosen)
        return self._count(_fit(chat.encode(self.tokenizer, pair_messages(p.messages, first, second)), self.max_length))

    def reply(self, p: Pair, reply: str) -> list[int]:
        prompt_ids, reply_ids = chat.encode_pair(self.tokenizer, p.messages, reply)
        return self._count(_fit(prompt_ids + reply_ids, self.max_length))


# -- model ------------------------------------------------------------------------------------

def _check_checkpoint(config: Any, checkpoint: str, mode: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{checkpoint} is not a reward model (architectures {archs}); a causal-LM checkpoint would load with a "
            f"new random head. Train one with RewardModelWorker.train first"
        )
    labels = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if labels != ID2LABEL[mode]:
        have = next((m for m, v in ID2LABEL.items() if v == labels), f"{len(labels)} labels {labels}")
        raise ValueError(f"{checkpoint} is a {have} model; reward_model.mode is {mode}")
    if getattr(config, "pad_token_id", None) is None:
        raise ValueError(f"{checkpoint}: config has no pad_token_id; the head could not find each sequence's last token")


def _load(checkpoint: str, mode: str, dropout: float | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a saved reward model, fp32, in eval mode; ``dropout`` set on the config if given."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    verify_checkpoint(checkpoint, what="reward model")
    config = AutoConfig.from_pretrained(checkpoint)
    _check_checkpoint(config, checkpoint, mode)
    if dropout is not None:
        found = _set_dropout(config, dropout)
        if dropout > 0 and not found:
            raise ValueError(
                f"{checkpoint}: the {type(config).__name__} config has no dropout attribute to set; MC dropout would "
                f"give T identical passes"
            )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, config=config, dtype=torch.float32)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, tokenizer


def _logits(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int) -> Any:
    """Head outputs for each sequence (rows in input order, on the CPU), batched by length, right-padded."""
    import torch

    out = torch.empty(len(seqs), int(model.config.num_labels), dtype=torch.float32)
    for idx, ids, mask in padded_batches(seqs, pad_id, batch_size):
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        out[idx] = logits.float().cpu()
    return out


def _trunk_logits(model: Any, trunk: Trunk, batch_size: int) -> Any:
    """Head outputs for every sequence of ``trunk`` (rows in its order, on the CPU), batched by length."""
    import torch

    out = torch.empty(len(trunk.ids), int(model.config.num_labels), dtype=torch.float32)
    for idx in length_batches(trunk.ids, batch_size):
        out[idx] = model.score(trunk.last_token(idx, trunk.hidden(idx))).float().cpu()
    return out


def _pair_seqs(enc: _Encoder, pairs: list[Pair], both_orders: bool = True) -> list[list[int]]:
    """T(x, c, r) for every pair, then (``both_orders``) T(x, r, c) for every pair."""
    seqs = [enc.pair(p, True) for p in pairs]
    if both_orders:
        seqs += [enc.pair(p, False) for p in pairs]
    return seqs


def _reply_seqs(enc: _Encoder, pairs: list[Pair]) -> list[list[int]]:
    """(x, chosen) for every pair, then (x, rejected) for every pair (bradley_terry)."""
    return [enc.reply(p, p.chosen) for p in pairs] + [enc.reply(p, p.rejected) for p in pairs]


def _chosen_probs(logits: Any, n: int) -> tuple[list[float], list[float]]:
    """(P(0 | T(x, c, r)), P(1 | T(x, r, c))) per pair from the head's outputs over ``_pair_seqs``;
    the second is empty for one order."""
    # float64 softmax: near-certain passes stay distinct (float32 resolves p only to ~6e-8 near 1).
    probs = logits.double().softmax(-1)
    return probs[:n, 0].tolist(), probs[n:, 1].tolist()


def _rewards(model: Any, enc: _Encoder, pairs: list[Pair], batch_size: int) -> tuple[list[float], list[float]]:
    r = _logits(model, _reply_seqs(enc, pairs), model.config.pad_token_id, batch_size)[:, 0].tolist()
    return r[: len(pairs)], r[len(pairs) :]


def _init_head(model: Any, how: str) -> None:
    """``zero``: the new head starts at chance (p = 0.5, margin 0; loss exactly ln 2), so the first
    steps learn the labels rather than undo a random head's preferences. ``normal``: transformers'
    default (std = initializer_range)."""
    if how == "normal":
        return
    if how != "zero":
        raise ValueError(f"reward_model.head_init={how!r}: expected 'zero' or 'normal'")
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__}: no linear 'score' or 'classifier' head to initialise")
    import torch

    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def _score(model: Any, enc: _Encoder, pairs: list[Pair], mode: str, batch_size: int) -> list[dict[str, float]]:
    import torch

    if not pairs:
        return []
    with torch.no_grad():
        if mode == "pairwise_classifier":
            logits = _logits(model, _pair_seqs(enc, pairs), model.config.pad_token_id, batch_size)
            first, second = _chosen_probs(logits, len(pairs))
            return [{"p_chosen": (a + b) / 2, "p_chosen_first": a, "p_chosen_second": b} for a, b in zip(first, second)]
        chosen, rejected = _rewards(model, enc, pairs, batch_size)
        return [{"chosen": c, "rejected": r, "margin": c - r} for c, r in zip(chosen, rejected)]


def _summarize(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """First, last and mean per-step training loss (and RewardTrainer's accuracy / margin, last step)."""
    steps = [e for e in log_history if "loss" in e and "train_loss" not in e]
    out: dict[str, float] = {}
    losses = [float(e["loss"]) for e in steps]
    if losses:
        out.update({"rm/loss_first": losses[0], "rm/loss_last": losses[-1], "rm/loss": sum(losses) / len(losses)})
    for src in ("accuracy", "margin"):
        values = [float(e[src]) for e in steps if e.get(src) is not None]
        if values:
            out[f"rm/train_{src}_last"] = values[-1]
    return out


def _train_with_trainer(
    model: Any, tokenizer: Any, enc: _Encoder, train_pairs: list[Pair], mode: str, cfg: Section, seed: int, use_cuda: bool
) -> tuple[Any, int, int, dict[str, float], float]:
    """Full fine-tune with transformers' Trainer (pairwise) or TRL's RewardTrainer (bradley_terry).

    Returns (model, training examples, optimizer steps, metrics, seconds training)."""
    from datasets import Dataset

    batch_size = int(cfg["batch_size"])
    micro = int(cfg["micro_batch_size"] or batch_size)
    with tempfile.TemporaryDirectory(prefix="rm-scratch-") as scratch:
        common = dict(
            output_dir=scratch,
            learning_rate=float(cfg["learning_rate"]),
            lr_scheduler_type=cfg["lr_scheduler"],
            warmup_steps=float(cfg["warmup_ratio"]),  # a float in [0, 1) is a ratio of the total steps
            weight_decay=float(cfg["weight_decay"]),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch_size // micro,
            num_train_epochs=int(cfg["epochs"]),
            disable_tqdm=True,
            **run_args(seed, use_cuda),
        )
        if mode == "pairwise_classifier":
            from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

            rows = []
            for p in train_pairs:
                rows.append({"input_ids": enc.pair(p, True), "labels": 0})
                rows.append({"input_ids": enc.pair(p, False), "labels": 1})
            trainer = Trainer(
                model=model,
                args=TrainingArguments(**common),
                train_dataset=Dataset.from_list(rows),
                data_collator=DataCollatorWithPadding(tokenizer),
                processing_class=tokenizer,
            )
            # The classifier's forward takes **kwargs, so Trainer assumes its loss is already
            # normalised over the accumulated batch and skips the division by the accumulation
            # steps; its cross-entropy is a per-micro-batch mean, so the loss (and the gradient)
            # came out gradient_accumulation_steps times too large (2 ln 2 at chance).
            trainer.model_accepts_loss_kwargs = False
        else:
            from trl import RewardConfig, RewardTrainer

            rows = [{"chosen_ids": enc.reply(p, p.chosen), "rejected_ids": enc.reply(p, p.rejected)} for p in train_pairs]
            trainer = RewardTrainer(
                model=model,
                args=RewardConfig(**common, max_length=None, disable_dropout=float(cfg["dropout"]) == 0.0),
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
            )
        t_train = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t_train
        steps = int(trainer.state.global_step)
        metrics = _summarize(trainer.state.log_history)
        model = trainer.accelerator.unwrap_model(trainer.model)
        del trainer
        gc.collect()
    return model, len(rows), steps, metrics, train_s


def _train_top_layers(
    model: Any, enc: _Encoder, train_pairs: list[Pair], mode: str, top: int, cfg: Section, seed: int
) -> tuple[Any, int, int, dict[str, float], float]:
    """Train the top ``top`` decoder layers, the final norm and the head over the frozen layers' cached output.

    A plain torch loop with the Trainer path's settings (AdamW, ``lr_scheduler`` with warm-up
    ``warmup_ratio``, ``batch_size`` per step in micro-batches, gradient norm clipped at 1.0,
    examples shuffled each epoch from ``seed``) and the same losses: pairwise, cross-entropy over
    T(x, c, r) -> 0 and T(x, r, c) -> 1; bradley_terry, -log sigmoid(r(x, y_w) - r(x, y_l)).
    Returns (model, training examples, optimizer steps, metrics, seconds training)."""
    import torch
    import torch.nn.functional as F
    from transformers import get_scheduler

    if mode == "pairwise_classifier":
        seqs = [enc.pair(p, first) for p in train_pairs for first in (True, False)]
        units = [[j] for j in range(len(seqs))]  # one example: one sequence, label j % 2
    else:
        seqs = [enc.reply(p, reply) for p in train_pairs for reply in (p.chosen, p.rejected)]
        units = [[2 * i, 2 * i + 1] for i in range(len(train_pairs))]  # one example: a pair's two sequences
    trunk = Trunk(model, seqs, model.config.pad_token_id, top, [model.score], int(cfg["eval_batch_size"]))
    batch_size = int(cfg["batch_size"])
    micro = int(cfg["micro_batch_size"] or batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=float(cfg["learning_rate"]), weight_decay=float(cfg["weight_decay"]))
    total = int(cfg["epochs"]) * math.ceil(len(units) / batch_size)
    scheduler = get_scheduler(
        cfg["lr_scheduler"], optimizer, num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * total), num_training_steps=total
    )
    rng = random.Random(seed)
    torch.manual_seed(seed)  # dropout
    losses: list[float] = []
    t_train = time.perf_counter()
    model.train()
    for _ in range(int(cfg["epochs"])):
        order = list(range(len(units)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m0 in range(0, len(batch), micro):
                rows = [j for u in batch[m0 : m0 + micro] for j in units[u]]
                logits = model.score(trunk.last_token(rows, trunk.hidden(rows))).float()
                if mode == "pairwise_classifier":
                    labels = torch.tensor([j % 2 for j in rows], device=logits.device)
                    loss = F.cross_entropy(logits, labels, reduction="sum")
                else:
                    r = logits[:, 0].view(-1, 2)
                    loss = -F.logsigmoid(r[:, 0] - r[:, 1]).sum()
                (loss / len(batch)).backward()  # the step's mean over all its examples
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss_sum / len(batch))
    train_s = time.perf_counter() - t_train
    trunk.release()  # the whole model from here on (held-out scoring, saving)
    for p in model.parameters():
        p.requires_grad_(True)
    metrics = {"rm/loss_first": losses[0], "rm/loss_last": losses[-1], "rm/loss": sum(losses) / len(losses), "rm/train_layers": float(top)}
    return model, len(units), len(losses), metrics, train_s


class RewardModelWorker(CoreWorker):
    # -- training -------------------------------------------------------------------------
    def train(self, examples: list[dict[str, Any]], base_checkpoint: str, output_dir: str, cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        """Train a reward model of ``cfg["mode"]`` on labelled pairs from ``base_checkpoint``; save it to ``output_dir``.

        Returns ``TrainResult(...).to_dict()``: ``num_pairs`` trained on, optimizer ``steps``,
        ``wall_s`` and ``metrics`` (``rm/loss_first``, ``rm/loss_last``, ``rm/eval_accuracy`` when
        ``eval_fraction`` > 0, ``rm/train_pairs``, ``rm/train_examples``, ``rm/train_s``, ...).
        """
        t_start = time.perf_counter()
        cfg = Section("reward_model", cfg)
        mode = _mode(cfg)
        pairs = _pairs(examples)
        fraction = float(cfg["eval_fraction"])
        train_pairs, eval_pairs = split_by_prompt(pairs, fraction, seed)
        min_examples = max(1, int(cfg["min_examples"]))
        if len(train_pairs) < min_examples:
            raise ValueError(
                f"too few pairs to train the {mode} reward model: {len(train_pairs)} left for training "
                f"({len(pairs)} given, {len(eval_pairs)} held out by eval_fraction={fraction}); "
                f"reward_model.min_examples={cfg['min_examples']}"
            )
        batch_size = int(cfg["batch_size"])
        micro = int(cfg["micro_batch_size"] or batch_size)
        if batch_size < 1 or micro < 1 or batch_size % micro:
            raise ValueError(f"reward_model.batch_size={batch_size} must be a positive multiple of micro_batch_size={micro}")
        warmup = float(cfg["warmup_ratio"])
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"reward_model.warmup_ratio={warmup} must lie in [0, 1)")
        dropout = float(cfg["dropout"])
        top = check_train_layers(cfg["train_layers"], "reward_model.train_layers")
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])

        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        transformers.set_seed(seed)  # before the model is built: the new head is initialised from it
        verify_checkpoint(base_checkpoint, what="base checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer at {base_checkpoint} has no chat template; the reward model reads chat-formatted pairs")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        id2label = ID2LABEL[mode]
        config = AutoConfig.from_pretrained(
            base_checkpoint, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )
        config.pad_token_id = tokenizer.pad_token_id
        original_dropout = _set_dropout(config, dropout)
        model = AutoModelForSequenceClassification.from_pretrained(base_checkpoint, config=config, dtype=torch.float32)
        _init_head(model, cfg["head_init"])

        enc = _Encoder(tokenizer, cfg["max_length"])
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            model.to("cuda")
        if top is not None and top < len(model.base_model.layers):
            model, n_examples, steps, metrics, train_s = _train_top_layers(model, enc, train_pairs, mode, top, cfg, seed)
        else:
            model, n_examples, steps, metrics, train_s = _train_with_trainer(model, tokenizer, enc, train_pairs, mode, cfg, seed, use_cuda)
        truncated_train = enc.truncated

        model.eval()
        if eval_pairs:
            scores = _score(model, enc, eval_pairs, mode, int(cfg["eval_batch_size"]))
            if mode == "pairwise_classifier":
                metrics["rm/eval_accuracy"] = sum(s["p_chosen"] > 0.5 for s in scores) / len(scores)
                metrics["rm/eval_p_chosen_mean"] = sum(s["p_chosen"] for s in scores) / len(scores)
                # Both orders agree on the winner: a position bias shows up as disagreement.
                metrics["rm/eval_order_agreement"] = sum(
                    (s["p_chosen_first"] > 0.5) == (s["p_chosen_second"] > 0.5) for s in scores
                ) / len(scores)
            else:
                metrics["rm/eval_accuracy"] = sum(s["margin"] > 0 for s in scores) / len(scores)
                metrics["rm/eval_margin_mean"] = sum(s["margin"] for s in scores) / len(scores)

        # Save: the base's dropout values back on the config; the label names say the mode.
        t_save = time.perf_counter()
        for name, value in original_dropout.items():
            setattr(model.config, name, value)
        save_checkpoint(model, base_checkpoint, output_dir)
        save_s = time.perf_counter() - t_save
        del model
        gc.collect()

        metrics.update(
            {
                "rm/train_pairs": float(len(train_pairs)),
                "rm/train_examples": float(n_examples),
                "rm/eval_pairs": float(len(eval_pairs)),
                "rm/steps": float(steps),
                "rm/train_s": train_s,
                "rm/save_s": save_s,
                "rm/truncated": float(truncated_train),
                "rm/dropout": dropout,
                "rm/threads": float(self.threads),
            }
        )
        wall_s = time.perf_counter() - t_start
        metadata = {
            "mode": mode,
            "max_length": enc.max_length,
            "pair_template": PAIR_TEMPLATE if mode == "pairwise_classifier" else None,
            "base_checkpoint": base_checkpoint,
            "seed": seed,
            "metrics": metrics,
        }
        with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        seal_checkpoint(output_dir, reseal=True)  # again: the seal must list this file too (the weights' hashes are cached)
        log.info(
            "reward model (%s) on %d pairs (%d held out): %d steps in %.1fs, loss %.4f -> %.4f, eval accuracy %s; %s",
            mode, len(train_pairs), len(eval_pairs), steps, train_s, metrics.get("rm/loss_first", math.nan),
            metrics.get("rm/loss_last", math.nan), metrics.get("rm/eval_accuracy", "n/a"), output_dir,
        )  # fmt: skip
        result = TrainResult(checkpoint=output_dir, num_pairs=len(train_pairs), steps=steps, wall_s=wall_s, metrics=metrics)
        return result.to_dict()

    # -- scoring --------------------------------------------------------------------------
    def score(self, examples: list[dict[str, Any]], checkpoint: str, cfg: dict[str, Any]) -> list[dict[str, float]]:
        """Deterministic scores (eval mode, no dropout), one dict per pair.

        ``pairwise_classifier``: ``p_chosen_first`` = P(label 0 | T(x, chosen, rejected)),
        ``p_chosen_second`` = P(label 1 | T(x, rejected, chosen)), ``p_chosen`` their mean.
        ``bradley_terry``: ``chosen`` = r(x, chosen), ``rejected`` = r(x, rejected), ``margin``.
        """
        cfg = Section("reward_model", cfg)
        mode = _mode(cfg)
        pairs = _pairs(examples)
        if not pairs:
            return []
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])
        model, tokenizer = _load(checkpoint, mode)
        enc = _Encoder(tokenizer, cfg["max_length"])
        scores = _score(model, enc, pairs, mode, int(cfg["eval_batch_size"]))
        if enc.truncated:
            log.warning(
                "reward model scoring: %d of %d sequences cut to their last %s tokens", enc.truncated, 2 * len(pairs), enc.max_length
            )
        return scores

    def mc_passes(
        self,
        examples: list[dict[str, Any]],
        checkpoint: str,
        T: int,
        dropout: float,
        seed: int,
        cfg: dict[str, Any],
    ) -> list[list[float]]:
        """MC dropout: per pair, T probabilities that the chosen response is better.

        The model is loaded with ``dropout`` set on its config and run in train mode (dropout on)
        without gradients, T times over the same batches, from ``torch.manual_seed(seed)``.
        ``pairwise_classifier``: ``cfg["mc"]["orders"]`` ``both`` averages P(chosen better) over both
        orders within each pass (as ``score``); ``chosen_first`` is UPO's code (P(label 0 | T(x,
        chosen, rejected))). ``bradley_terry``: sigmoid(r(x, chosen) - r(x, rejected)) per pass.
        Feed each row to ``orchestrator.uncertainty.bald``.
        """
        import torch

        cfg = Section("reward_model", cfg)
        mode = _mode(cfg)
        orders = cfg.sub("mc")["orders"]
        if orders not in ("both", "chosen_first"):
            raise ValueError(f"reward_model.mc.orders={orders!r} is not one of both, chosen_first")
        T, dropout = int(T), float(dropout)
        if T < 1:
            raise ValueError(f"mc_passes needs T >= 1 passes, got {T}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mc_passes dropout={dropout} must lie in [0, 1)")
        top = check_train_layers(cfg["train_layers"], "reward_model.train_layers")
        pairs = _pairs(examples)
        if not pairs:
            return []
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])
        model, tokenizer = _load(checkpoint, mode, dropout=dropout)
        enc = _Encoder(tokenizer, cfg["max_length"])
        batch_size = int(cfg["eval_batch_size"])
        both = orders == "both"
        n = len(pairs)
        seqs = _pair_seqs(enc, pairs, both_orders=both) if mode == "pairwise_classifier" else _reply_seqs(enc, pairs)
        if enc.truncated:
            log.warning("MC dropout: %d of %d sequences cut to their last %s tokens", enc.truncated, len(seqs), enc.max_length)
        # train_layers: the frozen layers run once (eval mode) and dropout acts in the top layers alone,
        # the ones that were trained; the passes differ there (UPO's LoRA dropout also sat in the adapters only).
        trunk = Trunk(model, seqs, model.config.pad_token_id, top, [], batch_size) if top is not None else None
        model.train()  # dropout on; nothing else in these models changes between train and eval
        torch.manual_seed(int(seed))
        passes: list[list[float]] = []
        with torch.no_grad():
            for _ in range(T):
                if trunk is not None:
                    logits = _trunk_logits(model, trunk, batch_size)
                else:
                    logits = _logits(model, seqs, model.config.pad_token_id, batch_size)
                if mode == "bradley_terry":
                    # float64: near-certain passes stay distinct (float32 resolves p only to ~6e-8 near 1).
                    r = logits[:, 0].double()
                    passes.append(torch.sigmoid(r[:n] - r[n:]).tolist())
                    continue
                first, second = _chosen_probs(logits, n)
                passes.append([(a + b) / 2 for a, b in zip(first, second)] if both else first)
        return [list(col) for col in zip(*passes)]
