"""One of CRM's two peers (algorithms.md 6): a model that scores the round's pairs and trains on them step by step.

The CRM filter (orchestrator/filters/crm.py) holds two of these at once, as Ray actors of its task roles
(``Workers.hold``), and drives them in lockstep: per batch, both peers' ``margins`` on the batch, then
each peer's ``step`` on the pairs the *other* selected. Importing this module is light (torch and
transformers are imported inside the methods).

A plain torch loop, not TRL: co-teaching decides batch by batch which pairs each model trains on, from
the other model's scores of that very batch; TRL's trainers own their data loader and step through
whole batches of it, so they cannot be steered one step at a time from outside.

Scorers (``cfg["scorer"]``); either way the per-pair loss is ``-log sigmoid(margin)``:

* ``rm``: a Bradley-Terry reward model built and read as workers/reward_model.py's ``bradley_terry``
  mode does: ``AutoModelForSequenceClassification`` from the causal-LM base with a new one-label head
  initialised from the seed, fp32, ``pad_token_id`` set; the ids and truncation of its ``_Encoder``;
  r(x, y) is the head on the rightmost non-pad token (as transformers' sequence classifiers pick it).
  margin = r(x, y_w) - r(x, y_l). The saved peer loads in ``RewardModelWorker.score``.
* ``dpo`` (CRM-DPO): a causal-LM policy initialised from the base; the reference is the base itself,
  its log-probs computed once at start in eval mode (no second model is held). margin =
  ``beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]``, response log-probs
  summed over ``chat.encode_pair``'s completion ids (the DPO trainer's). A sequence over ``max_length``
  keeps its last tokens, as the reward model's do (the start of the prompt goes first).

``model.train_layers`` (k): only the top k decoder layers, the final norm and the rm head train, over
the cached output of the frozen layers below (workers/trunk.py: minutes instead of half an hour on a
2-core CPU). The LM head stays frozen in ``dpo`` (it is tied to the embeddings in SmolLM2, whose
output the cache holds). ``null`` (or k >= the model's layers): full fine-tune, every pass through
the whole model.

AdamW on the trainable weights, ``model.learning_rate`` with ``model.lr_scheduler`` (warm-up
``model.warmup_ratio``) over the planned steps (``planned_steps``); a step's pairs go through in
micro-batches of ``model.micro_batch_size`` with gradient accumulation; the gradient norm is clipped
at 1.0 (transformers' default, which the reward-model worker trains with).

``cfg`` is the CRM filter's config section (conf/filters/crm.yaml) as plain dicts, read strictly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from orchestrator import chat
from orchestrator.models import seal_checkpoint, verify_checkpoint
from orchestrator.section import Section
from workers.cores import CoreWorker
from workers.reward_model import ID2LABEL, METADATA_FILE, _Encoder, _fit, _pairs
from workers.trainer import _set_dropout, save_checkpoint
from workers.trunk import Trunk, check_train_layers

log = logging.getLogger(__name__)

SCORERS = ("rm", "dpo")
PEER_FILE = "peer_review.json"  # a dpo peer's metadata (an rm peer writes the reward model's reward_model.json)
MAX_GRAD_NORM = 1.0


def planned_steps(num_pairs: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a CRM run: one per batch of every epoch (the filter and the peers plan alike)."""
    return int(epochs) * math.ceil(int(num_pairs) / int(batch_size))


class PeerModel(CoreWorker):
    """One peer, built from ``base_checkpoint`` for ``pairs`` (the round's, as dicts), which it names by index."""

    def __init__(self, pairs: list[dict[str, Any]], base_checkpoint: str, cfg: dict[str, Any], seed: int):
        cfg = Section("filter.crm", cfg)
        self.scorer = cfg["scorer"]
        if self.scorer not in SCORERS:
            raise ValueError(f"filter.crm.scorer={self.scorer!r} is not one of {', '.join(SCORERS)}")
        m = cfg.sub("model")
        super().__init__(m["threads"])
        t0 = time.perf_counter()

        import torch
        import transformers
        from transformers import AutoTokenizer, get_scheduler

        self.pairs = _pairs(pairs)
        self.base = base_checkpoint
        self.seed = int(seed)
        self.batch_size = int(m["batch_size"])
        self.micro = int(m["micro_batch_size"] or self.batch_size)
        self.eval_batch = int(m["eval_batch_size"])
        self.max_length = int(m["max_length"]) if m["max_length"] else None
        self.beta = float(cfg.sub("dpo")["beta"]) if self.scorer == "dpo" else None
        self.steps = 0

        transformers.set_seed(self.seed)  # before the model is built: the rm head is initialised from it
        verify_checkpoint(base_checkpoint, what="base checkpoint")
        tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer at {base_checkpoint} has no chat template; the CRM peers read chat-formatted pairs")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)

        # Sequences 2i and 2i+1: pair i's chosen and rejected. ``read`` (dpo): each one's first completion
        # token, predicted from the position before it (an rm reads its rightmost non-pad token: Trunk.last_token).
        self.ids: list[list[int]] = []
        self.read: list[int] = []
        self.truncated = 0
        load = self._load_rm if self.scorer == "rm" else self._load_policy
        model = load(tokenizer, float(m["dropout"]))
        if self.truncated:
            log.warning("CRM peer: %d of %d sequences cut to their last %s tokens", self.truncated, len(self.ids), self.max_length)
        if torch.cuda.is_available():
            model.to("cuda")
        self.model = model
        k = check_train_layers(m["train_layers"], "filter.crm.model.train_layers")
        heads = [self.head] if self.scorer == "rm" else []
        self.trunk = Trunk(model, self.ids, self.pad_id, k, heads, self.eval_batch)
        if self.scorer == "dpo":
            # The reference is the base: its log-probs once, in eval mode (no dropout), before any step.
            self.ref = self._no_grad(range(len(self.pairs)), self._logps)

        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=float(m["learning_rate"]), weight_decay=float(m["weight_decay"]))
        total = planned_steps(len(self.pairs), self.batch_size, int(m["epochs"]))
        self.scheduler = get_scheduler(
            m["lr_scheduler"], self.optimizer, num_warmup_steps=math.ceil(float(m["warmup_ratio"]) * total), num_training_steps=total
        )
        self.trainable = float(sum(p.numel() for p in trainable))
        # The peer's own random stream (dropout), so peers sharing a process (in-process tests) draw as separate actors do.
        self.rng_state = torch.get_rng_state()
        self.load_s = time.perf_counter() - t0

    # -- models and their inputs ------------------------------------------------------------
    def _load_rm(self, tokenizer: Any, dropout: float) -> Any:
        """The Bradley-Terry reward model (a new one-label head) and its ids, as workers/reward_model.py has them."""
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        id2label = ID2LABEL["bradley_terry"]
        config = AutoConfig.from_pretrained(self.base, num_labels=1, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        config.pad_token_id = self.pad_id
        self.base_dropout = _set_dropout(config, dropout)
        model = AutoModelForSequenceClassification.from_pretrained(self.base, config=config, dtype=torch.float32)
        self.head = model.score
        enc = _Encoder(tokenizer, self.max_length)
        for p in self.pairs:
            for reply in (p.chosen, p.rejected):
                self.ids.append(enc.reply(p, reply))
        self.truncated = enc.truncated
        return model

    def _load_policy(self, tokenizer: Any, dropout: float) -> Any:
        """The CRM-DPO policy (the base itself) and its ids, as the DPO trainer tokenizes them."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.base)
        self.base_dropout = _set_dropout(config, dropout)
        model = AutoModelForCausalLM.from_pretrained(self.base, config=config, dtype=torch.float32)
        self.head = model.get_output_embeddings()
        for p in self.pairs:
            for reply in (p.chosen, p.rejected):
                prompt_ids, reply_ids = chat.encode_pair(tokenizer, p.messages, reply)
                ids, cut = _fit(prompt_ids + reply_ids, self.max_length)
                self.truncated += cut
                self.ids.append(ids)
                # A completion that fills the whole sequence loses its first token (nothing predicts it).
                self.read.append(max(len(ids) - len(reply_ids), 1))
        return model

    # -- scores ---------------------------------------------------------------------------
    def _logps(self, pairs: list[int]) -> Any:
        """Summed completion log-probs of pairs ``pairs``, shape (len(pairs), 2): chosen, rejected (dpo)."""
        import torch

        seqs = [2 * i + side for side in (0, 1) for i in pairs]
        hidden = self.trunk.hidden(seqs)
        rows, positions, labels = [], [], []
        for row, j in enumerate(seqs):
            ids = self.ids[j]
            for pos in range(self.read[j], len(ids)):  # token ``pos`` is predicted at ``pos - 1``
                rows.append(row)
                positions.append(pos - 1)
                labels.append(ids[pos])
        device = hidden.device
        logits = self.head(hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]).float()
        target = torch.tensor(labels, device=device)
        token_logps = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums = torch.zeros(len(seqs), dtype=token_logps.dtype, device=device).index_add(0, torch.tensor(rows, device=device), token_logps)
        return torch.stack(sums.cpu().chunk(2), dim=1)

    def _margins(self, pairs: list[int]) -> Any:
        """Per-pair margins (a CPU tensor, with gradients when they are on)."""
        import torch

        if self.scorer == "rm":
            seqs = [2 * i + side for side in (0, 1) for i in pairs]
            hidden = self.trunk.hidden(seqs)
            r = self.head(self.trunk.last_token(seqs, hidden))[:, 0].float().cpu()
            return r[: len(pairs)] - r[len(pairs) :]
        ratios = self._logps(pairs) - self.ref[torch.tensor(pairs, dtype=torch.long)]
        return self.beta * (ratios[:, 0] - ratios[:, 1])

    def _no_grad(self, pairs: Any, fn: Any) -> Any:
        """``fn`` over ``pairs`` in chunks of ``eval_batch_size``, eval mode, no gradients; results concatenated."""
        import torch

        pairs = list(pairs)
        self.model.eval()
        with torch.no_grad():
            return torch.cat([fn(pairs[i : i + self.eval_batch]) for i in range(0, len(pairs), self.eval_batch)])

    def margins(self, pairs: list[int]) -> list[float]:
        """The current margins of pairs ``pairs`` (eval mode, no gradients)."""
        return self._no_grad(pairs, self._margins).tolist()

    # -- training -------------------------------------------------------------------------
    def step(self, pairs: list[int]) -> dict[str, float]:
        """One optimizer step on pairs ``pairs`` (their mean ``-log sigmoid(margin)``); their loss and margin before it."""
        import torch
        import torch.nn.functional as F

        pairs = list(pairs)
        if not pairs:
            raise ValueError("a CRM peer step needs at least one pair")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = margin_sum = 0.0
        # The CPU stream only: on a GPU dropout draws from the device's stream, which each actor has to itself.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            for start in range(0, len(pairs), self.micro):
                margins = self._margins(pairs[start : start + self.micro])
                loss = -F.logsigmoid(margins).sum()
                (loss / len(pairs)).backward()  # gradient accumulation: the step's mean over all its pairs
                loss_sum += float(loss.detach())
                margin_sum += float(margins.detach().sum())
            self.rng_state = torch.get_rng_state()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], MAX_GRAD_NORM)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        return {"loss": loss_sum / len(pairs), "margin": margin_sum / len(pairs), "pairs": float(len(pairs)), "lr": lr}

    def info(self) -> dict[str, float]:
        return {"load_s": self.load_s, "trainable_params": self.trainable, "truncated": float(self.truncated), "steps": float(self.steps)}

    # -- result ---------------------------------------------------------------------------
    def save(self, output_dir: str) -> dict[str, float]:
        """The peer as a complete checkpoint: the whole model, the base's dropout values on its config."""
        t0 = time.perf_counter()
        # Config only: the modules copied their dropout rates when built, so nothing changes here.
        for name, value in self.base_dropout.items():
            setattr(self.model.config, name, value)
        with self.trunk.whole() as model:
            save_checkpoint(model, self.base, output_dir)
        meta: dict[str, Any] = {"base_checkpoint": self.base, "seed": self.seed, "max_length": self.max_length, "steps": self.steps}
        if self.scorer == "rm":  # the reward model's conventions, so RewardModelWorker.score reads it
            meta = {"mode": "bradley_terry", "pair_template": None, **meta, "metrics": {}, "trained_by": "crm"}
            name = METADATA_FILE
        else:
            meta = {"scorer": "dpo", "beta": self.beta, **meta}
            name = PEER_FILE
        with open(os.path.join(output_dir, name), "w") as f:
            json.dump(meta, f, indent=2)
        seal_checkpoint(output_dir, reseal=True)  # again: the seal must list this file too (the weights' hashes are cached)
        return {"save_s": time.perf_counter() - t0, **self.info()}
