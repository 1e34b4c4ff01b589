"""LARA-style multiple-importance-sampling positive features (rfbench/features/lara.py; Zheng et al.,
ICML 2022; balance heuristic of Veach & Guibas 1995). Fixed seeds, Z = 4 standard errors, each with
an asserted resolution."""

from __future__ import annotations

import math

import pytest
import torch

import rfbench as rb
from rfbench.errors import EstimatorError, UnsupportedError
from rfbench.features.lara import mis_log_weights

F64 = torch.float64
Z = 4.0


def _data(d=6, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = 0.5 * torch.randn(L, d, generator=g, dtype=F64) + 0.4
    k = 0.5 * torch.randn(L, d, generator=g, dtype=F64) + 0.4
    return q, k


def _estimates(name, q, k, x, y, seeds, m=16, **kw):
    est = rb.make_estimator(name, dim=q.shape[-1], num_features=m, seed=0, dtype=F64, **kw).fit(q, k)
    return torch.stack([est.redraw(s).kernel(x[:, None], y[:, None])[:, 0, 0] for s in range(seeds)])


@pytest.mark.parametrize("weights", ["iid", "orf"])
def test_unbiased_for_fitted_proposals(weights):
    """2000 seeds (m = 16, C = 4): mean estimate = exp(x.y) within Z SE at 4 data pairs (SE <= 10%)."""
    q, k = _data()
    x, y = q[:4], k[:4]
    K = _estimates(f"lara-{weights}", q, k, x, y, 2000)
    exact = torch.exp((x * y).sum(-1))
    se = K.std(0) / math.sqrt(K.shape[0])
    assert float((se / exact).max()) < 0.1
    z = (K.mean(0) - exact) / se
    assert float(z.abs().max()) < Z, z


def test_one_proposal_at_zero_is_posrf():
    q, k = _data()
    lara = rb.make_estimator("lara-orf", dim=6, num_features=12, seed=3, dtype=F64, proposals=1)
    lara.params_ = {"mu": torch.zeros(1, 6, dtype=F64)}
    lara.fit_scale_ = 1.0
    posrf = rb.make_estimator("posrf-orf", dim=6, num_features=12, seed=3, dtype=F64)
    torch.testing.assert_close(lara.kernel(q, k), posrf.kernel(q, k), rtol=1e-12, atol=0)


def test_mis_weights_are_the_balance_heuristic():
    """log w = log N(omega) - log sum_c (n_c/m) N(omega; mu_c, I), written out for two proposals."""
    g = torch.Generator().manual_seed(1)
    omega, mu = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    counts = torch.tensor([3.0, 2.0], dtype=F64)
    dens = lambda w, c: torch.exp(-0.5 * ((w - c) ** 2).sum(-1))  # noqa: E731 (shared constant cancels)
    want = torch.log(dens(omega, 0) / (0.6 * dens(omega, mu[0]) + 0.4 * dens(omega, mu[1])))
    torch.testing.assert_close(mis_log_weights(omega, mu, counts), want, rtol=1e-12, atol=1e-12)


def test_lower_relative_variance_than_posrf_on_its_data():
    """Averaged over 16 (query, key) pairs of the fitted data, the relative variance of lara-iid is
    below half of posrf-iid's at equal m (800 seeds): data-centred proposals pay off."""
    q, k = _data(seed=2)
    x, y = q[:16], k[:16]
    exact = torch.exp((x * y).sum(-1))
    rel = {
        n: float((_estimates(n, q, k, x, y, 800).var(0) / exact**2).mean()) for n in ("lara-iid", "posrf-iid")
    }
    assert rel["lara-iid"] < 0.5 * rel["posrf-iid"], rel


def test_causal_needs_a_fit_and_parameters_are_checked():
    q, k = _data()
    est = rb.make_estimator("lara-iid", dim=6, num_features=8, dtype=F64)
    with pytest.raises(UnsupportedError, match="fit"):
        est.attention(q, k, torch.randn(20, 2, dtype=F64), causal=True)
    out = est.fit(q, k, scale=6**-0.5).attention(q, k, torch.randn(20, 2, dtype=F64), causal=True)
    assert out.shape == (20, 2)
    with pytest.raises(EstimatorError, match="proposals"):
        rb.make_estimator("lara-iid", dim=6, num_features=8, proposals=0)
