"""Top-p (nucleus) sampling for vLLM on CPU without sorting the vocabulary: a vLLM general plugin.

vLLM's CPU sampler applies top-p by sorting every row of logits (batch x vocabulary, 256 x 49152
for the default) at every decoding step. Measured on the 2-core machine (docs/speed.md), 256
SmolLM2 answers at T 0.7 ran at 236 tok/s with top-p 0.9 and at 431 tok/s with top-p off: the
sort took about 45 % of generation. Self-Rewarding samples with top-p 0.9, so every round pays it.

Here each row's nucleus is looked for among its ``CANDIDATES`` most likely tokens (``torch.topk``, a
partial selection, no full sort). A token is kept exactly when vLLM keeps it: when the probability
mass of the tokens ranked above it is below p (vLLM masks where the ascending cumulative mass,
the token's own included, is at most 1 - p; that is the same condition). When the candidates
carry at least p of the mass, every token outside them has at least p above it and is masked, so
the candidates decide the row. Rows where they carry less (a flat distribution) go through
vLLM's own sort, as do batches that also use top-k. Two differences, both at the boundary: the
mass is summed in another order (float rounding can flip a token whose mass above it is within
rounding of p), and tokens whose logit ties the last kept one are all kept, where the sort keeps
an arbitrary subset of them.

Loaded in every vLLM process through the ``vllm.general_plugins`` entry point (pyproject.toml),
because vLLM's engine core runs in its own process. It patches
``vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p``, which the CPU sampler calls; on other
platforms (CUDA uses FlashInfer's sampler) and with ``ORCHESTRATOR_FAST_TOP_P=0`` it does nothing.
``VLLMWorker`` sets that variable from ``generation.engine.fast_top_p``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

log = logging.getLogger(__name__)

ENV = "ORCHESTRATOR_FAST_TOP_P"
# How many of each row's most likely tokens are searched for the nucleus before falling back to a
# full sort. The default run's policy at T 0.7: see docs/speed.md for the fallback share.
CANDIDATES = 256


def top_p_mask(logits: Any, p: Any, full_sort: Callable[[Any, Any], Any], candidates: int = CANDIDATES) -> Any:
    """Mask (to -inf, in place) the tokens outside each row's nucleus; ``p``: (rows,) top-p values.

    ``full_sort(logits, p)`` handles the rows whose nucleus is not among their ``candidates`` most
    likely tokens. Returns ``logits``.
    """
    import torch

    rows, vocab = logits.shape
    k = min(candidates, vocab)
    values, _ = logits.topk(k, dim=-1)  # descending
    log_norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    probs = (values.float() - log_norm).exp()
    above = probs.cumsum(dim=-1) - probs  # the mass ranked above each candidate
    limit = p.float().unsqueeze(1)
    kept = (above < limit).sum(dim=-1).clamp(min=1)  # the top token is always kept
    covered = (probs.sum(dim=-1) >= p.float()) | (p >= 1)
    threshold = values.gather(1, (kept - 1).unsqueeze(1))
    # Top-p off, or a row left to the sort: nothing masked here.
    threshold = threshold.masked_fill(((p >= 1) | ~covered).unsqueeze(1), float("-inf"))
    # In place over the whole batch: selecting the covered rows first (index_select) took 0.5 s
    # for 256 x 49152 on this CPU, more than the sort it replaces.
    logits.masked_fill_(logits < threshold, float("-inf"))
    if not bool(covered.all()):
        rest = (~covered).nonzero().squeeze(1)
        logits[rest] = full_sort(logits[rest], p[rest])
    return logits


def register() -> None:
    """The entry point: patch vLLM's CPU top-k/top-p function (idempotent; a no-op off CPU or when disabled)."""
    if os.environ.get(ENV, "1").lower() in ("0", "false", "no"):
        return
    try:
        from vllm.platforms import current_platform
        from vllm.v1.sample.ops import topk_topp_sampler as sampler
    except ImportError:  # another vLLM layout: leave it as it is
        return
    if not current_platform.is_cpu() or getattr(sampler.apply_top_k_top_p, "_orchestrator_fast_top_p", False):
        return
    original = sampler.apply_top_k_top_p

    def apply_top_k_top_p(logits: Any, k: Any, p: Any) -> Any:
        if p is None or k is not None:
            return original(logits, k, p)
        return top_p_mask(logits, p, lambda rows, p_rows: original(rows, None, p_rows))

    apply_top_k_top_p._orchestrator_fast_top_p = True  # type: ignore[attr-defined]
    sampler.apply_top_k_top_p = apply_top_k_top_p
    log.info("orchestrator: top-p without a vocabulary sort (workers/fast_top_p.py)")
