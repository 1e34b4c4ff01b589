"""The antithetic weight matrix (rfbench/weights/antithetic.py): structure, marginal law, and the
PosRF estimate it gives (unbiased, equal to hyprf-iid at m/2, MSE = hyprf's closed form).

It is also the worked example of "a new weight matrix is one file plus one registry line":
nothing else in rfbench names it. Statistical checks: fixed seeds, tolerances of Z standard
errors (Z = 4.5, two-sided tail 7e-6 per check), the SE taken across independent seeds.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from scipy import stats

import rfbench as rb
from rfbench import registry, theory
from rfbench.errors import UnsupportedError
from rfbench.weights.antithetic import Antithetic

F64 = torch.float64
Z = 4.5


def _draw(m: int, d: int, seed: int) -> torch.Tensor:
    return Antithetic().sample(m, d, generator=torch.Generator().manual_seed(seed), dtype=F64).W


def test_declared_capabilities():
    cls = registry.weight_matrix_class("antithetic")
    assert cls is Antithetic
    assert cls.gaussian_marginal is True and cls.unbiased is True
    assert cls.independent_rows is False and cls.learnable is False


@pytest.mark.parametrize("m", [1, 3, 7, 129])
def test_odd_m_is_refused_with_the_fix(m):
    reasons = Antithetic().supports(m, 4)
    assert len(reasons) == 1 and "even" in reasons[0] and f"num_features={m + 1}" in reasons[0]
    with pytest.raises(UnsupportedError, match="even m"):
        Antithetic().sample(m, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedError, match="even m"):
        rb.make_estimator("posrf-antithetic", dim=4, num_features=m)


@pytest.mark.parametrize("m,d", [(2, 1), (8, 3), (64, 16), (130, 64)])
def test_rows_are_pairwise_negatives_of_iid_rows(m, d):
    W = _draw(m, d, seed=5)
    assert tuple(W.shape) == (m, d)
    assert torch.equal(W[m // 2:], -W[: m // 2])
    # The first half is exactly the iid draw of m/2 rows from the same generator.
    gen = torch.Generator().manual_seed(5)
    iid = registry.get_weight_matrix("iid").sample(m // 2, d, generator=gen, dtype=F64)
    assert torch.equal(W[: m // 2], iid.W)


def test_marginal_is_standard_normal():
    """Rows of the negated half over 4000 seeds (independent across seeds and within the half):
    coordinate means 0 and variances 1 within Z SE, off-diagonal covariance 0, and |w|^2 ~ chi2_d
    (Kolmogorov-Smirnov, p > 1e-4)."""
    m, d, seeds = 8, 5, 4000
    rows = torch.cat([_draw(m, d, s)[m // 2:] for s in range(seeds)])  # [seeds * m/2, d]
    n = rows.shape[0]
    mean_z = rows.mean(0) / (rows.std(0) / math.sqrt(n))
    assert float(mean_z.abs().max()) < Z, mean_z
    sq = rows**2
    var_z = (sq.mean(0) - 1) / (sq.std(0) / math.sqrt(n))
    assert float(var_z.abs().max()) < Z, var_z
    cross = rows[:, 0] * rows[:, 1:].T  # [d-1, n]
    cross_z = cross.mean(1) / (cross.std(1) / math.sqrt(n))
    assert float(cross_z.abs().max()) < Z, cross_z
    ks = stats.kstest(sq.sum(1).numpy(), stats.chi2(d).cdf)
    assert ks.pvalue > 1e-4, ks


def _pairs(d: int, L: int, norm: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, d, generator=g, dtype=F64)
    k = torch.randn(L, d, generator=g, dtype=F64)
    return norm * q / q.norm(dim=1, keepdim=True), norm * k / k.norm(dim=1, keepdim=True)


def test_posrf_antithetic_is_hyprf_iid_at_half_the_rows():
    """Performer Lemma 1: PosRF averaged over (omega, -omega) is SM^hyp+; same seed, same numbers."""
    d, m = 8, 16
    q, k = _pairs(d, 6, 1.0)
    a = rb.make_estimator("posrf-antithetic", dim=d, num_features=m, seed=3, dtype=F64)
    h = rb.make_estimator("hyprf-iid", dim=d, num_features=m // 2, seed=3, dtype=F64)
    torch.testing.assert_close(a.kernel(q, k), h.kernel(q, k), rtol=1e-12, atol=0)


def test_posrf_antithetic_is_unbiased_and_has_hyprf_mse():
    """Over 3000 seeds, for each of 4 x 4 pairs: mean estimate = exp(q . k) within Z SE (bias), and
    the empirical MSE = theory.mse('hyprf', q, k, m / 2) within Z SE of the mean of squared errors
    (variance); Z sqrt(2 / N) < 1/2, so an MSE off by 2x cannot pass."""
    d, m, seeds = 6, 8, 3000
    assert Z * math.sqrt(2 / seeds) < 0.5
    q, k = _pairs(d, 4, 0.7, seed=1)
    est = rb.make_estimator("posrf-antithetic", dim=d, num_features=m, seed=0, dtype=F64)
    K = torch.stack([est.redraw(s).kernel(q, k) for s in range(seeds)])  # [N, 4, 4]
    exact = torch.exp(q @ k.T)
    bias_z = (K.mean(0) - exact) / (K.std(0) / math.sqrt(seeds))
    assert float(bias_z.abs().max()) < Z, bias_z
    sq = (K - exact) ** 2
    want = theory.mse("hyprf", q[:, None, :], k[None, :, :], m // 2)
    mse_z = (sq.mean(0) - want) / (sq.std(0) / math.sqrt(seeds))
    assert float(mse_z.abs().max()) < Z, mse_z
    # and it beats iid rows at equal m (Performer: hyp+ is better than + with twice the features)
    assert bool((want < theory.mse("posrf", q[:, None, :], k[None, :, :], m)).all())


def test_pairs_with_gaussian_maps_only():
    names = rb.estimators()
    for fm in ("posrf", "hyprf", "trigrf", "gerf", "oprf", "relu"):
        if fm in registry.FEATURE_MAPS:
            assert f"{fm}-antithetic" in names
    assert "poisrf-antithetic" not in names and "geomrf-antithetic" not in names


def test_adding_it_took_one_file_and_one_registry_line():
    """Nothing in rfbench/ names the antithetic sampler but its own module and its registry line."""
    root = pathlib.Path(rb.__file__).parent
    hits = sorted(
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if "antithetic:Antithetic" in p.read_text() or "weights.antithetic" in p.read_text()
    )
    assert hits == ["registry.py"], hits
    registry_lines = [ln for ln in (root / "registry.py").read_text().splitlines() if "antithetic" in ln]
    assert len(registry_lines) == 1, registry_lines
