"""Feature maps through the public estimator: bias and MSE over seeds, against exp(x . y) and theory.

Every unbiased map is paired with ``iid`` (``rfbench.make_estimator(..., dtype=torch.float64)``)
and redrawn over N seeds. For each pair (x, y), with K_s the estimate of seed s:
- bias: |mean_s K_s - exp(x . y)| <= Z * SE, SE = std_s(K_s) / sqrt(N);
- variance: the empirical MSE mean_s (K_s - exp(x . y))^2 is within Z * SE of theory.mse, SE the
  standard error of that mean of squares, estimated from the spread of the squares. (For near-normal
  errors, e^2 / MSE ~ chi^2_1, so SE ~ MSE sqrt(2 / N); ``_check_mse`` asserts that this relative
  resolution Z sqrt(2/N) is below 1/2, so a variance off by 2x cannot pass.)
Data-dependent maps are fitted per pair (each pair is its own leading index, L = 1), exactly
as ``theory`` fits them; one slow test fits them once on L tokens instead.
Z = 4 (two-sided normal tail 6e-5 per check).
"""

from __future__ import annotations

import math

import pytest
import torch

import rfbench as rb
from rfbench import theory
from rfbench.errors import DataError, EstimatorError, RFBenchError, UnsupportedError
from rfbench.features.derf import SADERF, SDERF, saderf_psi
from rfbench.features.gerf import GERF_DEFAULT_A, OPRF
from rfbench.weights.base import WeightMatrix

Z = 4.0
#: Rounding floor added to SE: some pairs make an estimator exact (SADERF with x_l y_l < 0 for
#: every l has Psi x + Psi^-1 y = 0, so Var1 = 0 and only float64 rounding is left).
ROUND = 1e-12
UNBIASED = ["trigrf", "posrf", "hyprf", "gerf", "gerftrig", "oprf", "saderf", "sderf", "poisrf", "geomrf"]
F64 = torch.float64


def _pairs(d: int, seed: int, sq_norm: float = 0.3):
    """Four pairs as ``[4, 1, d]`` queries and keys: generic, anti-aligned, aligned, one zero coordinate.

    |x|^2 ~ |y|^2 ~ ``sq_norm`` at every d, so |x + y|^2 <= ~1.1: the squared errors then have
    moderate tails and their sample spread is a reliable SE (at |x + y|^2 ~ 2.5 PosRF's one-sample
    estimate is lognormal with sigma^2 = 2.5, and 2000 seeds under-estimate its MSE's spread).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, d, generator=g, dtype=F64) * math.sqrt(sq_norm / d)
    y = torch.randn(4, d, generator=g, dtype=F64) * math.sqrt(sq_norm / d)
    y[1] = -0.8 * x[1] + 0.2 * y[1]
    y[2] = 0.8 * x[2] + 0.2 * y[2]
    x[3, 0] = 0.0
    return x[:, None, :], y[:, None, :]


def _estimates(name: str, X, Y, m: int, seeds, **params) -> torch.Tensor:
    """``[N, P]`` kernel estimates of the P pairs, one row per seed."""
    est = rb.make_estimator(f"{name}-iid", dim=X.shape[-1], num_features=m, seed=0, dtype=F64, **params)
    est.fit(X, Y)  # one fit per pair (leading index); redraw() keeps it
    rows = []
    for s in seeds:
        rows.append(est.redraw(s).kernel(X, Y)[:, 0, 0])
    return torch.stack(rows)


def _one_sample_products(fm, x, y, draw, params) -> torch.Tensor:
    """Per-omega one-sample estimates sum_k f1_k f2_k: x ``[..., Lq, d]``, y ``[..., Lk, d]`` ->
    ``[..., Lq, Lk, M]`` for the M rows of ``draw`` (the feature map alone, no Estimator)."""
    lq, fq = fm.log_features(x, draw, params, True)
    lk, fk = fm.log_features(y, draw, params, False)
    Fq = torch.exp(lq) if fq is None else torch.exp(lq) * fq
    Fk = torch.exp(lk) if fk is None else torch.exp(lk) * fk
    M = draw.W.shape[0]
    Fq = Fq.unflatten(-1, (fm.per_omega, M))  # omega-major blocks: [..., Lq, per, M]
    Fk = Fk.unflatten(-1, (fm.per_omega, M))
    return torch.einsum("...ikr,...jkr->...ijr", Fq, Fk)


def _estimates_fast(name: str, X, Y, m: int, n: int, seed: int, **params) -> torch.Tensor:
    """``[n, ...]`` estimates of n independent m-row i.i.d. estimators, from one draw of n*m rows.

    The rows of ``iid`` (and the DIRF omegas) are independent, so n consecutive groups of m rows
    are n independent estimators: the same law as n seeds of make_estimator, in one tensor call.
    """
    from rfbench.weights.iid import IID

    fm = rb.registry.get_feature_map(name, **params)
    g = torch.Generator().manual_seed(seed)
    draw = fm.draw(IID(), n * m, X.shape[-1], generator=g, device="cpu", dtype=F64)
    P = _one_sample_products(fm, X, Y, draw, fm.fit_params(X, Y))  # [..., Lq, Lk, n*m]
    return P.unflatten(-1, (n, m)).mean(dim=-1).movedim(-1, 0)


def _check_bias(K: torch.Tensor, true: torch.Tensor, what: str) -> None:
    n = K.shape[0]
    se = K.std(dim=0) / math.sqrt(n)
    assert bool((se < 0.05 * true).all()), f"{what}: too few seeds to resolve a 5% bias (SE/SM {se / true})"
    z = (K.mean(dim=0) - true) / (se + ROUND * true)
    assert bool((z.abs() <= Z).all()), f"{what}: bias z-scores {z.tolist()}"


def _check_mse(K: torch.Tensor, true: torch.Tensor, mse_theory: torch.Tensor, what: str) -> None:
    n = K.shape[0]
    assert Z * math.sqrt(2 / n) < 0.5, "too few seeds to resolve a 2x error in the MSE"
    e2 = (K - true) ** 2
    se = e2.std(dim=0) / math.sqrt(n)
    z = (e2.mean(dim=0) - mse_theory) / (se + (ROUND * true) ** 2)
    ratio = e2.mean(dim=0) / mse_theory
    assert bool((z.abs() <= Z).all()), f"{what}: MSE/theory {ratio.tolist()}, z {z.tolist()}"


def _run(name: str, d: int, m: int, n: int, seed: int, fast: bool = False, **params) -> None:
    X, Y = _pairs(d, seed)
    true = torch.exp((X * Y).sum(-1)).squeeze(-1)
    if fast:
        K = _estimates_fast(name, X, Y, m, n, seed, **params)[:, :, 0, 0]
    else:
        K = _estimates(name, X, Y, m, range(n), **params)
    what = f"{name} d={d} m={m} N={n}"
    _check_bias(K, true, what)
    _check_mse(K, true, theory.mse(name, X[:, 0], Y[:, 0], m, **params), what)


# --------------------------------------------------------------------------- statistical
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_and_mse_matches_theory_quick(name):
    """Through make_estimator / Estimator.kernel (stabilisers, 1/m), N = 400 seeds."""
    _run(name, d=4, m=16, n=400, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", UNBIASED)
@pytest.mark.parametrize(("d", "m"), [(2, 4), (8, 32), (32, 16)])
def test_unbiased_and_mse_matches_theory(name, d, m):
    """The feature map with n * m i.i.d. rows split into N = 20000 estimators."""
    _run(name, d=d, m=m, n=20_000, seed=d, fast=True)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [("gerf", {"A": -0.3}), ("gerf", {"A": 0.05}),
                                              ("gerftrig", {"A": -0.2}), ("gerftrig", {"A": 0.05}),
                                              ("poisrf", {"lam": 0.5}), ("geomrf", {"p": 0.7})])
def test_fixed_parameters_unbiased_and_mse_matches_theory(name, params):
    _run(name, d=4, m=16, n=20_000, seed=7, fast=True, **params)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["oprf", "saderf", "sderf", "poisrf", "geomrf"])
def test_fitted_once_on_tokens_unbiased_for_every_pair(name):
    """Fit on L = 6 anisotropic tokens (one fit for all pairs), then estimate the 6 x 6 Gram matrix."""
    g = torch.Generator().manual_seed(3)
    d, L, m, n = 4, 6, 16, 20_000
    stretch = torch.linspace(0.5, 1.5, d, dtype=F64)
    q = torch.randn(L, d, generator=g, dtype=F64) * stretch * 0.25
    k = torch.randn(L, d, generator=g, dtype=F64) / stretch * 0.25
    est = rb.make_estimator(f"{name}-iid", dim=d, num_features=m, seed=0, dtype=F64).fit(q, k)
    fitted = {key: (v if key == "Q" else v.squeeze(-2).squeeze(-1) if key == "A" else v.squeeze(-2))
              for key, v in est.params_.items()}
    K = _estimates_fast(name, q, k, m, n, seed=4).flatten(1)  # fits the same way as est.fit
    x, y = q[:, None, :].expand(L, L, d).reshape(-1, d), k[None, :, :].expand(L, L, d).reshape(-1, d)
    true = torch.exp((x * y).sum(-1))
    _check_bias(K, true, f"{name} fitted on tokens")
    _check_mse(K, true, theory.mse(name, x, y, m, **fitted), f"{name} fitted on tokens")


# --------------------------------------------------------------------------- exact identities
def _draw(d: int, m: int, seed: int = 0):
    from rfbench.weights.iid import IID

    return IID().sample(m, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _features(fm, x, draw, params=None, is_query=True):
    log_mag, factor = fm.log_features(x, draw, params or {}, is_query)
    f = torch.exp(log_mag)
    return f if factor is None else f * factor


def test_gerf_special_cases_are_posrf_and_trigrf():
    get = rb.registry.get_feature_map
    x = torch.randn(2, 5, 3, dtype=F64) * 0.5
    draw = _draw(3, 7)
    assert torch.allclose(_features(get("gerf", A=0.0), x, draw), _features(get("posrf"), x, draw))
    assert torch.allclose(_features(get("gerftrig", A=0.0), x, draw), _features(get("trigrf"), x, draw))
    assert get("gerf").params["A"] == GERF_DEFAULT_A == -0.0625


def test_features_shapes_signs_and_feature_dim():
    x = torch.randn(2, 3, 5, 4, dtype=F64) * 0.4
    y = torch.randn(2, 3, 6, 4, dtype=F64) * 0.4
    for name in UNBIASED:
        est = rb.make_estimator(f"{name}-iid", dim=4, num_features=8, seed=1, dtype=F64).fit(x, y)
        fq, fk = est.features(x), est.features(y, is_query=False)
        per = est.feature_map.per_omega
        assert est.feature_dim == 8 * per
        assert fq.shape == (2, 3, 5, 8 * per) and fk.shape == (2, 3, 6, 8 * per)
        if est.feature_map.positive:
            assert bool((fq >= 0).all()) and bool((fk >= 0).all()), name
        # features are on the true scale: their product is kernel() (which uses the stabilisers)
        assert torch.allclose(fq @ fk.transpose(-1, -2), est.kernel(x, y), rtol=1e-10, atol=1e-12), name


def test_float32_zero_coordinates_and_attention_are_finite():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 8, generator=g) * 0.5
    k = torch.randn(2, 16, 8, generator=g) * 0.5
    v = torch.randn(2, 16, 3, generator=g)
    q[:, :, 0] = 0.0  # a coordinate that is zero for every query
    k[:, 3] = 0.0  # a zero key
    for name in UNBIASED:
        est = rb.make_estimator(f"{name}-iid", dim=8, num_features=32, seed=2)
        K = est.kernel(q, k)
        assert K.dtype == torch.float32 and bool(torch.isfinite(K).all()), name
        assert bool(torch.isfinite(est.attention(q, k, v)).all()), name


def test_oprf_fit_is_the_mean_over_all_pairs():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 5, 6, generator=g, dtype=F64)
    k = torch.randn(2, 3, 7, 6, generator=g, dtype=F64) + 0.3
    A = OPRF().fit_params(q, k)["A"]
    assert A.shape == (2, 3, 1, 1)
    phi = ((q[..., :, None, :] + k[..., None, :, :]) ** 2).sum(-1).mean(dim=(-2, -1))  # O(L^2) brute force
    assert torch.allclose(A[..., 0, 0], theory.oprf_A_star(phi, 6))


def test_saderf_psi_minimises_the_pair_sum_and_scales_queries():
    g = torch.Generator().manual_seed(5)
    stretch = torch.tensor([0.2, 1.0, 3.0], dtype=F64)
    q = torch.randn(9, 3, generator=g, dtype=F64) * stretch
    k = torch.randn(5, 3, generator=g, dtype=F64) / stretch

    def pair_sum(psi):
        return (((q * psi)[:, None, :] + (k / psi)[None, :, :]) ** 2).sum()

    psi = saderf_psi(q, k)[0]
    for bump in (0.9, 1.1):
        for i in range(3):
            other = psi.clone()
            other[i] *= bump
            assert pair_sum(psi) < pair_sum(other)
    params = SADERF().fit_params(q, k)
    draw = _draw(3, 4)
    fq = _features(SADERF(), q, draw, params, is_query=True)
    f_scaled = _features(rb.registry.get_feature_map("gerf", A=float(params["A"])), q * psi, draw)
    assert torch.allclose(fq, f_scaled)  # queries are multiplied by Psi, keys divided


def test_sderf_fit_is_an_eigendecomposition_with_nonpositive_a():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 10, 5, generator=g, dtype=F64)
    k = torch.randn(3, 12, 5, generator=g, dtype=F64) * 0.5 + 0.2
    p = SDERF().fit_params(q, k)
    Q, a = p["Q"], p["a"]
    assert Q.shape == (3, 5, 5) and a.shape == (3, 1, 5)
    assert torch.allclose(Q.transpose(-1, -2) @ Q, torch.eye(5, dtype=F64).expand(3, 5, 5), atol=1e-10)
    assert bool((a <= 0).all())
    P = ((q[..., :, None, :] + k[..., None, :, :]).flatten(-3, -2))  # all pairs
    P = P.transpose(-1, -2) @ P / P.shape[-2]
    D = Q.transpose(-1, -2) @ P @ Q
    assert torch.allclose(D, torch.diag_embed(torch.diagonal(D, dim1=-2, dim2=-1)), atol=1e-9)


def test_discrete_maps_pair_only_with_iid_and_are_reproducible():
    class FakeORF(WeightMatrix):
        name = "orf"

    for name, law in (("poisrf", "Poisson"), ("geomrf", "Geometric")):
        fm = rb.registry.get_feature_map(name)
        (reason,) = fm.supports(FakeORF())
        assert law in reason and f"use {name}-iid" in reason
        with pytest.raises(UnsupportedError, match=f"{name}-iid"):
            rb.Estimator(fm, FakeORF(), dim=3, num_features=4)
        x = torch.randn(4, 3, dtype=F64) * 0.5
        a = rb.make_estimator(f"{name}-iid", dim=3, num_features=8, seed=5, dtype=F64).kernel(x, x)
        b = rb.make_estimator(f"{name}-iid", dim=3, num_features=8, seed=5, dtype=F64).kernel(x, x)
        c = rb.make_estimator(f"{name}-iid", dim=3, num_features=8, seed=6, dtype=F64).kernel(x, x)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_fixed_dirf_parameters_need_no_fit():
    x = torch.randn(4, 3, dtype=F64) * 0.5
    for name, params in (("poisrf", {"lam": 0.4}), ("geomrf", {"p": 0.5})):
        est = rb.make_estimator(f"{name}-iid", dim=3, num_features=8, dtype=F64, **params)
        assert not est.feature_map.data_dependent
        assert bool(torch.isfinite(est.features(x)).all())  # no fit() needed
        fitted = rb.make_estimator(f"{name}-iid", dim=3, num_features=8, dtype=F64)
        assert fitted.feature_map.data_dependent
        with pytest.raises(EstimatorError, match="fit"):
            fitted.features(x)


# --------------------------------------------------------------------------- bad input
def test_bad_parameters_raise_estimator_errors():
    with pytest.raises(EstimatorError, match="infinite-variance"):
        rb.make_estimator("gerf-iid", dim=4, num_features=8, A=1 / 8)
    with pytest.raises(EstimatorError, match="infinite-variance"):
        rb.registry.get_feature_map("gerftrig", A=0.2)
    with pytest.raises(EstimatorError, match="A must be"):
        rb.registry.get_feature_map("gerf", A=float("nan"))
    with pytest.raises(EstimatorError, match="unknown parameter"):
        rb.registry.get_feature_map("oprf", A=-0.1)
    with pytest.raises(EstimatorError, match="no parameter 'lam'"):
        rb.make_estimator("geomrf-iid", dim=4, num_features=8, lam=1.0)
    with pytest.raises(EstimatorError, match="lam must be"):
        rb.make_estimator("poisrf-iid", dim=4, num_features=8, lam=-1.0)
    with pytest.raises(EstimatorError, match="p must be"):
        rb.make_estimator("geomrf-iid", dim=4, num_features=8, p=1.0)


@pytest.mark.parametrize("name", UNBIASED)
def test_nan_input_raises_data_error(name):
    est = rb.make_estimator(f"{name}-iid", dim=3, num_features=4)
    q = torch.zeros(2, 3)
    q[1, 2] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        est.kernel(q, torch.zeros(2, 3))
    with pytest.raises(RFBenchError):
        est.fit(torch.zeros(2, 3), q)
