"""Closed-form variances (rfbench.theory) against direct Monte Carlo of the one-sample estimators.

The one-sample estimators P(omega) are written out here from the papers' formulas, independently
of rfbench.features, and sampled with numpy (fixed seeds). With N draws, the sample variance s^2
has standard error SE = sqrt((m4 - s^4) / N), m4 the sample fourth central moment; each check
asserts |s^2 - Var1| <= Z * SE, and also that SE <= 5% of Var1, so that a formula off by 20%
could not pass. Inputs have small norms and |A| small, so P has finite eighth moments and the
SE estimate itself is reliable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln

import rfbench as rb
from rfbench import theory
from rfbench.errors import DataError, EstimatorError, RFBenchError
from rfbench.features.derf import SADERF, SDERF
from rfbench.features.discrete import geom_p_star

N = 400_000  # draws per Monte-Carlo check
Z = 4.0  # tolerance in standard errors (two-sided normal tail 6e-5 per check)
MAX_REL_SE = 0.05  # the check must resolve Var1 to 5% (1 SE), else it proves nothing


def _pair(seed: int, d: int, scale: float, anti: float = 0.0):
    """A reproducible pair (x, y) in R^d with norms ~ scale; ``anti`` pulls y towards -x."""
    g = np.random.default_rng(seed)
    x = g.normal(size=d) * scale / math.sqrt(d)
    y = g.normal(size=d) * scale / math.sqrt(d)
    y = (1 - anti) * y - anti * x
    return x, y


PAIRS = [
    _pair(1, 2, 0.6),
    _pair(2, 4, 0.8),
    _pair(3, 8, 0.7, anti=0.6),  # x ~ -y: SM small, TrigRF's bad regime
]


def _assert_var_matches(samples: np.ndarray, var_theory: float, what: str) -> None:
    c = samples - samples.mean()
    s2 = float((c**2).mean())
    m4 = float((c**4).mean())
    se = math.sqrt(max(m4 - s2**2, 0.0) / samples.size)
    assert se <= MAX_REL_SE * var_theory, f"{what}: MC too coarse (SE {se:.3g} vs Var1 {var_theory:.3g})"
    assert abs(s2 - var_theory) <= Z * se, (
        f"{what}: MC variance {s2:.6g} vs closed form {var_theory:.6g} ({(s2 - var_theory) / se:+.2f} SE)"
    )


def _omega(seed: int, d: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((N, d))


def _gerf_sample(w, x, y, A):
    d = x.size
    return (1 - 4 * A) ** (d / 2) * np.exp(
        2 * A * (w * w).sum(1) + math.sqrt(1 - 4 * A) * w @ (x + y) - (x @ x + y @ y) / 2
    )


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)


# --------------------------------------------------------------------------- Gaussian-omega maps
@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_trig_pos_hyp_match_monte_carlo(i):
    x, y = PAIRS[i]
    w = _omega(i, x.size)
    half = (x @ x + y @ y) / 2
    samples = {
        "trigrf": np.exp(half) * np.cos(w @ (x - y)),
        "posrf": np.exp(w @ (x + y) - half),
        "hyprf": np.exp(-half) * np.cosh(w @ (x + y)),
    }
    for name, s in samples.items():
        assert abs(s.mean() / math.exp(x @ y) - 1) < 0.05  # the sampler itself is right
        _assert_var_matches(s, float(theory.variance(name, _t(x), _t(y))), f"{name} pair {i}")


@pytest.mark.parametrize("A", [-0.3, -0.0625, 0.02])
@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_gerf_matches_monte_carlo(i, A):
    x, y = PAIRS[i]
    s = _gerf_sample(_omega(i, x.size), x, y, A)
    _assert_var_matches(s, float(theory.variance("gerf", _t(x), _t(y), A=A)), f"gerf A={A} pair {i}")


@pytest.mark.parametrize("A", [-0.3, -0.0625, 0.0, 0.02])
@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_gerftrig_matches_monte_carlo(i, A):
    """The s = -1 real-A variance derived in rfbench.features.gerf.GERFTrig."""
    x, y = PAIRS[i]
    w = _omega(i, x.size)
    d = x.size
    s = (1 - 4 * A) ** (d / 2) * np.exp(2 * A * (w * w).sum(1) + (x @ x + y @ y) / 2) * np.cos(
        math.sqrt(1 - 4 * A) * w @ (x - y)
    )
    assert abs(s.mean() / math.exp(x @ y) - 1) < 0.05
    _assert_var_matches(s, float(theory.variance("gerftrig", _t(x), _t(y), A=A)), f"gerftrig A={A} pair {i}")


def test_gerftrig_at_zero_is_trigrf():
    x, y = (_t(a) for a in PAIRS[2])
    v_trig = theory.variance("trigrf", x, y)
    assert torch.allclose(theory.variance("gerftrig", x, y, A=0.0), v_trig, rtol=1e-12)


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_oprf_matches_monte_carlo_at_its_fitted_A(i):
    x, y = PAIRS[i]
    A = theory.oprf_A_star(float((x + y) @ (x + y)), x.size)
    s = _gerf_sample(_omega(i, x.size), x, y, A)
    _assert_var_matches(s, float(theory.variance("oprf", _t(x), _t(y))), f"oprf pair {i}")


def _anisotropic(seed: int, L: int, d: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    stretch = torch.linspace(0.2, 1.5, d, dtype=torch.float64)
    q = torch.randn(L, d, generator=g, dtype=torch.float64) * stretch * scale
    k = torch.randn(L, d, generator=g, dtype=torch.float64) / stretch * scale + 0.1
    return q, k


def test_saderf_matches_monte_carlo_with_data_fitted_psi():
    q, k = _anisotropic(5, 32, 4, 0.35)
    p = SADERF().fit_params(q, k)
    psi, A = p["psi"][0], p["A"][0, 0]
    x, y = q[0], k[1]
    xs, ys = (x * psi).numpy(), (y / psi).numpy()
    s = _gerf_sample(_omega(7, 4), xs, ys, float(A))
    var = float(theory.variance("saderf", x, y, psi=psi, A=A))
    _assert_var_matches(s, var, "saderf")


def test_sderf_matches_monte_carlo_with_data_fitted_Q_and_a():
    """The symmetric DERF (derived in rfbench.features.derf.SDERF), fitted to 32 tokens."""
    d = 4
    q, k = _anisotropic(6, 32, d, 0.35)
    p = SDERF().fit_params(q, k)
    Q, a = p["Q"].numpy(), p["a"][0].numpy()
    assert np.allclose(Q.T @ Q, np.eye(d)) and (a <= 0).all()
    x, y = q[2].numpy(), k[3].numpy()
    w = _omega(8, d)
    t = (x + y) @ Q
    s = np.prod(np.sqrt(1 - 4 * a)) * np.exp(
        2 * (w * w) @ a + w @ (np.sqrt(1 - 4 * a) * t) - (x @ x + y @ y) / 2
    )
    assert abs(s.mean() / math.exp(x @ y) - 1) < 0.05
    var = float(theory.variance("sderf", _t(x), _t(y), Q=p["Q"], a=p["a"][0]))
    _assert_var_matches(s, var, "sderf")


def test_dark_matches_monte_carlo():
    d = 3
    g = np.random.default_rng(9)
    M = np.eye(d) + 0.3 * g.normal(size=(d, d))
    x, y = _pair(9, d, 0.6)
    xt, yt = M @ x, M @ y
    s = np.exp(_omega(9, d) @ (xt + yt) - (xt @ xt + yt @ yt) / 2)
    assert abs(s.mean() / math.exp(x @ M.T @ M @ y) - 1) < 0.05
    _assert_var_matches(s, float(theory.variance("dark", _t(x), _t(y), M=M)), "dark")
    sigma = M.T @ M
    assert torch.allclose(
        theory.variance("dark", _t(x), _t(y), sigma=sigma), theory.variance("dark", _t(x), _t(y), M=M)
    )


# --------------------------------------------------------------------------- discrete omegas
@pytest.mark.parametrize("lam", [None, 0.3])
@pytest.mark.parametrize("i", range(2))
def test_poisrf_matches_monte_carlo(i, lam):
    x, y = PAIRS[i]
    lam_v = np.abs(x * y) if lam is None else np.full(x.size, lam)  # None: fitted to the pair
    w = np.random.default_rng(20 + i).poisson(lam_v, size=(N, x.size))
    s = np.exp(lam_v.sum() + (w * np.log(np.abs(x * y) / lam_v)).sum(1)) * np.prod(np.sign(x * y) ** w, 1)
    assert abs(s.mean() / math.exp(x @ y) - 1) < 0.05
    var = float(theory.variance("poisrf", _t(x), _t(y), lam=lam))
    _assert_var_matches(s, var, f"poisrf lam={lam} pair {i}")


@pytest.mark.parametrize("p", [None, 0.6])
@pytest.mark.parametrize("i", range(2))
def test_geomrf_matches_monte_carlo(i, p):
    x, y = PAIRS[i]
    p_v = geom_p_star(_t(np.abs(x * y))).numpy() if p is None else np.full(x.size, p)
    w = np.random.default_rng(30 + i).geometric(p_v, size=(N, x.size)) - 1  # numpy counts trials
    xy = x * y
    log_s = w * np.log(np.abs(xy)) - gammaln(w + 1) - np.log(p_v) - w * np.log1p(-p_v)
    s = np.exp(log_s.sum(1)) * np.prod(np.sign(xy) ** w, 1)
    assert abs(s.mean() / math.exp(x @ y) - 1) < 0.05
    kw = {} if p is None else {"p": p}
    _assert_var_matches(s, float(theory.variance("geomrf", _t(x), _t(y), **kw)), f"geomrf p={p} pair {i}")


# --------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("d", [1, 4, 16, 64])
def test_oprf_A_star_minimises_gerf_variance(d):
    grid = torch.linspace(-3.0, 0.124, 31241, dtype=torch.float64)  # step 1e-4
    g = torch.Generator().manual_seed(d)
    for scale in (0.1, 0.5, 1.0, 2.0):
        x = torch.randn(d, generator=g, dtype=torch.float64) * scale / math.sqrt(d) ** 0.5
        y = torch.randn(d, generator=g, dtype=torch.float64) * scale / math.sqrt(d) ** 0.5
        phi = float((x + y) @ (x + y))
        A_star = theory.oprf_A_star(phi, d)
        rho = phi / d
        naive = (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16  # the paper's form
        assert A_star == pytest.approx(naive, abs=1e-12)
        v_grid = theory.variance("oprf", x, y, A=grid)  # the GERF variance at each A of the grid
        v_star = theory.variance("oprf", x, y)
        assert torch.allclose(v_star, theory.variance("gerf", x, y, A=A_star))
        assert float(v_star) <= float(v_grid.min()) * (1 + 1e-9)
        # the grid minimum sits next to A* (within one grid step)
        assert abs(float(grid[v_grid.argmin()]) - A_star) <= 1e-4 + 1e-12


def test_oprf_A_star_accepts_tensors_and_is_zero_at_zero():
    phi = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64)
    A = theory.oprf_A_star(phi, 4)
    assert A[0] == 0 and bool((A[1:] < 0).all())
    # large rho: A* ~ -rho/4 - 1/8 (derived from the closed form)
    assert float(A[2]) == pytest.approx(-25 / 4 - 1 / 8, rel=1e-2)


def test_fitted_dirf_parameters_minimise_the_pair_variance():
    x, y = (_t(a) for a in PAIRS[1])
    v_fit = theory.variance("poisrf", x, y)
    v_geo = theory.variance("geomrf", x, y)
    for f in (0.5, 0.8, 1.25, 2.0):
        assert float(v_fit) < float(theory.variance("poisrf", x, y, lam=(x * y).abs() * f))
        p_star = geom_p_star((x * y).abs())
        p_alt = (p_star * f).clamp(max=0.999)
        assert float(v_geo) < float(theory.variance("geomrf", x, y, p=p_alt))


def test_saderf_psi_beats_identity_and_inverse():
    """Psi* on queries (FAVOR#) vs Psi* on keys (google-research exparf) on anisotropic data."""
    q, k = _anisotropic(11, 64, 8, 0.5)
    p = SADERF().fit_params(q, k)
    psi = p["psi"][0]
    x, y = q[:, None, :], k[None, :, :]  # all pairs

    def mean_log_var(ps):
        return float(theory.variance("saderf", x, y, psi=ps).log().mean())

    best = mean_log_var(psi)
    assert best < mean_log_var(torch.ones_like(psi)) < mean_log_var(1 / psi)


def test_hyperbolic_beats_posrf_with_twice_the_vectors_closed_form():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) * 0.5
    y = torch.randn(500, 6, generator=g, dtype=torch.float64) * 0.5
    hyp, pos2 = theory.mse("hyprf", x, y, 32), theory.mse("posrf", x, y, 64)
    assert bool((hyp < pos2).all())
    # Performer: MSE_hyp(m) = 1/2 (1 - e^-|x+y|^2) MSE_+(m)
    ratio = hyp / theory.mse("posrf", x, y, 32)
    assert torch.allclose(ratio, 0.5 * -torch.expm1(-((x + y) ** 2).sum(-1)), rtol=1e-10)


def test_hyperbolic_beats_posrf_with_twice_the_vectors_monte_carlo():
    x, y = PAIRS[1]
    w = _omega(40, x.size)
    half = (x @ x + y @ y) / 2
    hyp = np.exp(-half) * np.cosh(w @ (x + y))  # one omega, two features
    w2 = np.random.default_rng(41).standard_normal((N, 2, x.size))
    pos2 = np.exp(w2 @ (x + y) - half).mean(1)  # two omegas
    v_h, v_p = hyp.var(), pos2.var()
    se = math.sqrt(((hyp - hyp.mean()) ** 4).mean() / N + ((pos2 - pos2.mean()) ** 4).mean() / N)
    assert v_p - v_h > Z * se, f"hyp {v_h:.4g} vs posrf with 2m {v_p:.4g} (SE {se:.2g})"


# --------------------------------------------------------------------------- API and bad input
def test_mse_is_variance_over_m_and_broadcasts():
    x = torch.randn(3, 1, 5, dtype=torch.float64) * 0.3
    y = torch.randn(1, 4, 5, dtype=torch.float64) * 0.3
    v = theory.variance("oprf", x, y)
    assert v.shape == (3, 4)
    assert torch.allclose(theory.mse("oprf", x, y, 8), v / 8)
    assert torch.allclose(rb.theory.mse("posrf", x, y, num_features=2), theory.variance("posrf", x, y) / 2)


def test_instance_uses_its_parameters():
    fm = rb.registry.get_feature_map("gerf", A=-0.2)
    x, y = torch.tensor([0.3, -0.1]), torch.tensor([0.2, 0.5])
    assert torch.allclose(theory.variance(fm, x, y), theory.variance("gerf", x, y, A=-0.2))
    assert theory.variance(fm, x, y).dtype == torch.float64


@pytest.mark.parametrize("name", ["gerf", "gerftrig"])
@pytest.mark.parametrize("A", [0.125, 0.2])
def test_A_at_or_above_one_eighth_raises(name, A):
    x, y = torch.zeros(2), torch.zeros(2)
    with pytest.raises(EstimatorError, match="infinite-variance"):
        theory.variance(name, x, y, A=A)
    with pytest.raises(EstimatorError, match="infinite-variance"):
        rb.make_estimator(f"{name}-iid", dim=2, num_features=4, A=A)


def test_bad_input_raises_rfbench_errors():
    x, y = torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.1])
    with pytest.raises(EstimatorError, match="closed forms exist for"):
        theory.variance("nosuchmap", x, y)
    with pytest.raises(EstimatorError, match="no closed-form"):
        theory.variance("darkis", x, y)
    with pytest.raises(EstimatorError, match="unknown parameter"):
        theory.variance("gerf", x, y, B=1.0)
    with pytest.raises(EstimatorError, match="infinite-variance"):
        theory.variance("oprf", x, y, A=0.13)
    with pytest.raises(DataError, match="NaN"):
        theory.variance("posrf", torch.tensor([float("nan"), 0.0]), y)
    with pytest.raises(DataError, match="share d"):
        theory.variance("posrf", x, torch.zeros(3))
    with pytest.raises(EstimatorError, match="num_features"):
        theory.mse("posrf", x, y, 0)
    with pytest.raises(EstimatorError, match="fixed Sigma"):
        theory.variance("dark", x, y)
    with pytest.raises(RFBenchError):
        theory.oprf_A_star(-1.0, 4)
