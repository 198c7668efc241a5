"""The length-controlled win rate GLM against worked examples computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.eval import lc_winrate as lc


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_no_length_difference_gives_lc_equal_to_raw():
    prefs = [1, 0, 0.5, 1, 1, 0.25, 0.75, 0]
    lens = [100] * len(prefs)
    out = lc.lc_winrate(prefs, lens, lens, penalty="none", se_method="delta")
    raw = 100 * np.mean(prefs)
    assert out["winrate"] == pytest.approx(raw)
    assert out["lc_winrate"] == pytest.approx(raw, abs=1e-6)
    assert out["glm_phi"] == 0.0
    # Standard error of the raw win rate: sd(ddof=1)/sqrt(n), in points.
    assert out["winrate_se"] == pytest.approx(100 * np.std(prefs, ddof=1) / math.sqrt(len(prefs)))
    # Delta method: Var(θ̂) = 1/(n p(1-p)) for the intercept-only model -> SE(100σ(θ)) = 100 sqrt(p(1-p)/n).
    p = np.mean(prefs)
    assert out["lc_winrate_se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / len(prefs)), rel=1e-6)


def test_two_length_groups_closed_form():
    """Δlen = ±c: the model is saturated, so σ(θ ± φt) equals each group's mean preference."""
    longer = [1, 1, 0.5, 1, 0]  # model 50 chars longer than the baseline
    shorter = [0, 0.5, 1, 0, 0, 0]  # model 50 chars shorter
    prefs = longer + shorter
    dlen = np.array([50] * len(longer) + [-50] * len(shorter), dtype=float)
    t = math.tanh(50 / np.std(dlen, ddof=1))
    m_plus, m_minus = np.mean(longer), np.mean(shorter)
    theta = (logit(m_plus) + logit(m_minus)) / 2
    phi = (logit(m_plus) - logit(m_minus)) / (2 * t)
    fit = lc.fit_glm(prefs, dlen, penalty="none")
    assert fit.converged
    assert fit.theta == pytest.approx(theta, abs=1e-8)
    assert fit.phi == pytest.approx(phi, abs=1e-8)
    assert phi > 0  # our sign convention: longer model outputs win more here
    out = lc.lc_winrate(prefs, [150 if d > 0 else 50 for d in dlen], [100] * len(prefs), penalty="none", se_method="none")
    expected = 100 / (1 + math.exp(-theta))
    assert out["lc_winrate"] == pytest.approx(expected, abs=1e-6)
    assert out["winrate"] == pytest.approx(100 * np.mean(prefs))
    assert out["lc_winrate"] != pytest.approx(out["winrate"], abs=0.5)


@pytest.mark.parametrize("penalty,C", [("none", 1.0), ("l2", 100.0), ("l2", 0.5)])
def test_matches_sklearn_on_duplicated_hard_labels(penalty, C):
    """Soft labels == each row twice (label 1 weight p, label 0 weight 1-p), as upstream fits it."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    n = 60
    dlen = rng.normal(0, 300, n)
    gamma = rng.normal(0, 1, n)
    prefs = np.clip(1 / (1 + np.exp(-(0.3 + 0.8 * np.tanh(dlen / 300) + 0.5 * gamma))) + rng.normal(0, 0.2, n), 0, 1)
    x, _ = lc.design_matrix(dlen, gamma)
    xx = np.vstack([x, x])
    yy = np.concatenate([np.ones(n), np.zeros(n)])
    ww = np.concatenate([prefs, 1 - prefs])
    kw = {"C": np.inf} if penalty == "none" else {"C": C}  # sklearn >= 1.8: l2 is the default penalty
    ref = sklearn.LogisticRegression(fit_intercept=False, tol=1e-12, max_iter=10000, **kw).fit(xx, yy, sample_weight=ww)
    fit = lc.fit_glm(prefs, dlen, gamma, penalty=penalty, C=C)
    np.testing.assert_allclose([fit.theta, fit.phi, fit.psi], ref.coef_[0], atol=1e-4)
    lc_ref = 100 * np.mean(1 / (1 + np.exp(-(ref.coef_[0][0] + ref.coef_[0][2] * gamma))))
    assert lc.lc_from_fit(fit, gamma) == pytest.approx(lc_ref, abs=1e-4)


def test_l1_matches_sklearn_liblinear_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(5)
    n = 80
    dlen = rng.normal(0, 200, n)
    prefs = (rng.random(n) < 1 / (1 + np.exp(-(0.4 + 1.0 * np.tanh(dlen / 200))))).astype(float)
    x, _ = lc.design_matrix(dlen, None)
    xx, yy = np.vstack([x, x]), np.concatenate([np.ones(n), np.zeros(n)])
    ww = np.concatenate([prefs, 1 - prefs])
    ref = sklearn.LogisticRegression(l1_ratio=1.0, solver="liblinear", C=0.05, fit_intercept=False, tol=1e-10, max_iter=10000)
    ref.fit(xx, yy, sample_weight=ww)
    fit = lc.fit_glm(prefs, dlen, penalty="l1", C=0.05)
    np.testing.assert_allclose([fit.theta, fit.phi], ref.coef_[0], atol=1e-3)


def test_sign_convention_is_model_minus_baseline():
    # The judge prefers whichever output is longer, nothing else: φ > 0 and LC near 50.
    model = [100, 300, 100, 300, 120, 280, 90, 310]
    base = [300, 100, 300, 100, 280, 120, 310, 90]
    prefs = [1.0 if m > b else 0.0 for m, b in zip(model, base)]
    out = lc.lc_winrate(prefs, model, base, penalty="l2", C=100.0, se_method="none")
    assert out["glm_phi"] > 0
    assert out["lc_winrate"] == pytest.approx(50.0, abs=1.0)


def test_bootstrap_se_is_seeded_and_reasonable():
    rng = np.random.default_rng(0)
    prefs = rng.random(40)
    ml, bl = rng.integers(50, 500, 40), rng.integers(50, 500, 40)
    a = lc.lc_winrate(prefs, ml, bl, bootstrap=50, seed=1)
    b = lc.lc_winrate(prefs, ml, bl, bootstrap=50, seed=1)
    c = lc.lc_winrate(prefs, ml, bl, bootstrap=50, seed=2)
    assert a["lc_winrate_se"] == b["lc_winrate_se"] != c["lc_winrate_se"]
    assert 0 < a["lc_winrate_se"] < 20


def test_edge_cases():
    out = lc.lc_winrate([], [], [])
    assert out["n"] == 0 and math.isnan(out["winrate"])
    one = lc.lc_winrate([1.0], [10], [5], penalty="l2")
    assert one["winrate"] == 100 and one["winrate_se"] == 0 and one["lc_winrate_se"] == 0.0
    all_wins = lc.lc_winrate([1.0] * 20, list(range(20)), [5] * 20, penalty="l2", se_method="none")
    assert 90 < all_wins["lc_winrate"] <= 100  # finite thanks to the penalty
    with pytest.raises(ValueError):
        lc.fit_glm([1.5], [0])
    with pytest.raises(ValueError):
        lc.lc_winrate([1.0], [1], [1], penalty="l3")
