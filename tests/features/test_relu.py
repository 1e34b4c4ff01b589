"""ReLU random features (rfbench/features/relu.py) for the arc-cosine kernel of order 1.

References here are written out independently of rfbench: k_1 and k_2 from Cho & Saul (NeurIPS
2009, Eq. 6) in numpy, and one-sample estimates sqrt(2) relu(w.x) * sqrt(2) relu(w.y) sampled
with numpy. Statistical checks use fixed seeds and tolerances of Z standard errors (Z = 4, two-
sided normal tail 6e-5 per check), each with an asserted resolution so a 2x error cannot pass.
It is also the worked example of "a new (non-exponential) feature map is one file plus one
registry line".
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch

import rfbench as rb
from rfbench import registry, theory
from rfbench.features.relu import ReLU
from rfbench.weights.base import WeightMatrix, normal

F64 = torch.float64
Z = 4.0


def _k(n: int, x: np.ndarray, y: np.ndarray) -> float:
    """Cho & Saul's arc-cosine kernel k_n(x, y) = (1/pi) |x|^n |y|^n J_n(t), n in {1, 2}."""
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    t = math.acos(max(-1.0, min(1.0, float(x @ y) / (nx * ny))))
    J = {
        1: math.sin(t) + (math.pi - t) * math.cos(t),
        2: 3 * math.sin(t) * math.cos(t) + (math.pi - t) * (1 + 2 * math.cos(t) ** 2),
    }[n]
    return (nx * ny) ** n * J / math.pi


def _pairs(d: int, seed: int):
    """Five pairs ``[5, d]``: generic, aligned, near-antipodal, orthogonal, different norms."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(5, d))
    y = g.normal(size=(5, d))
    y[1] = 0.9 * x[1] + 0.1 * y[1]
    y[2] = -0.9 * x[2] + 0.1 * y[2]
    y[3] = y[3] - (y[3] @ x[3]) / (x[3] @ x[3]) * x[3]
    y[4] *= 3.0
    return x, y


# =========================================================================== the closed forms
def test_closed_forms_match_independent_monte_carlo():
    """E[P] = k_1 and E[P^2] = 2 k_2 (so Var1 = theory.variance) for P = 2 relu(w.x) relu(w.y),
    400k numpy draws per pair, each within Z SE, and SE <= 5% of the value."""
    d, N = 4, 400_000
    x, y = _pairs(d, seed=1)
    w = np.random.default_rng(7).standard_normal((N, d))
    for i in range(5):
        P = 2 * np.maximum(w @ x[i], 0) * np.maximum(w @ y[i], 0)
        k1, k2 = _k(1, x[i], y[i]), _k(2, x[i], y[i])
        for stat, want in ((P, k1), (P**2, 2 * k2)):
            se = stat.std() / math.sqrt(N)
            assert se <= 0.05 * want, (i, se, want)
            assert abs(stat.mean() - want) <= Z * se, (i, stat.mean(), want)
        var = float(theory.variance("relu", torch.from_numpy(x[i]), torch.from_numpy(y[i])))
        assert var == pytest.approx(2 * k2 - k1**2, rel=1e-12)
        c = P - P.mean()
        se_var = math.sqrt(max((c**4).mean() - ((c**2).mean()) ** 2, 0.0) / N)
        assert se_var <= 0.05 * var and abs((c**2).mean() - var) <= Z * se_var, (i, (c**2).mean(), var)


def test_log_kernel_on_pair_tiles():
    """log k_1 for [..., tq, tk] tiles equals the numpy formula; k_1(x, x) = |x|^2; -inf (not NaN)
    for a zero vector and an exactly antipodal pair; float32 agrees with float64."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)
    k = torch.randn(2, 3, 6, 5, generator=g, dtype=F64)
    k[0, 0, 0] = 0.0
    k[0, 0, 1] = -2.0 * q[0, 0, 0]
    log_k = ReLU().target_kernel({}).log_kernel(q, k)
    assert tuple(log_k.shape) == (2, 3, 4, 6) and not bool(log_k.isnan().any())
    assert bool(torch.isneginf(log_k[0, 0, :, 0]).all()) and bool(torch.isneginf(log_k[0, 0, 0, 1]))
    for b, h, i, j in [(0, 0, 1, 2), (1, 2, 3, 5), (0, 1, 0, 1), (1, 0, 2, 4)]:
        want = _k(1, q[b, h, i].numpy(), k[b, h, j].numpy())
        assert float(log_k[b, h, i, j].exp()) == pytest.approx(want, rel=1e-12)
    self_k = ReLU().target_kernel({}).log_kernel(q[0, 0], q[0, 0]).diagonal().exp()
    torch.testing.assert_close(self_k, (q[0, 0] ** 2).sum(-1), rtol=1e-7, atol=0)
    log32 = ReLU().target_kernel({}).log_kernel(q.float(), k.float())
    finite = torch.isfinite(log_k)
    torch.testing.assert_close(log32[finite].double(), log_k[finite], rtol=0, atol=1e-4)


# =========================================================================== through the estimator
def test_relu_iid_estimator_declares_its_target_and_form():
    est = rb.make_estimator("relu-iid", dim=5, num_features=32, seed=0, dtype=F64)
    assert est.name == "relu-iid" and est.unbiased and est.feature_dim == 32
    assert est.target.startswith("arccos1") and "arc-cosine" in est.target
    assert est.target_kernel.name == est.target and not est.target_kernel.is_softmax
    assert est.target_kernel.log_kernel is not None
    assert est.feature_map.exp_form(est.draw_, {}, 5) is None and est.form({}) is None
    assert est.feature_map.positive and not est.feature_map.data_dependent
    x = torch.randn(7, 5, dtype=F64)
    log_mag, factor = est.feature_map.log_features(x, est.draw_, {}, True)
    wx = x @ est.draw_.W.T
    assert factor is None
    assert torch.equal(torch.isneginf(log_mag), wx <= 0)
    torch.testing.assert_close(log_mag.exp(), math.sqrt(2) * wx.clamp(min=0))
    # the Estimator applies 1/sqrt(m) per side
    torch.testing.assert_close(est.features(x), math.sqrt(2 / 32) * wx.clamp(min=0))


def test_unbiased_and_variance_matches_closed_form_over_seeds():
    """2000 seeds of relu-iid (m = 8): for each of 5 pairs, mean estimate = k_1 within Z SE, and
    the empirical MSE = theory.mse('relu', x, y, m) within Z SE of the mean of squared errors."""
    d, m, seeds = 6, 8, 2000
    assert Z * math.sqrt(2 / seeds) < 0.5
    x, y = (torch.from_numpy(a) for a in _pairs(d, seed=2))
    est = rb.make_estimator("relu-iid", dim=d, num_features=m, seed=0, dtype=F64)
    K = torch.stack([est.redraw(s).kernel(x[:, None], y[:, None])[:, 0, 0] for s in range(seeds)])
    exact = torch.tensor([_k(1, a.numpy(), b.numpy()) for a, b in zip(x, y)], dtype=F64)
    bias_z = (K.mean(0) - exact) / (K.std(0) / math.sqrt(seeds))
    assert float(bias_z.abs().max()) < Z, bias_z
    sq = (K - exact) ** 2
    want = theory.mse("relu", x, y, m)
    mse_z = (sq.mean(0) - want) / (sq.std(0) / math.sqrt(seeds))
    assert float(mse_z.abs().max()) < Z, (mse_z, sq.mean(0), want)


@pytest.mark.slow
def test_orthogonal_rows_stay_unbiased():
    """relu-orf (rows exactly N(0, I) marginally) is unbiased for k_1 too (600 seeds, m = 12)."""
    d, m, seeds = 6, 12, 600
    x, y = (torch.from_numpy(a) for a in _pairs(d, seed=3))
    est = rb.make_estimator("relu-orf", dim=d, num_features=m, seed=0, dtype=F64)
    K = torch.stack([est.redraw(s).kernel(x[:, None], y[:, None])[:, 0, 0] for s in range(seeds)])
    exact = torch.tensor([_k(1, a.numpy(), b.numpy()) for a, b in zip(x, y)], dtype=F64)
    z = (K.mean(0) - exact) / (K.std(0) / math.sqrt(seeds))
    assert float(z.abs().max()) < Z, z


@pytest.mark.parametrize("causal", [False, True])
def test_attention_normalises_by_its_own_kernel(causal):
    """est.attention is phi(q) phi(K)^T v / phi(q) phi(K)^T 1 at the scaled inputs (written out from
    est.features), and with many features it approaches the attention of the arc-cosine kernel."""
    d, L, dv = 8, 10, 3
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, L, n, generator=g, dtype=F64) for n in (d, d, dv))
    est = rb.make_estimator("relu-iid", dim=d, num_features=64, seed=1, dtype=F64)
    out = est.attention(q, k, v, causal=causal)
    s = d**-0.25
    A = est.features(q * s, is_query=True) @ est.features(k * s, is_query=False).transpose(-1, -2)
    if causal:
        A = A.tril()
    torch.testing.assert_close(out, (A @ v) / A.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)
    big = rb.make_estimator("relu-iid", dim=d, num_features=200_000, seed=1, dtype=F64)
    exact = est.target_kernel.log_kernel(q * s, k * s).exp()
    if causal:
        exact = exact.tril()
    ref = (exact @ v) / exact.sum(-1, keepdim=True)
    assert float((big.attention(q, k, v, causal=causal) - ref).abs().max()) < 0.05


def test_kernel_of_a_dead_row_is_zero_not_nan():
    """A query whose features are all 0 (here x = 0) gives a zero kernel row, and k_1 is 0 too."""
    est = rb.make_estimator("relu-iid", dim=4, num_features=16, seed=0, dtype=F64)
    q = torch.zeros(1, 4, dtype=F64)
    k = torch.randn(3, 4, dtype=F64)
    assert torch.equal(est.kernel(q, k), torch.zeros(1, 3, dtype=F64))
    assert bool(torch.isneginf(est.target_kernel.log_kernel(q, k)).all())


# =========================================================================== pairing and layout
class _Uniform(WeightMatrix):
    """A stub sampler whose rows are not Gaussian (for the pairing rule only)."""

    name = "uniformstub"
    gaussian_marginal = False
    unbiased = False
    description = "stub"
    reference = "none"

    def _sample(self, m, d, generator):
        return normal((m, d), generator).sign()


def test_pairs_with_gaussian_marginal_rows_only():
    assert ReLU.weights is None and ReLU.needs_gaussian_rows is True
    assert ReLU().supports(_Uniform())
    names = rb.estimators()
    for wm in registry.weight_matrices():
        gaussian = registry.weight_matrix_class(wm).gaussian_marginal
        assert (f"relu-{wm}" in names) == gaussian, wm
    assert {"relu-iid", "relu-orf", "relu-antithetic"} <= set(names)


def test_adding_it_took_one_file_and_one_registry_line():
    """Nothing in rfbench/ names the ReLU map but its own module and its registry line."""
    root = pathlib.Path(rb.__file__).parent
    hits = sorted(
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if "relu:ReLU" in p.read_text() or "features.relu" in p.read_text()
    )
    assert hits == ["registry.py"], hits
    assert len([ln for ln in (root / "registry.py").read_text().splitlines() if '"relu"' in ln]) == 1
    assert "relu" in theory.closed_forms()  # found in the family module, no line in theory.py
