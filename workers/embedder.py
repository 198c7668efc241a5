"""Text embeddings from a causal LM's hidden states, as a Ray task actor (ALMA's prompt clustering).

ALMA clusters its prompt pool by k-means "over the base LLM's hidden representations"
(algorithms.md 3.2.1); the paper does not say which layer or pooling. Here: the last layer's hidden
states (after the model's final norm, ``AutoModel``'s ``last_hidden_state``) averaged over the
prompt's tokens. The prompt is plain text with the tokenizer's BOS and no chat template
(``orchestrator.chat.encode_text``), cut to ``max_length`` tokens. The class is plain Python;
torch / transformers are imported inside the method.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.chat import encode_text
from orchestrator.section import Section
from workers.cores import CoreWorker, padded_batches, use_cores

log = logging.getLogger(__name__)


class EmbedWorker(CoreWorker):
    def embed(self, texts: list[str], checkpoint: str, cfg: dict[str, Any]) -> list[list[float]]:
        """One vector per text (the mean of its tokens' last hidden states), in input order.

        ``cfg``: the ``alma.embed`` section (``batch_size``, ``max_length``, ``threads``), read strictly.
        """
        cfg = Section("alma.embed", cfg)
        batch_size, max_length = int(cfg["batch_size"]), int(cfg["max_length"])
        if cfg["threads"]:
            self.threads = use_cores(cfg["threads"])
        import torch
        from transformers import AutoModel, AutoTokenizer

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        seqs = [encode_text(tokenizer, t)[:max_length] for t in texts]
        out: list[list[float]] = [[] for _ in texts]
        with torch.no_grad():
            for idx, ids, mask in padded_batches(seqs, pad, batch_size):
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                for row, i in enumerate(idx):
                    out[i] = pooled[row].tolist()
        log.info("embedded %d texts with %s in %.1fs", len(texts), checkpoint, time.perf_counter() - t0)
        return out
