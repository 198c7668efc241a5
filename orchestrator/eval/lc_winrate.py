"""Raw and length-controlled win rates (the GLM of Length-Controlled AlpacaEval, Dubois et al. 2024).

Upstream (tatsu-lab/alpaca_eval@1020da21, ``metrics/glm_winrate.py``) fits, per instruction i,

    logit P_i = θ + φ·tanh(Δlen_i / sd(Δlen)) + ψ·γ_i

to the judge's preference P_i ∈ [0, 1] (ties 0.5), with ``Δlen = len(output_1) − len(output_2)``
in characters, where output_1 is the *baseline* and output_2 the *model*, and the preference is
P(model wins). The LC win rate is 100·mean_i σ(θ + ψ·γ_i): the prediction with the length term at 0.

**Our sign convention**: ``delta_len = len(model) − len(baseline)`` (characters), the preference is
P(model wins). This only flips the sign of φ relative to upstream (φ > 0 here means longer model
outputs win more often); θ, ψ and the LC win rate are the same.

**Deviations from upstream** (also noted in conf/eval/default.yaml):
- γ_i (instruction difficulty) is a precomputed per-instruction table downloaded from the HF dataset
  ``tatsu-lab/alpaca_eval`` for the AlpacaEval instructions. Our prompts are not those, and nothing
  is downloaded, so by default γ is dropped: we fit θ and φ only and LC = 100·σ(θ). A caller with
  its own difficulty estimates can pass ``difficulty`` (then ψ is fitted too).
- The regularisation toward the "gamed" baseline annotations (λ = 0.2) needs those downloaded
  annotations too and is left out; the penalty below plays its role of keeping the fit finite.
- Upstream picks an L1 strength by 5-fold ``LogisticRegressionCV``; we use a fixed penalty with
  sklearn's convention, loss = C·Σ_i w_i·CE_i + R(β) with R = ½‖β‖² (``l2``) or ‖β‖₁ (``l1``) over
  all coefficients (no separate intercept, as upstream: ``fit_intercept=False``), or no penalty
  (``none``). Default l2 with C = 100 (upstream's non-CV default C). L2 and none are fitted by
  Newton's method (numpy only); L1 by L-BFGS-B on the split β = β⁺ − β⁻ (scipy).
- Standard error of the LC win rate: bootstrap over instructions (refit per resample, seeded), or
  the delta method on θ (and ψ) from the penalised Hessian. The raw win rate's standard error is
  the standard error of the mean preference (as upstream's ``standard_error``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PENALTIES = ("l2", "l1", "none")
SE_METHODS = ("bootstrap", "delta", "none")


def sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=float)))


@dataclass
class GLMFit:
    theta: float
    phi: float
    psi: float | None
    sd_delta_len: float
    converged: bool
    iterations: int
    cov: np.ndarray | None = field(default=None, repr=False)  # inverse penalised Hessian (Newton only)


def design_matrix(delta_len: np.ndarray, difficulty: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Columns [1, tanh(Δlen/sd(Δlen)), γ]; sd with ddof=1 (pandas' ``std``); 0 when Δlen is constant."""
    d = np.asarray(delta_len, dtype=float)
    sd = float(np.std(d, ddof=1)) if d.size > 1 else 0.0
    length = np.tanh(d / sd) if sd > 0 and math.isfinite(sd) else np.zeros_like(d)
    cols = [np.ones_like(d), length]
    if difficulty is not None:
        cols.append(np.asarray(difficulty, dtype=float))
    return np.column_stack(cols), sd


def _objective(beta: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, penalty: str) -> float:
    z = x @ beta
    # cross-entropy with soft labels: -(y log σ(z) + (1-y) log σ(-z))
    ce = y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)
    loss = float(np.sum(w * ce))
    if penalty == "none":
        return loss
    reg = 0.5 * float(beta @ beta) if penalty == "l2" else float(np.abs(beta).sum())
    return c * loss + reg


def _newton(x, y, w, c, penalty, max_iter=100, tol=1e-10):
    k = x.shape[1]
    beta = np.zeros(k)
    lam = 0.0 if penalty == "none" else 1.0 / c  # divide the sklearn objective by C
    # Columns that are all zero (no length variation) carry no information: keep them at 0.
    active = np.any(x != 0, axis=0)
    obj = lambda b: _objective(b, x, y, w, 1.0, "none") + 0.5 * lam * float(b @ b)  # noqa: E731
    current = obj(beta)
    converged = False
    it = 0
    hess = np.eye(k)
    for it in range(1, max_iter + 1):
        p = sigmoid(x @ beta)
        grad = x.T @ (w * (p - y)) + lam * beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + lam * np.eye(k)
        grad[~active] = 0.0
        sub = np.ix_(active, active)
        step = np.zeros(k)
        try:
            step[active] = np.linalg.solve(hess[sub] + 1e-12 * np.eye(int(active.sum())), grad[active])
        except np.linalg.LinAlgError:
            step[active] = np.linalg.lstsq(hess[sub], grad[active], rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            cand = beta - t * step
            value = obj(cand)
            if value <= current + 1e-14:
                break
            t *= 0.5
        beta, previous, current = cand, current, value
        if np.max(np.abs(t * step)) < tol or abs(previous - current) < tol * max(1.0, abs(current)):
            converged = True
            break
    p = sigmoid(x @ beta)
    hess = (x * (w * p * (1 - p))[:, None]).T @ x + lam * np.eye(k)
    cov = np.zeros((k, k))
    sub = np.ix_(active, active)
    try:
        cov[sub] = np.linalg.inv(hess[sub])
    except np.linalg.LinAlgError:
        cov = None
    return beta, converged, it, cov


def _lbfgs_l1(x, y, w, c):
    from scipy.optimize import minimize

    k = x.shape[1]

    def fun(v):
        beta = v[:k] - v[k:]
        z = x @ beta
        p = sigmoid(z)
        loss = c * float(np.sum(w * (y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)))) + float(v.sum())
        g = c * (x.T @ (w * (p - y)))
        return loss, np.concatenate([g + 1.0, -g + 1.0])

    res = minimize(fun, np.zeros(2 * k), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * k),
                   options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x[:k] - res.x[k:], bool(res.success), int(res.nit)


def fit_glm(
    preferences: Sequence[float],
    delta_len: Sequence[float],
    difficulty: Sequence[float] | None = None,
    *,
    penalty: str = "l2",
    C: float = 100.0,
    sample_weight: Sequence[float] | None = None,
) -> GLMFit:
    """Maximise the (penalised) soft-label log-likelihood of the LC GLM; see the module docstring."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    y = np.asarray(preferences, dtype=float)
    if y.size == 0:
        raise ValueError("no preferences to fit")
    if np.any((y < 0) | (y > 1)) or not np.all(np.isfinite(y)):
        raise ValueError("preferences must lie in [0, 1]")
    x, sd = design_matrix(np.asarray(delta_len, dtype=float), None if difficulty is None else np.asarray(difficulty))
    w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    cov = None
    if penalty == "l1":
        beta, converged, iters = _lbfgs_l1(x, y, w, float(C))
    else:
        beta, converged, iters, cov = _newton(x, y, w, float(C), penalty)
    return GLMFit(
        theta=float(beta[0]),
        phi=float(beta[1]),
        psi=float(beta[2]) if difficulty is not None else None,
        sd_delta_len=sd,
        converged=converged,
        iterations=iters,
        cov=cov,
    )


def lc_from_fit(fit: GLMFit, difficulty: Sequence[float] | None = None) -> float:
    """100·mean_i σ(θ + ψ·γ_i) (the length term set to 0)."""
    if fit.psi is None or difficulty is None:
        return 100.0 * float(sigmoid(fit.theta))
    return 100.0 * float(np.mean(sigmoid(fit.theta + fit.psi * np.asarray(difficulty, dtype=float))))


def raw_winrate(preferences: Sequence[float]) -> tuple[float, float]:
    """(100·mean preference, its standard error in points; 0 for fewer than 2 values)."""
    y = np.asarray(preferences, dtype=float)
    if y.size == 0:
        return float("nan"), float("nan")
    se = float(np.std(y, ddof=1) / math.sqrt(y.size)) if y.size > 1 else 0.0
    return 100.0 * float(y.mean()), 100.0 * se


def lc_winrate(
    preferences: Sequence[float],
    model_lens: Sequence[int],
    baseline_lens: Sequence[int],
    *,
    difficulty: Sequence[float] | None = None,
    penalty: str = "l2",
    C: float = 100.0,
    se_method: str = "bootstrap",
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Raw and LC win rates (percent) with standard errors, for one model against one baseline.

    ``preferences[i]`` is P(model beats baseline) on instruction i (1 win, 0 loss, 0.5 tie, or a
    probability); lengths in characters. Returns ``winrate``, ``winrate_se``, ``lc_winrate``,
    ``lc_winrate_se``, ``n``, ``glm_theta``, ``glm_phi`` (our sign: φ > 0 means longer model
    outputs are preferred), ``glm_converged`` and, with difficulty, ``glm_psi``.
    """
    if se_method not in SE_METHODS:
        raise ValueError(f"se_method must be one of {SE_METHODS}, got {se_method!r}")
    y = np.asarray(preferences, dtype=float)
    dlen = np.asarray(model_lens, dtype=float) - np.asarray(baseline_lens, dtype=float)
    gamma = None if difficulty is None else np.asarray(difficulty, dtype=float)
    if not (y.size == dlen.size and (gamma is None or gamma.size == y.size)):
        raise ValueError("preferences, lengths and difficulty must have the same length")
    wr, wr_se = raw_winrate(y)
    out: dict[str, float] = {"n": float(y.size), "winrate": wr, "winrate_se": wr_se}
    if y.size == 0:
        return out
    fit = fit_glm(y, dlen, gamma, penalty=penalty, C=C)
    lc = lc_from_fit(fit, gamma)
    out.update(lc_winrate=lc, glm_theta=fit.theta, glm_phi=fit.phi, glm_converged=float(fit.converged))
    if fit.psi is not None:
        out["glm_psi"] = fit.psi
    se = float("nan")
    if se_method == "bootstrap" and bootstrap > 0 and y.size > 1:
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, y.size, y.size)
            g = None if gamma is None else gamma[idx]
            values.append(lc_from_fit(fit_glm(y[idx], dlen[idx], g, penalty=penalty, C=C), g))
        se = float(np.std(values, ddof=1))
    elif se_method == "delta" and fit.cov is not None:
        if gamma is None:
            s = float(sigmoid(fit.theta))
            se = 100.0 * s * (1 - s) * math.sqrt(max(fit.cov[0, 0], 0.0))
        else:
            p = sigmoid(fit.theta + fit.psi * gamma)
            d = p * (1 - p)
            grad = np.array([d.mean(), 0.0, (d * gamma).mean()])
            se = 100.0 * math.sqrt(max(float(grad @ fit.cov @ grad), 0.0))
    elif y.size == 1:
        se = 0.0
    out["lc_winrate_se"] = se
    return out
