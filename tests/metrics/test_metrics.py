"""rfbench.metrics: the streamed metrics equal a direct dense computation at small L (float64).

The dense oracle builds every L x L matrix from the estimator's public features (or, for PosRF,
features written out here from the draw), target kernels written out here from the fitted
parameters, and ``torch.softmax``; the streamed code never does. Estimators run in float64 so
that both sides see the same numbers and agreement is to rounding (rtol 1e-9), whatever the
tiling.
"""

from __future__ import annotations

import math

import pytest
import torch

import rfbench as rb
from rfbench import metrics as M

F64 = torch.float64
RTOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(B=2, H=3, L=40, d=8, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    # Unequal per-head scales, so that per-leading-index fitted parameters differ between slices.
    scales = torch.linspace(0.6, 1.2, B * H, dtype=F64).reshape(B, H, 1, 1) * spread
    q = torch.randn(B, H, L, d, generator=g, dtype=F64) * scales
    k = torch.randn(B, H, L, d, generator=g, dtype=F64) * scales
    return q, k


def _fitted(name, d, m, seeds, q, k, scale, **params):
    ests = [rb.make_estimator(name, d, m, seed=s, dtype=F64, **params) for s in seeds]
    for e in ests:
        e.fit(q, k, scale=scale)
    return ests


def _estimates(ests, qs, ks):
    """``[S, ..., L, L]``: phi(q) . phi(k) from each estimator's public features."""
    return torch.stack([e.features(qs, True) @ e.features(ks, False).transpose(-1, -2) for e in ests])


def _dense(ests, q, k, scale, rows=None, causal=False, Kh=None, log_target=None):
    """Every metric straight from the definitions, with whole L x L matrices.

    ``Kh``: the estimates (default ``_estimates``); ``log_target(qs, ks)``: the log of the
    target kernel, written out by the test (default: DARK's exp((Mq) . (Mk)) from params_["M"]).
    """
    s = math.sqrt(scale)
    qs, ks = q * s, k * s
    K = torch.exp(qs @ ks.transpose(-1, -2))
    Kh = _estimates(ests, qs, ks) if Kh is None else Kh  # [S, B, H, L, L]
    L = q.shape[-2]
    mask = torch.ones(L, L, dtype=torch.bool).tril() if causal else torch.ones(L, L, dtype=torch.bool)
    A = torch.softmax((qs @ ks.transpose(-1, -2)).masked_fill(~mask, -math.inf), dim=-1)
    Km = Kh.masked_fill(~mask, 0.0)
    Ah = Km / Km.sum(dim=-1, keepdim=True)
    if rows is not None:
        pick = (slice(None),) * (K.ndim - 2)
        K, A = K[pick + (rows,)][..., rows], A[pick + (rows,)][..., rows]
        Kh, Ah, mask = Kh[..., rows, :][..., rows], Ah[..., rows, :][..., rows], mask[rows][:, rows]
    err2 = (Kh - K) ** 2
    S = len(ests)
    out = {
        "kernel_mse": err2.flatten(1).mean(1),
        "kernel_rel_mse": err2.flatten(1).sum(1) / (K * K).sum(),
        "attn_mse": ((Ah - A) ** 2 * mask).flatten(1).sum(1) / (mask.sum() * K[..., 0, 0].numel()),
        "bias2": ((Kh.mean(0) - K) ** 2).mean(),
        "mc_variance": Kh.var(0, unbiased=True).mean() if S > 1 else torch.tensor(math.nan),
        "mean_k2": (K * K).mean(),
    }
    if log_target is None and "M" in (ests[0].params_ or {}):
        M = ests[0].params_["M"]
        sigma = M.transpose(-1, -2) @ M

        def log_target(a, b):
            return a @ sigma @ b.transpose(-1, -2)

    if log_target is not None:
        Kt = torch.exp(log_target(qs, ks))
        if rows is not None:
            Kt = Kt[..., rows, :][..., rows]
        out["target_kernel_rel_mse"] = ((Kh - Kt) ** 2).flatten(1).sum(1) / (Kt * Kt).sum()
    return out


def _close(got, want, rtol=RTOL):
    got = torch.as_tensor(got, dtype=F64)
    assert torch.allclose(got, want.to(F64), rtol=rtol, atol=0.0), (got, want)


@pytest.mark.parametrize(
    "name",
    [
        "posrf-iid",  # plain positive features
        "hyprf-orf",  # two features per omega
        "trigrf-iid",  # signed features (factor)
        "posrf-sgq",  # quadrature row weights, some negative (sign factor on the query side)
        "oprf-orf",  # data-dependent parameter shared across leading dims
        "darkis-iid",  # data-dependent parameters per leading index
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("budget", [1, M.MEMORY_BUDGET])  # one leading index at a time, or all six together
def test_matches_dense(name, causal, budget):
    q, k = _data()
    scale = 1 / math.sqrt(q.shape[-1])
    ests = _fitted(name, 8, 6, [3, 4, 5], q, k, scale)
    got = M.kernel_errors(ests, q, k, scale=scale, causal=causal, tile=16, chunk=7, memory_budget=budget)
    want = _dense(ests, q, k, scale, causal=causal)
    _close(got.kernel_mse, want["kernel_mse"])
    _close(got.kernel_rel_mse, want["kernel_rel_mse"])
    _close(got.attn_mse, want["attn_mse"])
    _close(got.bias2, want["bias2"])
    _close(got.mc_variance, want["mc_variance"])
    _close(got.mean_k2, want["mean_k2"])
    assert got.n_pairs == 2 * 3 * 40 * 40
    assert got.target_kernel_rel_mse is None


def test_sampled_rows_match_dense_on_the_same_pairs():
    q, k = _data(L=50)
    scale = 0.3
    rows = M.sample_rows(50, 17, seed=11)
    assert rows.numel() == 17 and bool((rows[1:] > rows[:-1]).all())
    ests = _fitted("posrf-orf", 8, 5, [0, 1], q, k, scale)
    for causal in (False, True):
        got = M.kernel_errors(ests, q, k, scale=scale, rows=rows, causal=causal, tile=5, chunk=9)
        want = _dense(ests, q, k, scale, rows=rows, causal=causal)
        for key in ("kernel_mse", "kernel_rel_mse", "attn_mse"):
            _close(getattr(got, key), want[key])
        _close(got.bias2, want["bias2"])


def test_target_kernel_of_dark():
    q, k = _data(L=30)
    scale = 1 / math.sqrt(8)
    ests = _fitted("dark-iid", 8, 6, [0, 1, 2], q, k, scale)
    assert ests[0].target != "softmax" and ests[0].params_["M"].shape == (2, 3, 8, 8)
    got = M.kernel_errors(ests, q, k, scale=scale, tile=8, memory_budget=1)  # per head: sliced M
    want = _dense(ests, q, k, scale)
    _close(got.target_kernel_rel_mse, want["target_kernel_rel_mse"])
    _close(got.kernel_rel_mse, want["kernel_rel_mse"])  # the plain columns stay against softmax


def test_each_estimator_is_scored_against_its_own_kernel():
    """Seeds with different fitted parameters (trained apart, or fitted on other tokens) each get
    their own target kernel; a softmax-target estimator and a trained FastFood-L (a learned
    spectral kernel without closed form) get NaN rather than another estimator's kernel."""
    from rfbench.learning import FitConfig, fit_estimator

    q, k = _data(L=30)
    scale = 1 / math.sqrt(8)
    a = _fitted("dark-iid", 8, 6, [0], q, k, scale)[0]
    b = _fitted("dark-iid", 8, 6, [1], q[..., :12, :], k[..., :12, :], scale)[0]  # other whitening
    plain = _fitted("posrf-iid", 8, 6, [2], q, k, scale)[0]
    ffl = rb.make_estimator("oprf-fastfoodl", 8, 6, seed=3, dtype=F64)
    cfg = FitConfig(steps=2, eval_every=1, batch_tokens=16, objective="kernel")
    fit_estimator(ffl, q, k, None, cfg, scale=scale, progress=False)
    assert ffl.trained_.parts == ("weights",) and ffl.target_kernel.log_kernel is None
    got = M.kernel_errors([a, b, plain, ffl], q, k, scale=scale, tile=8)
    for i, est in ((0, a), (1, b)):
        alone = M.kernel_errors([est], q, k, scale=scale, tile=8).target_kernel_rel_mse[0]
        assert got.target_kernel_rel_mse[i] == pytest.approx(alone, rel=1e-12)
    assert got.target_kernel_rel_mse[0] != pytest.approx(got.target_kernel_rel_mse[1], rel=1e-3)
    assert math.isnan(got.target_kernel_rel_mse[2]) and math.isnan(got.target_kernel_rel_mse[3])
    assert M.kernel_errors([plain, ffl], q, k, scale=scale).target_kernel_rel_mse is None


def test_bias_variance_decomposition_is_exact():
    """mean_s kernel_mse_s == bias2 + (S-1)/S * mc_variance, entry by entry, hence on average."""
    q, k = _data(B=1, H=2, L=33)
    ests = _fitted("posrf-iid", 8, 4, range(7), q, k, 0.35)
    got = M.kernel_errors(ests, q, k, scale=0.35, tile=10, attention_matrix=False)
    S = len(ests)
    lhs = sum(got.kernel_mse) / S
    rhs = got.bias2 + (S - 1) / S * got.mc_variance
    assert math.isclose(lhs, rhs, rel_tol=1e-10)
    assert got.mc_variance > 0 and got.bias2 > 0
    assert math.isclose(got.bias2_rel, got.bias2 / got.mean_k2) and got.attn_mse is None


def test_one_seed_has_no_variance():
    q, k = _data(B=1, H=1, L=12)
    got = M.kernel_errors(_fitted("posrf-iid", 8, 4, [0], q, k, 1.0), q, k, tile=5)
    assert math.isnan(got.mc_variance)
    assert math.isclose(got.bias2, got.kernel_mse[0], rel_tol=1e-12)


def test_exact_row_lse_matches_logsumexp():
    q, k = _data(L=37)
    rows = torch.tensor([0, 5, 36])
    for causal in (False, True):
        got = M.exact_row_lse(q, k, scale=0.4, rows=rows, causal=causal, tile=2, chunk=8)
        logits = 0.4 * q @ k.transpose(-1, -2)
        if causal:
            logits = logits.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), -math.inf)
        want = torch.logsumexp(logits, dim=-1)[..., rows].reshape(6, 3)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_large_logits_do_not_overflow():
    """Kernel values near exp(300): the float64 exact side and the per-row constants keep them finite."""
    q, k = _data(B=1, H=1, L=20, d=4, spread=1.0)
    q = q / q.norm(dim=-1, keepdim=True) * 17.0
    k = q.clone()  # q.k = 289 on the diagonal
    ests = _fitted("posrf-iid", 4, 64, [0, 1], q, k, 1.0)
    got = M.kernel_errors(ests, q, k, tile=6)
    assert all(math.isfinite(x) for x in got.kernel_rel_mse + got.attn_mse)
    assert math.isfinite(got.bias2_rel) and math.isfinite(got.mc_variance_rel)


def test_relative_error_and_sample_rows():
    ref = torch.tensor([[3.0, 4.0]])
    assert math.isclose(M.relative_error(ref + torch.tensor([[0.0, 0.5]]), ref), 0.1)
    assert M.sample_rows(10, None) is None and M.sample_rows(10, 10) is None
    assert torch.equal(M.sample_rows(100, 7, seed=3), M.sample_rows(100, 7, seed=3))
    assert not torch.equal(M.sample_rows(100, 7, seed=3), M.sample_rows(100, 7, seed=4))


def test_posrf_against_features_written_out_from_the_draw():
    """PosRF features exp(w . x - |x|^2 / 2) / sqrt(m) (Performer, Choromanski et al. 2021, Lemma 1)
    from the draw alone: the metrics reproduce the estimate without the estimator's feature code."""
    q, k = _data(B=1, H=2, L=29)
    scale = 0.4
    ests = _fitted("posrf-iid", 8, 7, [0, 1, 2], q, k, scale)
    s = math.sqrt(scale)

    def phi(e, x):
        W = e.draw_.W.to(F64)
        return torch.exp(x @ W.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(W.shape[0])

    Kh = torch.stack([phi(e, q * s) @ phi(e, k * s).transpose(-1, -2) for e in ests])
    for causal in (False, True):
        got = M.kernel_errors(ests, q, k, scale=scale, causal=causal, tile=6, chunk=5)
        want = _dense(ests, q, k, scale, causal=causal, Kh=Kh)
        for key in ("kernel_mse", "kernel_rel_mse", "attn_mse"):
            _close(getattr(got, key), want[key])
        _close(got.bias2, want["bias2"])
        _close(got.mc_variance, want["mc_variance"])


def test_a_declared_target_kernel_is_used_as_declared():
    """The target column uses ``est.target_kernel.log_kernel`` on pair tiles, whatever its form:
    here a kernel that is not exp(T q . T k) for the same T on both sides (exp(2 q . k + |k|^2))."""
    from rfbench.estimator import Estimator
    from rfbench.features.target import TargetKernel

    def log_k(a, b):
        return 2 * a @ b.transpose(-1, -2) + (b * b).sum(-1).unsqueeze(-2)

    class Other(Estimator):
        target_kernel = property(lambda self: TargetKernel("other", log_k))

    q, k = _data(B=1, H=2, L=21)
    plain = _fitted("posrf-iid", 8, 6, [0, 1], q, k, 0.5)
    ests = [
        Other(e.feature_map, e.weight_matrix, dim=8, num_features=6, seed=e.seed, dtype=F64) for e in plain
    ]
    got = M.kernel_errors(ests, q, k, scale=0.5, tile=8)
    want = _dense(ests, q, k, 0.5, log_target=log_k)
    _close(got.target_kernel_rel_mse, want["target_kernel_rel_mse"])
    _close(got.kernel_rel_mse, want["kernel_rel_mse"])


def test_a_trained_darkl_is_measured_against_its_learned_kernel():
    from rfbench.learning import FitConfig, fit_estimator

    q, k = _data(B=1, H=2, L=64)
    v = torch.randn(1, 2, 64, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    scale = 1 / math.sqrt(8)
    est = rb.make_estimator("darkl-iid", 8, 16, seed=0, dtype=F64, init="identity")
    cfg = FitConfig(steps=12, eval_every=1, patience=0, lr=0.05, val_draws=2)
    res = fit_estimator(est, q, k, v, cfg, scale=scale, progress=False)
    assert res.best_step > 0 and est.trained_.parts == ("features",)
    got = M.kernel_errors([est], q, k, scale=scale, tile=8)
    want = _dense([est], q, k, scale)  # exp(q^T M^T M k) from the trained M
    _close(got.target_kernel_rel_mse, want["target_kernel_rel_mse"])


def test_metrics_fit_nothing():
    """A data-dependent estimator not fitted at the scale measured is refused, not refitted."""
    q, k = _data(B=1, H=1, L=16)
    est = rb.make_estimator("oprf-orf", 8, 4, dtype=F64)
    with pytest.raises(rb.EstimatorError, match=r"not fitted; call est\.fit\(q, k, scale=0\.5\)"):
        M.kernel_errors([est], q, k, scale=0.5)
    est.fit(q, k, scale=1.0)
    A = est.params_["A"].clone()
    with pytest.raises(rb.EstimatorError, match=r"fitted at scale=1.*est\.fit\(q, k, scale=0\.5\)"):
        M.kernel_errors([est], q, k, scale=0.5)
    M.kernel_errors([est], q, k, scale=1.0)
    assert torch.equal(est.params_["A"], A) and est.fit_scale_ == 1.0
    M.kernel_errors([rb.make_estimator("posrf-iid", 8, 4, dtype=F64)], q, k, scale=0.5)  # nothing to fit


def test_all_zero_feature_rows_give_zeros_not_nan():
    """A row whose features are all zero (log -inf) gets the stabiliser constant 0: its estimates
    are 0, and the metrics stay finite and equal to the dense computation."""
    q, k = _data(B=1, H=1, L=14)
    est = _fitted("posrf-iid", 8, 5, [0], q, k, 1.0)[0]
    dead = {True: 3, False: 6}  # query row 3 and key row 6 have no features

    def log_features(x, params, is_query, _orig=est.log_features):
        log_mag, factor = _orig(x, params, is_query)
        if x.shape[-2] == 14 and dead[is_query] is not None:  # whole sequences (tile = chunk = L)
            return log_mag.index_fill(-2, torch.tensor([dead[is_query]]), -math.inf), factor
        return log_mag, factor

    def features(x, is_query):
        log_mag, _ = log_features(x, {}, is_query)
        return torch.exp(log_mag)

    est.log_features, est.features = log_features, features
    got = M.kernel_errors([est], q, k, tile=14, chunk=14, attention_matrix=False)
    want = _dense([est], q, k, 1.0)
    assert (want["kernel_mse"] > 0).all()
    _close(got.kernel_mse, want["kernel_mse"])
    dead[True] = None  # a dead key only: attention rows stay normalisable
    got = M.kernel_errors([est], q, k, tile=14, chunk=14)
    assert all(math.isfinite(x) for x in got.attn_mse + got.kernel_mse)
    _close(got.attn_mse, _dense([est], q, k, 1.0)["attn_mse"])


def test_relu_features_are_measured_against_the_arc_cosine_kernel():
    """A map whose target is not exponential: ReLU features against the arc-cosine kernel of
    order 1, k(x, y) = |x| |y| (sin t + (pi - t) cos t) / pi (Cho & Saul, NeurIPS 2009, eq. 6),
    written out here; the plain columns stay against exp(q . k)."""
    q, k = _data(B=1, H=2, L=30)
    ests = [rb.make_estimator("relu-iid", 8, 64, seed=s, dtype=F64) for s in range(3)]
    assert not ests[0].target_kernel.is_softmax

    def log_arccos(a, b):
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True).transpose(-1, -2)
        cos = ((a @ b.transpose(-1, -2)) / (na * nb)).clamp(-1, 1)
        t = torch.arccos(cos)
        return torch.log(na * nb * (torch.sin(t) + (math.pi - t) * cos) / math.pi)

    for causal in (False, True):
        got = M.kernel_errors(ests, q, k, scale=0.5, causal=causal, tile=8, chunk=11)
        want = _dense(ests, q, k, 0.5, causal=causal, log_target=log_arccos)
        _close(got.target_kernel_rel_mse, want["target_kernel_rel_mse"])
        for key in ("kernel_rel_mse", "attn_mse"):
            _close(getattr(got, key), want[key])
