"""Random Maclaurin features (rfbench/features/maclaurin.py; Kar & Karnick, AISTATS 2012, Alg. 1).

The reference estimate is written out with numpy: a degree N ~ 2^-(n+1) (renormalised on 0..cap)
and N Rademacher vectors per draw. Statistical checks use fixed seeds and Z = 4 standard errors
(two-sided normal tail 6e-5 per check), each with an asserted resolution so a 2x error cannot pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rfbench as rb
from rfbench import theory
from rfbench.features.maclaurin import RandomMaclaurin, draw_degrees

F64 = torch.float64
Z = 4.0


def _pairs(d: int, seed: int):
    """Four pairs ``[4, d]``: generic, aligned, anti-aligned, larger norm (|x.y| up to ~2)."""
    g = np.random.default_rng(seed)
    x, y = 0.5 * g.normal(size=(4, d)), 0.5 * g.normal(size=(4, d))
    y[1] = x[1] + 0.1 * y[1]
    y[2] = -x[2] + 0.1 * y[2]
    x[3] *= 2.0
    return x, y


def test_closed_form_matches_independent_numpy_monte_carlo():
    """E[Z(x)Z(y)] = exp(x.y) and Var1 = theory.variance('maclaurin'), 400k numpy draws, Z SE."""
    d, N, cap = 5, 400_000, 40
    x, y = _pairs(d, seed=1)
    g = np.random.default_rng(3)
    zc = 1 - 2.0 ** -(cap + 1)
    n = np.minimum(np.floor(-np.log2(1 - g.random(N) * zc)).astype(int), cap)  # P(n) = 2^-(n+1)/zc
    w = g.choice([-1.0, 1.0], size=(N, int(n.max()), d))
    live = np.arange(w.shape[1])[None, :] < n[:, None]
    coef = np.array([2.0 ** (k + 1) * zc / math.factorial(k) for k in range(cap + 1)])[n]
    for i in range(4):
        px = np.where(live, w @ x[i], 1.0).prod(1)
        py = np.where(live, w @ y[i], 1.0).prod(1)
        P = coef * px * py
        want = math.exp(x[i] @ y[i])
        se = P.std() / math.sqrt(N)
        assert se <= 0.05 * want and abs(P.mean() - want) <= Z * se, (i, P.mean(), want, se)
        var = float(theory.variance("maclaurin", torch.from_numpy(x[i]), torch.from_numpy(y[i])))
        c = P - P.mean()
        se_var = math.sqrt(max((c**4).mean() - ((c**2).mean()) ** 2, 0.0) / N)
        assert se_var <= 0.25 * var and abs((c**2).mean() - var) <= Z * se_var, (i, (c**2).mean(), var)


def test_degrees_follow_the_truncated_geometric_law():
    """P(N = n) = 2^-(n+1) / Z_cap on 0..cap: chi-square-free check of the first masses within Z SE."""
    N, cap = 200_000, 3
    deg = draw_degrees(N, cap, torch.Generator().manual_seed(0)).numpy()
    zc = 1 - 2.0 ** -(cap + 1)
    assert deg.min() == 0 and deg.max() == cap
    for n in range(cap + 1):
        p = 2.0 ** -(n + 1) / zc
        assert abs((deg == n).mean() - p) <= Z * math.sqrt(p * (1 - p) / N), n


def test_unbiased_and_mse_match_closed_form_over_seeds():
    """3000 seeds of maclaurin-iid (m = 64): bias z < Z per pair, and the MSE within Z SE of theory.mse."""
    d, m, seeds = 6, 64, 3000
    x, y = (torch.from_numpy(a) for a in _pairs(d, seed=2))
    est = rb.make_estimator("maclaurin-iid", dim=d, num_features=m, seed=0, dtype=F64)
    K = torch.stack([est.redraw(s).kernel(x[:, None], y[:, None])[:, 0, 0] for s in range(seeds)])
    exact = torch.exp((x * y).sum(-1))
    assert float((K.std(0) / math.sqrt(seeds) / exact).max()) < 0.1  # resolution: a 40% bias is >= Z SE
    z = (K.mean(0) - exact) / (K.std(0) / math.sqrt(seeds))
    assert float(z.abs().max()) < Z, z
    sq = (K - exact) ** 2
    mse_z = (sq.mean(0) - theory.mse("maclaurin", x, y, m)) / (sq.std(0) / math.sqrt(seeds))
    assert float(mse_z.abs().max()) < Z, mse_z


def test_features_are_the_product_of_projections():
    """est.features is sqrt(2^(N+1) Z_cap / N! / m) prod_j (w_j . x), from the stored draw."""
    est = rb.make_estimator("maclaurin-iid", dim=4, num_features=8, seed=5, dtype=F64)
    W = est.draw_.W
    assert W.shape[1:] == (8, 4) and set(W.unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = torch.randn(3, 4, dtype=F64)
    n = est.feature_map.degrees(est.draw_)
    zc = 1 - 2.0**-41
    prod = torch.ones(3, 8, dtype=F64)
    for j in range(W.shape[0]):
        prod = prod * torch.where(j < n, x @ W[j].T, torch.ones(1, dtype=F64))
    coef = torch.tensor([2.0 ** (k + 1) * zc / math.factorial(k) / 8 for k in n.tolist()], dtype=F64)
    torch.testing.assert_close(est.features(x), coef.sqrt() * prod, rtol=1e-12, atol=1e-14)


def test_pairs_with_iid_only_and_validates_its_parameter():
    names = rb.estimators()
    assert "maclaurin-iid" in names and "maclaurin-orf" not in names
    assert "maclaurin" in theory.closed_forms()
    with pytest.raises(rb.errors.EstimatorError, match="max_degree"):
        RandomMaclaurin(max_degree=0)
