"""Training as a Ray actor: DPO on preference pairs (``train``) or supervised fine-tuning on
demonstrations (``sft``, ALMA's best-of-N SFT and its judge) -> a new full checkpoint.

The class is plain Python; the controller wraps it with ``ray.remote`` (importing this module has no
Ray side effects, and torch / transformers / TRL are imported lazily inside the methods).

What ``TrainerWorker.train`` does (Self-Rewarding spec, algorithms.md 1.3/1.4):

* policy and reference both start from ``base_checkpoint`` (M_t, the round's starting model). The
  reference log-probabilities are precomputed once, before training, with the model in eval mode
  (no dropout), so the reference is exactly M_t; with LoRA TRL computes them with the adapter
  disabled, which is again exactly M_t. No second copy of the model is held during training.
* TRL ``DPOTrainer`` with ``loss_type="sigmoid"`` on summed response log-probs (TRL sums over the
  completion tokens; ``ld_alpha`` stays None), beta from the config, cosine decay from
  ``learning_rate`` to ``learning_rate * min_lr_ratio``, ``batch_size`` pairs per optimizer step as
  ``micro_batch_size`` x gradient accumulation, dropout set from ``cfg.dropout`` on the model config.
* each pair is tokenized with ``orchestrator.chat.encode_pair`` (the trainer subclasses replace TRL's
  ``_prepare_dataset``), so the prompt ids are exactly the ids vLLM sampled from and each reply ends
  with the template's end of turn. TRL's ``max_length`` truncation and its dropping of prompts that
  fill ``max_length`` are kept.
* ``cfg`` is the whole ``train`` section (conf/train/dpo.yaml); a missing key is a KeyError naming it.
* ``train.pack`` (default on): each micro-batch is one prefix-shared, padding-free row, the prompt
  run once for both replies and only reply positions through the LM head (workers/packing.py); the
  same log-probs as TRL's padded rows, with 44 % fewer token rows on the default run's pairs.
* per-pair ``weight`` / ``epsilon`` (UPO filter), the NLL term, or packing: a small ``DPOTrainer``
  subclass computes ``w_j * [-(1-eps_j) log s(beta h_j) - eps_j log s(-beta h_j)]`` (cDPO label
  smoothing, then the weight), averaged over the batch; with weights 1 and epsilons 0 that is TRL's
  sigmoid loss. With ``pack: false`` and none of them the stock TRL trainer runs untouched.
* the result (LoRA merged with ``merge_and_unload``) is saved as a complete HF checkpoint in
  ``output_dir``: safetensors in ``save_dtype``, config, generation_config and the tokenizer with its
  chat template, and its seal (``checkpoint.sha256``: every file's sha256, fsynced with the files).
  Nothing else is written there; TRL's own scratch output goes to a temp dir.
* with ``state_dir`` and ``train.save_steps``, the Trainer's state (weights, optimizer, scheduler, RNG)
  is saved there every ``save_steps`` optimizer steps, each save fsynced and marked complete; a retry
  with the same inputs resumes from the latest (``global_step`` goes on from there).

What ``TrainerWorker.sft`` does: TRL ``SFTTrainer`` (token-mean NLL) on ``Demonstration`` records,
each tokenized with ``orchestrator.chat.encode_pair`` (prompt ids as the sampler's, the reply ending
with the template's end of turn) and trained on the reply tokens only (the prompt's labels are
-100). The same ``train`` section keys as DPO (learning rate and schedule, batch sizes, epochs,
dropout, LoRA, max_length, save dtype; beta and loss are not read); the same model loading,
dropout handling and checkpoint saving as ``train``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.chat import encode_pair
from orchestrator.models import seal_checkpoint, verify_checkpoint
from orchestrator.section import Section
from orchestrator.types import Demonstration, Pair, TrainResult
from workers.cores import CoreWorker, auto_switch, cpu_has_fast_bf16, hang_point, inputs_key, resume_point, run_args, state_args, state_callback, use_cores

log = logging.getLogger(__name__)

# Config attributes that hold dropout probabilities in common causal-LM architectures. Those present on
# the loaded config (as numbers) are set to ``cfg.dropout``; Llama / Qwen2 / Mistral have only
# ``attention_dropout``.
DROPOUT_ATTRS = (
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "resid_dropout",
    "embed_dropout",
    "activation_dropout",
    "ffn_dropout",
    "dropout",
)

# TRL's logged names -> ours (averaged over logged steps; the final step's value as train/last_*).
METRIC_NAMES = {
    "loss": "train/loss",
    "rewards/chosen": "train/rewards_chosen",
    "rewards/rejected": "train/rewards_rejected",
    "rewards/margins": "train/rewards_margins",
    "rewards/accuracies": "train/rewards_accuracies",
    "logps/chosen": "train/logps_chosen",
    "logps/rejected": "train/logps_rejected",
    "grad_norm": "train/grad_norm",
    "pair_epsilon": "train/pair_epsilon",
    "nll_chosen": "train/nll_chosen",
    # SFT (TRL's SFTTrainer logs these)
    "mean_token_accuracy": "train/mean_token_accuracy",
    "entropy": "train/entropy",
}

METHODS = ("full", "lora")
# Our loss names -> TRL's loss type. ``upo`` is sigmoid DPO with UPO's per-pair epsilon and a
# length-normalised NLL term on the chosen reply (algorithms.md 5.3), in the weighted trainer.
LOSSES = {"dpo": "sigmoid", "upo": "sigmoid"}
SAVE_DTYPES = ("float32", "bfloat16", "float16", "auto")

# Batch keys the weighted collator adds; never passed to the model.
_WEIGHT_KEYS = ("pair_weight", "pair_epsilon")


def _needs_weighted(pairs: list[dict[str, Any]]) -> bool:
    """True when any pair carries a non-default weight or epsilon (the weighted DPO loss is needed)."""
    return any(float(p.get("weight", 1.0)) != 1.0 or float(p.get("epsilon", 0.0)) != 0.0 for p in pairs)


def _batch_sizes(cfg: Section) -> tuple[int, int]:
    """(pairs per optimizer step, pairs per forward pass); ``micro_batch_size: null`` = the whole batch."""
    batch = int(cfg["batch_size"])
    return batch, int(cfg["micro_batch_size"] or batch)


def _validate(pairs: list[dict[str, Any]]) -> None:
    """The pairs, checked here where they arrive; the config was checked by orchestrator.config.validate."""
    if not pairs:
        raise ValueError("no pairs to train on")
    for i, p in enumerate(pairs):
        try:
            Pair.from_dict(p)  # rejects unknown / missing fields and malformed messages loudly
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pair {i} ({p.get('prompt_id')}): {exc}") from None
        w, eps = float(p.get("weight", 1.0)), float(p.get("epsilon", 0.0))
        if not (math.isfinite(w) and w >= 0.0):
            raise ValueError(f"pair {i} ({p.get('prompt_id')}): weight must be finite and >= 0, got {w}")
        if not (0.0 <= eps <= 0.5):
            raise ValueError(f"pair {i} ({p.get('prompt_id')}): epsilon must lie in [0, 0.5], got {eps}")


def _validate_demonstrations(examples: list[dict[str, Any]]) -> list[Demonstration]:
    """The SFT examples as records, checked where they arrive."""
    if not examples:
        raise ValueError("no demonstrations to train on")
    out = []
    for i, e in enumerate(examples):
        try:
            out.append(Demonstration.from_dict(e))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"demonstration {i} ({e.get('prompt_id')}): {exc}") from None
    return out


def _set_dropout(config: Any, p: float) -> dict[str, float]:
    """Set every known dropout attribute present on ``config`` to ``p``; return the original values."""
    original = {}
    for name in DROPOUT_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            original[name] = float(value)
            setattr(config, name, float(p))
    return original


def _make_trainer_classes():
    """The trainer classes (built lazily: TRL imports are heavy).

    Returns ``(DPOTrainer subclass, weighted DPOTrainer subclass, weighted collator, packed collator)``.
    """
    import contextlib
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import use_adapter

    from workers import packing

    class RefEvalDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, with our tokenization and the precomputed reference log-probs taken in eval mode.

        TRL runs the reference pass in whatever mode the model happens to be in (a fresh PEFT wrapper
        reports train mode), so dropout could perturb the reference. Here the reference is exactly M_t.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # TRL would render the template itself and, where the prompt is not a prefix of prompt +
            # reply, silently train on a shortened prompt; chat.encode_pair gives the sampler's ids or fails.
            def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
                prompt_ids, chosen_ids = encode_pair(processing_class, row["messages"], row["chosen"])
                _, rejected_ids = encode_pair(processing_class, row["messages"], row["rejected"])
                return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}

            dataset = dataset.map(
                tokenize, remove_columns=["messages", "chosen", "rejected"], desc=f"Tokenizing {dataset_name} dataset"
            )
            # As TRL does: with keep_start truncation, a prompt that fills max_length leaves no reply token.
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

        def compute_ref_log_probs(self, model, inputs):
            was_training = model.training
            model.eval()
            try:
                return self._ref_logps(model, inputs)
            finally:
                model.train(was_training)

        def _ref_logps(self, model, inputs):
            return DPOTrainer.compute_ref_log_probs(self, model, inputs)

    @dataclass
    class PackedPairCollator:
        """Each micro-batch as one prefix-shared, padding-free row (workers/packing.py)."""

        max_length: int | None = None

        def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            return packing.pack(examples, self.max_length)

    @dataclass
    class WeightedPreferenceCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            out["pair_weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
            out["pair_epsilon"] = torch.tensor([float(e["epsilon"]) for e in examples], dtype=torch.float32)
            return out

    class WeightedDPOTrainer(RefEvalDPOTrainer):
        """Sigmoid DPO with per-pair label smoothing ``epsilon`` (cDPO) and a per-pair loss ``weight``.

        ``loss = mean_j w_j * ( -(1 - eps_j) * logsigmoid(beta * h_j) - eps_j * logsigmoid(-beta * h_j) )``
        with ``h_j`` the chosen-minus-rejected difference of policy/reference log-ratios (summed log-probs).
        With all ``w_j = 1`` and ``eps_j = 0`` this is exactly TRL's ``sigmoid`` loss. Needs precomputed
        reference log-probs (the worker always precomputes them) and the plain sigmoid setup.
        """

        def __init__(self, *args: Any, nll_weight: float = 0.0, packed: bool = False, **kwargs: Any):
            # set before super().__init__: it precomputes the reference log-probs through them
            self.nll_weight = float(nll_weight)
            self.packed = packed
            super().__init__(*args, **kwargs)
            if not self.precompute_ref_logps:
                raise ValueError("WeightedDPOTrainer needs precompute_ref_log_probs=True")
            if (
                self.loss_types != ["sigmoid"]
                or self.f_divergence_type != "reverse_kl"
                or self.ld_alpha is not None
                or self.use_weighting
                or self.aux_loss_enabled
            ):
                raise ValueError("WeightedDPOTrainer supports only the plain sigmoid DPO loss")

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            for name in ("weight", "epsilon"):
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

        def _ref_logps(self, model, inputs):  # in eval mode (RefEvalDPOTrainer.compute_ref_log_probs)
            if not self.packed:
                return super()._ref_logps(model, {k: v for k, v in inputs.items() if k not in _WEIGHT_KEYS})
            # TRL's reference pass, with the packed forward: no grad, no checkpointing, LoRA adapter off.
            adapter = contextlib.nullcontext()
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                adapter,
                self.accelerator.autocast(),
            ):
                return packing.pair_logps(model, inputs)

        def _pair_logps(self, model, inputs):
            """(chosen, rejected) summed reply log-probs and the chosen replies' token counts."""
            if self.packed:
                chosen_logps, rejected_logps = packing.pair_logps(model, inputs)
                return chosen_logps, rejected_logps, inputs["reply_tokens"].chunk(2)[0], None
            completion_mask = inputs["completion_mask"]
            skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *_WEIGHT_KEYS}
            model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            # TRL's fused LM head: per-token log-probs of the labels, zero where the label is -100.
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch is [chosen..., rejected...]
            return chosen_logps, rejected_logps, completion_mask[:, 1:].sum(dim=1).chunk(2, dim=0)[0], outputs

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            weight = inputs["pair_weight"].float()
            epsilon = inputs["pair_epsilon"].float()
            chosen_logps, rejected_logps, chosen_tokens, outputs = self._pair_logps(model, inputs)
            chosen_logratios = chosen_logps - inputs["ref_chosen_logps"]
            rejected_logratios = rejected_logps - inputs["ref_rejected_logps"]
            logits = self.beta * (chosen_logratios - rejected_logratios)
            per_pair = -(1.0 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)
            if self.nll_weight:
                # UPO / IRPO: + lambda * NLL(y_w) / |y_w|, the chosen reply's mean token NLL.
                chosen_nll = -chosen_logps / chosen_tokens.clamp(min=1).float()
                per_pair = per_pair + self.nll_weight * chosen_nll
                self._metrics[mode]["nll_chosen"].append(self.accelerator.gather(chosen_nll.detach()).mean().item())
            loss = (weight * per_pair).mean()

            # Same metric names as TRL's own loss, so the worker reads both paths alike.
            gather = self.accelerator.gather
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
            metrics["pair_weight"].append(gather(weight).mean().item())
            metrics["pair_epsilon"].append(gather(epsilon).mean().item())
            return (loss, outputs) if return_outputs else loss

    return RefEvalDPOTrainer, WeightedDPOTrainer, WeightedPreferenceCollator, PackedPairCollator


# Tokenizer files copied verbatim from the base checkpoint, so every round's tokenizer is byte-identical.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def _save_tokenizer(base_checkpoint: str, output_dir: str) -> None:
    """Copy the base's tokenizer files (with its chat template); re-save with transformers if there are none."""
    import shutil

    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(base_checkpoint, n))]
    if "tokenizer_config.json" in found and ("tokenizer.json" in found or len(found) > 1):
        for name in found:
            shutil.copyfile(os.path.join(base_checkpoint, name), os.path.join(output_dir, name))
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_checkpoint).save_pretrained(output_dir)


def _dataset(pairs: list[dict[str, Any]], weighted: bool) -> Any:
    """The trainer's input rows: prompt messages and the two replies (plus weight / epsilon when weighted)."""
    from datasets import Dataset

    rows = []
    for p in pairs:
        row = {"messages": p["messages"], "chosen": p["chosen"], "rejected": p["rejected"]}
        if weighted:
            row["weight"] = float(p.get("weight", 1.0))
            row["epsilon"] = float(p.get("epsilon", 0.0))
        rows.append(row)
    return Dataset.from_list(rows)


def save_checkpoint(model: Any, base_checkpoint: str, output_dir: str) -> None:
    """``model`` with the base's tokenizer files (byte-identical) as a complete checkpoint in ``output_dir``,
    sealed (every file's sha256 in ``checkpoint.sha256``) and fsynced here, on the node that wrote it."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    _save_tokenizer(base_checkpoint, output_dir)
    seal_checkpoint(output_dir, reseal=True)  # a retried training writes its folder anew


def _summarize(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Average TRL's per-step logs (the entries with a ``loss``) under our names, plus the first and
    last values (the first step's loss is ln 2 and its rewards 0 when the policy still equals its
    reference and both see the same network: dropout in training alone moves them)."""
    steps = [e for e in log_history if "loss" in e and "train_loss" not in e]
    out: dict[str, float] = {}
    for src, dst in METRIC_NAMES.items():
        values = [float(e[src]) for e in steps if e.get(src) is not None]
        if values:
            out[dst] = sum(values) / len(values)
            out[dst.replace("train/", "train/first_", 1)] = values[0]
            out[dst.replace("train/", "train/last_", 1)] = values[-1]
    lrs = [float(e["learning_rate"]) for e in steps if "learning_rate" in e]
    if lrs:
        out["train/lr_first"], out["train/lr_last"] = lrs[0], lrs[-1]
    return out


@dataclass
class _Loaded:
    """A base checkpoint loaded for training, and what its config looked like before (restored on save)."""

    model: Any
    tokenizer: Any
    config: Any
    pad_token_id: Any
    use_cache: Any
    dropout: dict[str, float]


def _load(base_checkpoint: str, dropout: float, what: str, sha256: str | None = None) -> _Loaded:
    """The base as a float32 causal LM in eval mode, dropout set to ``dropout``; its tokenizer must
    have a chat template (``what`` trains on chat-formatted examples). Its files are checked against
    its seal and ``sha256`` (the manifest's) first."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    verify_checkpoint(base_checkpoint, sha256, what="base checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer at {base_checkpoint} has no chat template; {what}")
    config = AutoConfig.from_pretrained(base_checkpoint)
    pad_token_id, use_cache = getattr(config, "pad_token_id", None), getattr(config, "use_cache", None)
    original_dropout = _set_dropout(config, dropout)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, config=config, dtype=torch.float32)
    model.eval()
    return _Loaded(model, tokenizer, config, pad_token_id, use_cache, original_dropout)


def _peft_config(cfg: Section) -> Any:
    """LoRA settings for ``train.method=lora``, else None."""
    if cfg["method"] != "lora":
        return None
    from peft import LoraConfig

    lora = cfg.sub("lora")
    return LoraConfig(
        r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )


def use_bf16(setting: Any) -> bool:
    """``train.bf16``: true/false, or "auto" = bf16 autocast where the hardware multiplies bf16
    natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX), fp32 elsewhere (emulated
    bf16 is slower than fp32). The weights and the optimizer stay fp32 either way."""

    def hardware_has_bf16() -> bool:
        import torch

        return bool(torch.cuda.is_bf16_supported()) if torch.cuda.is_available() else cpu_has_fast_bf16()

    return auto_switch(setting, hardware_has_bf16)


def _schedule_args(cfg: Section, seed: int) -> dict[str, Any]:
    """The TrainingArguments DPO and SFT share: optimiser schedule, batches, epochs, precision, run_args."""
    import torch

    batch_size, micro = _batch_sizes(cfg)
    scheduler = cfg["lr_scheduler"]
    return dict(
        learning_rate=float(cfg["learning_rate"]),
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs={"min_lr_rate": float(cfg["min_lr_ratio"])} if scheduler == "cosine_with_min_lr" else {},
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch_size // micro,
        num_train_epochs=int(cfg["epochs"]),
        max_length=int(cfg["max_length"]) if cfg["max_length"] else None,
        bf16=use_bf16(cfg["bf16"]),
        gradient_checkpointing=bool(cfg["gradient_checkpointing"]),
        **run_args(seed, torch.cuda.is_available()),
    )


def _save_trained(trained: Any, loaded: _Loaded, base_checkpoint: str, output_dir: str, save_dtype: str) -> float:
    """Save the trained model (LoRA already merged) with the base config as it was (dropout, pad id,
    use_cache restored) and the base's generation config, in ``save_dtype``; returns the seconds."""
    import torch
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    for name, value in loaded.dropout.items():
        setattr(trained.config, name, value)
    trained.config.pad_token_id = loaded.pad_token_id
    if loaded.use_cache is not None:
        trained.config.use_cache = loaded.use_cache
    try:
        trained.generation_config = GenerationConfig.from_pretrained(base_checkpoint)
    except OSError:
        pass  # the base had none; keep the one the model was built with
    if save_dtype == "auto":
        save_dtype = str(getattr(loaded.config, "dtype", None) or "float32").replace("torch.", "")
    save_checkpoint(trained.to(getattr(torch, save_dtype)), base_checkpoint, output_dir)
    return time.perf_counter() - t0


def _fit(
    trainer: Any, method: str, t_start: float, resume: str | None = None
) -> tuple[Any, dict[str, float], int, int, float]:
    """Train (from the saved state ``resume`` if given); return (the trained model, LoRA merged; our
    metrics; optimizer steps; examples trained on; seconds since ``t_start``). Pass the trainer
    itself, unnamed: it is dropped here, so its memory is back before saving."""
    from orchestrator.console import trainer_progress

    trainer.add_callback(trainer_progress())  # steps and loss to the driver's console
    trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t_start
    steps, trained = int(trainer.state.global_step), len(trainer.train_dataset)
    metrics = _summarize(trainer.state.log_history)
    model = trainer.accelerator.unwrap_model(trainer.model)
    del trainer
    gc.collect()
    return (model.merge_and_unload() if method == "lora" else model), metrics, steps, trained, train_s


# Settings that change how a training runs, never its steps: saved state survives a change of them.
_EXECUTION_KEYS = ("threads", "resources", "save_steps", "pack")


def _resume(kind: str, examples: list[dict[str, Any]], base: str, cfg: Section, seed: int, state_dir: str | None) -> str | None:
    """Where a retried training resumes (its latest saved state for the same inputs), or None."""
    if not state_dir or not cfg.get("save_steps"):
        return None
    settings = {k: v for k, v in cfg.items() if k not in _EXECUTION_KEYS}
    found = resume_point(state_dir, inputs_key(kind=kind, examples=examples, base=base, cfg=settings, seed=seed))
    if found:
        log.info("%s: resuming from the saved state %s", kind, found)
    return found


def _resume_metrics(resume: str | None) -> dict[str, float]:
    return {"train/resumed_from_step": float(resume.rsplit("-", 1)[-1]) if resume else 0.0}


class TrainerWorker(CoreWorker):
    def train(
        self,
        pairs: list[dict[str, Any]],
        base_checkpoint: str,
        output_dir: str,
        cfg: dict[str, Any],
        seed: int = 0,
        state_dir: str | None = None,
        base_sha256: str | None = None,
    ) -> dict[str, Any]:
        """DPO on ``pairs`` from ``base_checkpoint`` (also the reference); save to ``output_dir``.

        With ``state_dir`` and ``train.save_steps`` the Trainer's state is saved there every
        ``save_steps`` optimizer steps, and a training with the same inputs resumes from the latest
        one (a retry after the worker died). ``base_sha256``: the manifest's checksum of the base.
        Returns ``TrainResult(...).to_dict()``.
        """
        t_start = time.perf_counter()
        cfg = Section("train", cfg)
        _validate(pairs)
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])

        import transformers
        from trl import DPOConfig

        method = cfg["method"]
        _, micro = _batch_sizes(cfg)
        epochs = int(cfg["epochs"])
        dropout = float(cfg["dropout"])
        loss = cfg["loss"]
        # The chosen reply's length-normalised NLL beside the DPO term (RPO / IRPO; UPO's lambda): it
        # keeps the chosen replies likely, where DPO alone lowers both replies' likelihood and lets
        # the freed mass go to longer, unfinished answers (docs/sweep.md).
        nll_weight = float(cfg.sub("upo")["nll_weight"]) if loss == "upo" else float(cfg["nll_weight"])
        # Packed batches need our own loss (TRL's reads padded rows); with every weight 1, every epsilon
        # 0 and no NLL term it is exactly TRL's sigmoid loss.
        packed = bool(cfg["pack"])
        weighted = packed or loss == "upo" or nll_weight > 0 or _needs_weighted(pairs)
        peft_config = _peft_config(cfg)
        save_dtype = str(cfg["save_dtype"])

        transformers.set_seed(seed)
        # eval mode: the reference log-probs are precomputed before training, without dropout
        loaded = _load(base_checkpoint, dropout, "DPO trains on chat-formatted pairs", base_sha256)
        hang_point(f"train_base:{os.path.basename(os.path.normpath(base_checkpoint))}")  # test-only
        tokenizer = loaded.tokenizer
        resume = _resume("dpo", pairs, base_checkpoint, cfg, seed, state_dir)

        with tempfile.TemporaryDirectory(prefix="dpo-scratch-") as scratch:
            args = DPOConfig(
                loss_type=[LOSSES[loss]],
                beta=float(cfg["beta"]),
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=micro,
                disable_dropout=dropout == 0.0,
                **{**_schedule_args(cfg, seed), "output_dir": scratch, **state_args(cfg.get("save_steps"), state_dir)},
            )
            plain_cls, weighted_cls, collator_cls, packed_collator_cls = _make_trainer_classes()
            trainer_cls, collator, extra = plain_cls, None, {}
            if weighted:
                trainer_cls, extra = weighted_cls, {"nll_weight": nll_weight, "packed": packed}
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                collator = (
                    packed_collator_cls(max_length=args.max_length) if packed
                    else collator_cls(pad_token_id=pad_id, max_length=args.max_length)
                )  # fmt: skip
            t_train = time.perf_counter()
            model, metrics, steps, trained_pairs, train_s = _fit(
                trainer_cls(
                    model=loaded.model,
                    args=args,
                    data_collator=collator,
                    train_dataset=_dataset(pairs, weighted),
                    processing_class=tokenizer,
                    peft_config=peft_config,
                    callbacks=[state_callback()],
                    **extra,
                ),
                method, t_train, resume,
            )  # fmt: skip

        save_s = _save_trained(model, loaded, base_checkpoint, output_dir, save_dtype)
        dropout_names = list(loaded.dropout)
        del model, loaded
        gc.collect()

        metrics.update(
            {
                "train/pairs_per_s": len(pairs) * epochs / train_s if train_s > 0 else 0.0,
                "train/train_s": train_s,
                "train/save_s": save_s,
                "train/threads": float(self.threads),
                "train/weighted": float(weighted),
                "train/packed": float(packed),
                "train/bf16": float(args.bf16),
                **_resume_metrics(resume),
            }
        )
        if trained_pairs != len(pairs):
            metrics["train/dropped_pairs"] = float(len(pairs) - trained_pairs)
        for name in dropout_names:
            metrics[f"train/dropout.{name}"] = dropout
        if weighted:
            metrics["train/pair_weight_mean"] = sum(float(p.get("weight", 1.0)) for p in pairs) / len(pairs)
            metrics["train/pair_epsilon_mean"] = sum(float(p.get("epsilon", 0.0)) for p in pairs) / len(pairs)
        if loss == "upo":
            metrics["train/upo_nll_weight"] = nll_weight
        metrics["train/nll_weight"] = nll_weight
        wall_s = time.perf_counter() - t_start
        log.info(
            "DPO (%s) on %d pairs: %d steps in %.1fs (%.2f pairs/s), loss %.4f -> %s",
            method, len(pairs), steps, train_s, metrics["train/pairs_per_s"], metrics.get("train/loss", float("nan")),
            output_dir,
        )
        return TrainResult(
            checkpoint=output_dir, num_pairs=len(pairs), steps=steps, wall_s=wall_s, metrics=metrics
        ).to_dict()

    def sft(
        self,
        examples: list[dict[str, Any]],
        base_checkpoint: str,
        output_dir: str,
        cfg: dict[str, Any],
        seed: int = 0,
        state_dir: str | None = None,
        base_sha256: str | None = None,
    ) -> dict[str, Any]:
        """Supervised fine-tuning of ``base_checkpoint`` on ``examples`` (``Demonstration`` dicts: the
        reply ``response`` to the prompt ``messages``), the loss on the reply tokens only; save to
        ``output_dir``. ``cfg``: the ``train`` section's keys (beta and loss are not read).

        ``state_dir``, ``base_sha256``: as for :meth:`train`.
        Returns ``TrainResult(...).to_dict()`` (``num_pairs`` counts the examples).
        """
        t_start = time.perf_counter()
        cfg = Section("train", cfg)
        demos = _validate_demonstrations(examples)
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])

        import transformers
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        method = cfg["method"]
        epochs = int(cfg["epochs"])
        dropout = float(cfg["dropout"])
        peft_config = _peft_config(cfg)
        save_dtype = str(cfg["save_dtype"])

        transformers.set_seed(seed)
        loaded = _load(base_checkpoint, dropout, "SFT trains on chat-formatted demonstrations", base_sha256)
        resume = _resume("sft", examples, base_checkpoint, cfg, seed, state_dir)
        rows = []
        for d in demos:
            # The sampler's prompt ids (chat.encode_pair); the loss only on the reply and its end of turn.
            prompt_ids, reply_ids = encode_pair(loaded.tokenizer, d.messages, d.response)
            rows.append({"input_ids": prompt_ids + reply_ids, "labels": [-100] * len(prompt_ids) + reply_ids})

        with tempfile.TemporaryDirectory(prefix="sft-scratch-") as scratch:
            # Pre-tokenized rows with labels: TRL keeps them as they are, truncates to max_length
            # (keep_start) and drops rows left without a reply token.
            args = SFTConfig(
                packing=False,
                **{**_schedule_args(cfg, seed), "output_dir": scratch, **state_args(cfg.get("save_steps"), state_dir)},
            )
            t_train = time.perf_counter()
            model, metrics, steps, trained, train_s = _fit(
                SFTTrainer(
                    model=loaded.model, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=loaded.tokenizer, peft_config=peft_config, callbacks=[state_callback()],
                ),
                method, t_train, resume,
            )  # fmt: skip

        save_s = _save_trained(model, loaded, base_checkpoint, output_dir, save_dtype)
        dropout_names = list(loaded.dropout)
        del model, loaded
        gc.collect()

        metrics.update({
            "train/examples": float(len(demos)),
            "train/examples_per_s": len(demos) * epochs / train_s if train_s > 0 else 0.0,
            "train/reply_tokens_mean": sum(sum(1 for t in r["labels"] if t != -100) for r in rows) / len(rows),
            "train/train_s": train_s,
            "train/save_s": save_s,
            "train/threads": float(self.threads),
            "train/bf16": float(args.bf16),
            **_resume_metrics(resume),
        })
        if trained != len(demos):
            metrics["train/dropped_examples"] = float(len(demos) - trained)
        for name in dropout_names:
            metrics[f"train/dropout.{name}"] = dropout
        wall_s = time.perf_counter() - t_start
        log.info(
            "SFT (%s) on %d examples: %d steps in %.1fs (%.2f examples/s), loss %.4f -> %s",
            method, len(demos), steps, train_s, metrics["train/examples_per_s"], metrics.get("train/loss", float("nan")),
            output_dir,
        )
        return TrainResult(checkpoint=output_dir, num_pairs=len(demos), steps=steps, wall_s=wall_s, metrics=metrics).to_dict()
