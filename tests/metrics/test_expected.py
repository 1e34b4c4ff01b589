"""rfbench.metrics.expected: the closed-form E[kernel_rel_mse] against the seeds' Monte Carlo mean,
against a dense sum of rfbench.theory.mse, and where it must be NaN or inf.

The oracle for the Monte Carlo test is the mean of ``kernel_errors``' per-seed kernel_rel_mse over
400 i.i.d. draws: E[sum_ij (K^ - K)^2] / sum_ij K^2 = sum_ij Var1 / (m sum_ij K^2) for PosRF
(Choromanski et al., ICLR 2021, Lemma 2; docs/theory.md §1.2), checked within 4 standard errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rfbench as rb
from rfbench import metrics as M

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(H=2, L=6, d=8, norm=0.4, seed=0):
    """q, k ``[H, L, d]`` with rows of norm about ``norm`` (at scale 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, L, d, generator=g, dtype=F64) * norm / math.sqrt(d)
    k = torch.randn(H, L, d, generator=g, dtype=F64) * norm / math.sqrt(d)
    return q, k


def _spread(H=2, L=6, d=8, lo=0.2, hi=0.8, seed=0):
    """q, k ``[H, L, d]`` with row norms about ``lo`` .. ``hi`` (keys in the reverse order): pairs
    weigh unequally in sum K^2, so a mean of per-pair ratios would differ from the ratio of sums."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.linspace(lo, hi, L, dtype=F64)[:, None] / math.sqrt(d)
    q = torch.randn(H, L, d, generator=g, dtype=F64) * norms
    k = torch.randn(H, L, d, generator=g, dtype=F64) * norms.flip(0)
    return q, k


@pytest.mark.parametrize("name", ["posrf-iid", "trigrf-iid"])
def test_expectation_matches_the_mean_over_seeds(name):
    """400 seeds, d = 8, m = 16, L = 6, row norms 0.2 .. 0.8 (finite, light-tailed variance): the
    seeds' mean kernel_rel_mse is within 4 standard errors of the closed form (5 of 6 rows scored).
    For trigrf the mean of per-pair ratios Var1 / (m K^2) lies 7 standard errors away."""
    d, m, S = 8, 16, 400
    q, k = _spread(d=d)
    rows = torch.tensor([0, 1, 3, 4, 5])
    ests = [rb.make_estimator(name, d, m, seed=s, dtype=F64) for s in range(S)]
    ke = M.kernel_errors(ests, q, k, rows=rows, attention_matrix=False, backend="torch")
    x = torch.tensor(ke.kernel_rel_mse, dtype=F64)
    expected = M.expected_kernel_rel_mse(ests[0], q, k, rows=rows)
    se = float(x.std() / math.sqrt(S))
    assert 0 < expected < 1
    assert abs(float(x.mean()) - expected) < 4 * se, (float(x.mean()), expected, se)


def test_expectation_is_the_dense_sum_of_theory_mse_at_the_attention_scale():
    """Tiled over rows and heads (tile 4 of 9 rows), with a scale: sum mse / sum K^2 computed whole."""
    d, m, scale = 8, 32, 8**-0.5
    q, k = _data(H=3, L=11, d=d, norm=2.0, seed=1)
    rows = torch.tensor([0, 2, 3, 4, 5, 7, 8, 9, 10])
    for name in ("posrf-iid", "hyprf-iid", "gerf-iid"):
        est = rb.make_estimator(name, d, m, seed=0)
        x, y = (t[:, rows] * scale**0.5 for t in (q, k))
        mse = rb.theory.mse(est.feature_map, x.unsqueeze(-2), y.unsqueeze(-3), m)
        dense = float(mse.sum() / torch.exp(2 * x @ y.transpose(-1, -2)).sum())
        got = M.expected_kernel_rel_mse(est, q, k, scale=scale, rows=rows, tile=4)
        assert got == pytest.approx(dense, rel=1e-12), name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("posrf-orf", "couples its rows"),
        ("hyprf-orf", "couples its rows"),
        ("posrf-gq", "exact N(0, I)"),
        ("oprf-iid", "fitted to the data"),
        ("darkis-iid", "fitted to the data"),
        ("relu-iid", "does not estimate the softmax kernel"),
        ("hybrid-iid", "no closed-form variance"),
    ],
)
def test_no_closed_form_gives_nan_and_says_why(name, why):
    q, k = _data()
    est = rb.make_estimator(name, 8, 16, seed=0, dtype=F64)
    if est.feature_map.data_dependent:
        est.fit(q, k)
    assert any(why in r for r in M.theory_reasons(est)), M.theory_reasons(est)
    assert math.isnan(M.expected_kernel_rel_mse(est, q, k))


@pytest.mark.parametrize("norm", [30.0, 300.0, 3000.0])
@pytest.mark.parametrize("name", ["posrf-iid", "trigrf-iid", "hyprf-iid"])
def test_large_norms_give_a_number_or_inf_without_warnings(name, norm):
    """|x + y|^2 far beyond float64's exp range, and e^(2x.y) under- and overflowing: the value is
    inf or a finite number above the small-norm one, never NaN, and nothing warns or raises."""
    q, k = _data(L=8, norm=norm)
    est = rb.make_estimator(name, 8, 16, seed=0, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = M.expected_kernel_rel_mse(est, q, k)
    assert value == math.inf or (math.isfinite(value) and value > 1e3), value


def test_a_variance_beyond_float64_is_inf():
    """x = y and x = -y with |x|^2 = 400: posrf's Var1 = e^(2x.y) expm1(|x+y|^2) is e^800 e^1600 at
    x = y against sum K^2 ~ 2 e^800 (both beyond float64): the expectation ~ e^1600 / m is inf."""
    x = torch.zeros(1, 2, 4, dtype=F64)
    x[0, 0, 0], x[0, 1, 0] = 20.0, -20.0
    est = rb.make_estimator("posrf-iid", 4, 8, seed=0, dtype=F64)
    assert M.expected_kernel_rel_mse(est, x, x) == math.inf


def test_a_pair_float64_cannot_evaluate_counts_as_infinite():
    """The convention, not the true value: trigrf at x = y, |x|^2 = 400, gives e^800 (inf) times
    sinh^2(0) = 0, NaN in float64; it counts as infinite (true E = 0 here). Such pairs need an
    exponent beyond ~700, which the quick suite's data never reaches."""
    x = torch.zeros(1, 1, 4, dtype=F64)
    x[0, 0, 0] = 20.0
    est = rb.make_estimator("trigrf-iid", 4, 8, seed=0, dtype=F64)
    assert M.expected_kernel_rel_mse(est, x, x) == math.inf
