"""MC-dropout uncertainty of a binary preference estimator (UPO, algorithms.md 5.2 step 4).

Pure Python (no torch, no numpy), so the filters and their tests use it without a model.

Each of T stochastic forward passes gives ``p_t``, the estimator's probability that the chosen
response is better (class 0 in UPO's label convention: "Response #1 is better" with the chosen
response first). BALD, the information gain between the prediction and the estimator's weights
(UPO Eq. 10; code ``sampler.py get_BALD_acquisition``):

    B = H(mean_t p_t) - mean_t H(p_t),   H(p) = -p ln p - (1 - p) ln(1 - p)

with natural logs and ``0 ln 0 = 0``. B = 0 when every pass gives the same probability (the
estimator is sure of its own prediction, whatever it is); B = ln 2 when the passes are confident
but split half and half. By Jensen's inequality B >= 0; float rounding below 0 is clipped to 0.

Differences from UPO's code, on purpose: it adds 1e-10 inside each log (a bias of order 1e-10 * T);
here the limits are exact. Its majority vote is ``argmax(bincount(argmax_c p_t[c]))``: a pass votes
0 when ``p_t >= 0.5`` (argmax takes the first of a tie) and a tie in votes goes to 0; the same here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["binary_entropy", "bald"]


def binary_entropy(p: float) -> float:
    """H(p) in nats for a Bernoulli(p); 0 at p = 0 and p = 1."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must lie in [0, 1], got {p!r}")
    h = 0.0
    for q in (p, 1.0 - p):
        if q > 0.0:
            h -= q * math.log(q)
    return h


def bald(probs_per_pass: Sequence[float]) -> tuple[float, float, int]:
    """``(B, mean_p, majority_vote)`` for one pair from its T per-pass probabilities of "chosen is better".

    ``majority_vote`` is 0 when most passes (a tie counts as 0) say the chosen response is better
    (``p_t >= 0.5``), 1 otherwise: UPO drops a pair whose vote is not 0 (the estimator disagrees
    with the label).
    """
    probs = [float(p) for p in probs_per_pass]
    if not probs:
        raise ValueError("bald needs at least one pass")
    for t, p in enumerate(probs):
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"pass {t}: probability {p!r} is not in [0, 1]")
    n = len(probs)
    mean_p = sum(probs) / n
    b = binary_entropy(min(1.0, mean_p)) - sum(binary_entropy(p) for p in probs) / n
    votes_for_rejected = sum(p < 0.5 for p in probs)
    majority = 1 if votes_for_rejected > n - votes_for_rejected else 0
    return max(0.0, b), mean_p, majority
