"""Kernel learning (rfbench/learning/, weights/learned.py, features/dark_learned.py).

Quick tests: configs and splits, bad input, determinism, that the learnable pieces start exactly
where the fixed estimators are, that gradients reach them through the core (gradcheck), the
closed-form IS second moment, early stopping, honest labels. Slow tests fit on synthetic
anisotropic Gaussians where the optimum is known (Sigma* = (I + 2 Lambda)(I - 2 Lambda)^-1).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import rfbench as rb
from rfbench import exact
from rfbench.errors import DataError, EstimatorError, SpecError
from rfbench.features.dark_learned import LEARNED_SIGMA_TARGET
from rfbench.learning import (
    FitConfig,
    fit_estimator,
    parse_fit_section,
    split_tokens,
    target_attention,
)
from rfbench.learning.objectives import Objective as _Objective
from rfbench.weights.base import WeightDraw
from rfbench.weights.hadamard import FastFood
from rfbench.weights.learned import LEARNED_TARGET, FastFoodL

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(d: int, seed: int = 7) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))[0]


def _gaussian(lam: torch.Tensor, n: int, seed: int, heads: int = 1, dtype=torch.float32) -> torch.Tensor:
    """``[heads, n, d]`` samples of N(0, U diag(lam) U^T), U a fixed rotation."""
    U = _rotation(lam.numel())
    z = torch.randn(heads, n, lam.numel(), generator=_gen(seed), dtype=F64)
    return (z @ (U * lam.sqrt()).T).to(dtype)


def _sigma_star(lam: torch.Tensor) -> torch.Tensor:
    U = _rotation(lam.numel())
    return (U * ((1 + 2 * lam) / (1 - 2 * lam))) @ U.T


def _qkv(L=96, d=8, heads=2, seed=0, scale_std=0.5):
    g = _gen(seed)
    return tuple(torch.randn(heads, L, d, generator=g) * scale_std for _ in range(3))


pytestmark = pytest.mark.usefixtures("one_thread")


QUICK = FitConfig(steps=4, eval_every=2, patience=0, batch_tokens=32, val_draws=2)


# --------------------------------------------------------------------------- configs and splits
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"objective": "mse"}, "objective"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"split": "random"}, "split"),
        ({"patience": -1}, "patience"),
        ({"redraw": "yes"}, "redraw"),
        ({"seed": 1.5}, "seed"),
        ({"batch_tokens": 1}, "batch_tokens"),
    ],
)
def test_fit_config_rejects_bad_values(kwargs, word):
    with pytest.raises(SpecError, match=word):
        FitConfig(**kwargs)


def test_fit_section_parses_overrides_and_rejects_bad_keys():
    spec = parse_fit_section(
        {
            "holdout": 0.3,
            "objective": "kernel",
            "steps": 50,
            "estimators": {"darkl-iid": {"objective": "variance"}},
        },
        estimators=["posrf-iid", "darkl-iid"],
    )
    assert spec.holdout == 0.3 and spec.holdout_split == "tail"
    assert spec.config_for("posrf-iid") == FitConfig(objective="kernel", steps=50)
    assert spec.config_for("darkl-iid") == FitConfig(objective="variance", steps=50)
    fit_idx, held_idx = spec.split(100)
    assert held_idx.tolist() == list(range(70, 100)) and fit_idx.tolist() == list(range(70))
    with pytest.raises(SpecError, match=r"unknown key.*stepz"):
        parse_fit_section({"stepz": 3})
    with pytest.raises(SpecError, match=r"fit\.estimators\.darkl-orf: not an estimator"):
        parse_fit_section({"estimators": {"darkl-orf": {}}}, estimators=["darkl-iid"])
    with pytest.raises(SpecError, match=r"fit\.estimators\.darkl-iid.*steps"):
        parse_fit_section({"estimators": {"darkl-iid": {"steps": 0}}})
    with pytest.raises(SpecError, match="holdout"):
        parse_fit_section({"holdout": 1.0})


def test_block_split_is_contiguous_disjoint_and_spread():
    train, val = split_tokens(80, 0.25, split="blocks", n_blocks=8)
    assert sorted(train.tolist() + val.tolist()) == list(range(80))
    # two validation blocks of 10 contiguous tokens, evenly spaced (blocks 2 and 6)
    assert val.tolist() == list(range(20, 30)) + list(range(60, 70))
    train, val = split_tokens(10, 0.3, split="tail")
    assert val.tolist() == [7, 8, 9] and train.tolist() == list(range(7))


@pytest.mark.parametrize(
    "L, frac, split, word",
    [(3, 0.1, "tail", "no validation"), (5, 0.5, "blocks", "n_blocks"), (40, 0.99, "blocks", "no training")],
)
def test_empty_split_raises(L, frac, split, word):
    with pytest.raises(SpecError, match=word):
        split_tokens(L, frac, split=split, n_blocks=8)


# --------------------------------------------------------------------------- bad use of fit_estimator
def test_fit_estimator_rejects_impossible_combinations():
    q, k, v = _qkv()
    darkl = rb.make_estimator("darkl-iid", dim=8, num_features=8)
    ffl = rb.make_estimator("posrf-fastfoodl", dim=8, num_features=8)
    with pytest.raises(EstimatorError, match="needs values v"):
        fit_estimator(darkl, q, k, None, QUICK, scale=1.0)
    with pytest.raises(EstimatorError, match="variance.*learns its kernel"):
        fit_estimator(darkl, q, k, v, dataclasses.replace(QUICK, objective="variance"), scale=1.0)
    with pytest.raises(EstimatorError, match="variance"):
        fit_estimator(ffl, q, k, v, dataclasses.replace(QUICK, objective="variance"), scale=1.0)
    with pytest.raises(EstimatorError, match="learns its draw"):
        fit_estimator(ffl, q, k, v, dataclasses.replace(QUICK, redraw=True), scale=1.0)
    with pytest.raises(SpecError, match="no validation"):
        fit_estimator(
            darkl,
            q[:, :4],
            k[:, :4],
            v[:, :4],
            dataclasses.replace(QUICK, split="tail", val_fraction=0.1),
            scale=1.0,
        )
    with pytest.raises(DataError, match="same L"):
        fit_estimator(darkl, q, k[:, :50], v[:, :50], QUICK, scale=1.0)
    with pytest.raises(EstimatorError, match="scale"):
        fit_estimator(darkl, q, k, v, QUICK, scale=0.0)
    with pytest.raises(SpecError, match="FitConfig"):
        fit_estimator(darkl, q, k, v, {"steps": 3}, scale=1.0)
    with pytest.raises(EstimatorError, match="init='proposal'"):
        rb.make_estimator("darkl-iid", dim=8, num_features=8, mode="is", init="whiten")
    with pytest.raises(EstimatorError, match="param"):
        rb.make_estimator("darkl-iid", dim=8, num_features=8, param="sparse")
    with pytest.raises(EstimatorError, match="rank=9"):
        rb.make_estimator("darkl-iid", dim=8, num_features=8, param="lowrank", rank=9).fit(q, k)
    with pytest.raises(EstimatorError, match="learn"):
        FastFoodL(learn="SX")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(
    "name, params",
    [("darkl-iid", {}), ("oprf-fastfoodl", {}), ("darkl-orf", {"param": "lowrank", "rank": 2})],
)
def test_fit_is_deterministic(name, params):
    q, k, v = _qkv()

    def fit(est_seed, cfg=QUICK):
        est = rb.make_estimator(name, dim=8, num_features=8, seed=est_seed, **params)
        res = fit_estimator(est, q, k, v, cfg, scale=1.0, progress=False)
        return res, est

    (r1, e1), (r2, e2) = fit(3), fit(3)
    assert r1.curve.equals(r2.curve) and r1.best_step == r2.best_step
    assert r1.seed_independent == name.startswith("darkl")  # fastfoodl trains its seed's own draw
    assert all(torch.equal(e1.params_[key], e2.params_[key]) for key in e1.params_)
    assert torch.equal(e1.draw_.W, e2.draw_.W)
    r3, e3 = fit(3, dataclasses.replace(QUICK, seed=11))
    assert not r3.curve.equals(r1.curve)  # the training seed matters
    if name.startswith("darkl"):
        # darkl learns a distribution from the training seed only: the estimator's seed changes the
        # measured draw, not the fitted M (tests/bench/learning_table.py fits once per cell for this)
        r4, e4 = fit(5)
        assert r4.curve.equals(r1.curve)
        assert all(torch.equal(e1.params_[key], e4.params_[key]) for key in e1.params_)
        assert not torch.equal(e1.draw_.W, e4.draw_.W)


# --------------------------------------------------------------------------- starting points
@pytest.mark.parametrize("m, d", [(16, 32), (40, 16), (100, 48), (8, 8)])
def test_fastfoodl_draw_is_the_fastfood_draw(m, d):
    a = FastFood().sample(m, d, generator=_gen(4), dtype=F64)
    b = FastFoodL().sample(m, d, generator=_gen(4), dtype=F64)
    assert torch.equal(a.W, b.W) and a.notes == b.notes
    module = FastFoodL(learn="SG").module(m, d, generator=_gen(4), dtype=F64)
    W = module()
    assert torch.allclose(W, a.W, rtol=1e-12, atol=1e-12)
    W.square().sum().backward()
    assert module.S.grad is not None and module.G.grad is not None and module.B.grad is None
    assert FastFoodL.unbiased is False and FastFoodL.gaussian_marginal is True


def test_untrained_darkl_is_dark_darkis_or_posrf():
    lam = torch.linspace(0.05, 0.4, 6, dtype=F64)
    q, k = _gaussian(lam, 64, 1, dtype=F64), _gaussian(lam, 64, 2, dtype=F64)

    def kern(name, **p):
        return rb.make_estimator(name, dim=6, num_features=16, seed=1, dtype=F64, **p).fit(q, k).kernel(q, k)

    assert torch.allclose(kern("darkl-iid", init="whiten"), kern("dark-iid"), rtol=1e-9)
    assert torch.allclose(kern("darkl-iid", init="proposal", mode="is"), kern("darkis-iid"), rtol=1e-9)
    assert torch.allclose(kern("darkl-iid", init="identity"), kern("posrf-iid"), rtol=1e-9)
    assert torch.allclose(kern("darkl-iid", init="identity", mode="is"), kern("posrf-iid"), rtol=1e-9)
    # low rank + diagonal with rank = d is the full init; diag applies the formula to diag(Lambda)
    full = rb.make_estimator("darkl-iid", dim=6, num_features=4, dtype=F64, init="proposal").fit(q, k)
    low = rb.make_estimator(
        "darkl-iid", dim=6, num_features=4, dtype=F64, init="proposal", param="lowrank", rank=6
    ).fit(q, k)
    fm = full.feature_map
    assert torch.allclose(low.feature_map.transform(low.params_), fm.transform(full.params_), atol=1e-12)
    diag = rb.make_estimator("darkl-iid", dim=6, num_features=4, dtype=F64, init="whiten", param="diag")
    diag.fit(q, k)
    x = torch.cat([q, k], dim=-2)
    expect = 6**-0.25 * (x * x).mean(dim=-2).rsqrt()
    assert torch.allclose(diag.params_["M_diag"], expect, rtol=1e-10)


# --------------------------------------------------------------------------- gradients through the core
def test_gradients_reach_learned_parameters_through_attention():
    """gradcheck (float64 finite differences) of est.attention with respect to M and to FastFood-L's G."""
    q, k, v = (t.double() for t in _qkv(L=12, d=4, heads=1))
    est = rb.make_estimator("darkl-iid", dim=4, num_features=6, dtype=F64).fit(q, k, scale=0.5)
    M0 = est.params_["M"].clone().requires_grad_(True)

    def attn_of_M(M):
        est.params_ = {"M": M}
        return est.attention(q, k, v, scale=0.5)

    assert torch.autograd.gradcheck(attn_of_M, (M0,))
    ffl = rb.make_estimator("oprf-fastfoodl", dim=4, num_features=6, dtype=F64).fit(q, k, scale=0.5)
    module = ffl.weight_matrix.module(6, 4, generator=_gen(0), dtype=F64)
    G0 = module.G.detach().clone().requires_grad_(True)

    def attn_of_G(G):  # W built from the factors with G substituted
        ffl.draw_ = WeightDraw(torch.func.functional_call(module, {"G": G}, ()))
        return ffl.attention(q, k, v, scale=0.5)

    assert torch.autograd.gradcheck(attn_of_G, (G0,))


def test_is_second_moment_matches_monte_carlo_and_posrf_at_identity():
    d, n_draws = 3, 400_000
    x = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.3]], dtype=F64)
    y = torch.tensor([[0.2, 0.1, -0.4]], dtype=F64)
    fm = rb.make_estimator("darkl-iid", dim=d, num_features=1, dtype=F64, init="identity", mode="is")
    fm = fm.feature_map
    # at Sigma = I: Var1 + K^2 of PosRF = e^{2 x.y} e^{|x + y|^2} (Performer Lemma 2)
    eye = {"M": torch.eye(d, dtype=F64)}
    u2 = (x[:, None, :] + y[None, :, :]).pow(2).sum(-1)
    assert torch.allclose(fm.log_second_moment(x, y, eye), 2 * x @ y.T + u2, atol=1e-12)
    # another Sigma: compare with the sample mean of (f(x) f(y))^2 over n_draws i.i.d. rows
    M = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.4]], dtype=F64)
    draw = WeightDraw(torch.randn(n_draws, d, generator=_gen(9), dtype=F64))
    lx, _ = fm.log_features(x, draw, {"M": M}, True)
    ly, _ = fm.log_features(y, draw, {"M": M}, False)
    Y = torch.exp(lx[:, None, :] + ly[None, :, :])  # [2, 1, n]: one-sample estimates of exp(x . y)
    assert torch.allclose(Y.mean(-1), torch.exp(x @ y.T), rtol=5e-3)  # unbiased for the softmax kernel
    Y2 = Y * Y
    se = Y2.std(-1) / math.sqrt(n_draws)
    z = (Y2.mean(-1) - torch.exp(fm.log_second_moment(x, y, {"M": M}))) / se
    assert z.abs().max() < 4.5, z
    # Sigma with an eigenvalue <= 1/2: infinite variance, reported as +inf
    assert torch.isinf(fm.log_second_moment(x, y, {"M": 0.6 * torch.eye(d, dtype=F64)})).all()


# --------------------------------------------------------------------------- stopping, labels, references
def test_best_step_parameters_are_kept_and_labelled():
    q, k, v = _qkv(L=128)
    est = rb.make_estimator("oprf-fastfoodl", dim=8, num_features=16, seed=2)
    assert est.target == "softmax" and not est.unbiased
    calls = []
    cfg = FitConfig(steps=16, eval_every=1, patience=0, lr=0.05, batch_tokens=64)
    res = fit_estimator(est, q, k, v, cfg, scale=0.5, progress=calls.append)
    assert [c["step"] for c in calls] == list(range(1, 17))
    assert res.trained and res.best_step > 0 and res.best_val_loss < res.init_val_loss
    assert res.curve["val_loss"].iloc[res.best_step] == res.best_val_loss
    # the kept W gives exactly the best validation loss again (fastfoodl validates on its own draw)
    _, val = split_tokens(128, cfg.val_fraction, split=cfg.split, n_blocks=cfg.n_blocks)
    qv, kv, vv = (t.index_select(-2, val) for t in (q, k, v))
    with torch.no_grad():
        again = float(_Objective(est, "attention", 0.5)(qv, kv, vv))
    assert again == pytest.approx(res.best_val_loss, rel=1e-5)
    assert est.target == res.target == LEARNED_TARGET and est.info()["target"] == LEARNED_TARGET
    assert not est.info()["unbiased"] and "fastfoodl: S, G, B trained" in est.info()["notes"]
    assert est.trained_.parts == ("weights",) and est.target_kernel.log_kernel is None
    assert not hasattr(est.weight_matrix, "fitted_")  # the component itself is not changed
    assert target_attention(est, q, k, v, scale=0.5) is None  # a learned spectral kernel: no closed form


def test_darkl_labels_and_own_kernel_reference():
    q, k, v = _qkv(L=128)
    est = rb.make_estimator("darkl-iid", dim=8, num_features=16, init="identity")
    res = fit_estimator(
        est,
        q,
        k,
        v,
        FitConfig(steps=12, eval_every=2, patience=0, lr=0.05, val_draws=2),
        scale=0.5,
        progress=False,
    )
    assert res.best_step > 0 and est.target == LEARNED_SIGMA_TARGET and est.unbiased
    assert est.trained_.parts == ("features",) and est.target_kernel.name == LEARNED_SIGMA_TARGET
    M = est.params_["M"]
    s = math.sqrt(0.5)
    expect = exact.attention((q * s) @ M.mT, (k * s) @ M.mT, v, scale=1.0)
    assert torch.allclose(target_attention(est, q, k, v, scale=0.5), expect, rtol=1e-5, atol=1e-6)
    is_est = rb.make_estimator("darkl-iid", dim=8, num_features=16, init="identity", mode="is")
    fit_estimator(is_est, q, k, v, FitConfig(steps=4, eval_every=2, patience=0), scale=0.5, progress=False)
    assert is_est.target == "softmax"  # a learned proposal keeps the softmax kernel


def test_estimators_without_learnable_parts_are_fitted_plainly():
    q, k, v = _qkv()
    est = rb.make_estimator("oprf-orf", dim=8, num_features=8)
    res = fit_estimator(est, q, k, v, QUICK, scale=0.5)
    assert not res.trained and res.stopped == "not trainable" and len(res.curve) == 0
    ref = rb.make_estimator("oprf-orf", dim=8, num_features=8).fit(q, k, scale=0.5)
    assert torch.equal(est.params_["A"], ref.params_["A"]) and est.fit_scale_ == 0.5
    plain = rb.make_estimator("posrf-iid", dim=8, num_features=8)
    assert fit_estimator(plain, q, k, v, QUICK, scale=0.5).estimator.params_ is None


# --------------------------------------------------------------------------- slow: known optima
@pytest.mark.slow
def test_darkl_is_variance_fit_finds_sigma_star_on_gaussian_data():
    """q, k ~ N(0, Lambda): the IS variance of exp(q . k) is minimised (over Gaussian proposals) by
    Sigma* = (I + 2 Lambda)(I - 2 Lambda)^-1. Fitting from the identity (PosRF) must lower the train
    loss, lower the loss on fresh held-out data, and land near Sigma*; from the Sigma* proposal it
    must not raise the held-out loss."""
    torch.manual_seed(0)
    d, H = 8, 2
    lam = torch.linspace(0.02, 0.12, d, dtype=F64)
    q, k = _gaussian(lam, 640, 1, H), _gaussian(lam, 640, 2, H)
    qt, kt = _gaussian(lam, 1536, 3, H), _gaussian(lam, 1536, 4, H)  # held out: fresh samples
    cfg = FitConfig(objective="variance", steps=120, lr=0.01, batch_tokens=1024, eval_every=10, patience=0)

    def held(est):
        return float(_Objective(est, "variance", 1.0)(qt, kt, None))

    star = rb.make_estimator("darkl-iid", dim=d, num_features=16, init="identity", mode="is").fit(q, k)
    star.params_ = {"M": torch.linalg.cholesky(_sigma_star(lam)).T.float()}  # M^T M = Sigma*
    best = held(star)
    for init in ("identity", "proposal"):
        est = rb.make_estimator("darkl-iid", dim=d, num_features=16, init=init, mode="is").fit(q, k)
        before = held(est)
        res = fit_estimator(est, q, k, None, cfg, scale=1.0, progress=False)
        train = res.curve["train_loss"].dropna()
        after = held(est)
        assert train.iloc[-1] < train.iloc[0]  # full batch: the training objective itself
        assert after <= before * 1.01, (init, before, after)
        assert after <= best * 1.03, (init, after, best)  # within 3% of the oracle's variance
        if init == "identity":
            assert after < 0.6 * before  # PosRF's variance is > 2x Sigma*'s here
            S = est.feature_map.sigma(est.params_).double()
            dist = (S - _sigma_star(lam)).norm(dim=(-2, -1)) / _sigma_star(lam).norm()
            assert dist.max() < 0.1, dist

    # Monte Carlo on the held-out data: the learned proposal's kernel MSE is below PosRF-iid's
    n_seeds = 80
    learned = est  # fitted from the proposal init
    posrf = rb.make_estimator("posrf-iid", dim=d, num_features=16)
    K = torch.exp(qt[:, :256].double() @ kt[:, :256].double().transpose(-1, -2))

    def mse(e):
        return torch.stack(
            [
                ((e.redraw(s).kernel(qt[:, :256], kt[:, :256]).double() - K) ** 2).mean()
                for s in range(n_seeds)
            ]
        )

    a, b = mse(learned), mse(posrf)
    diff = b - a  # independent draws: the standard errors add in quadrature
    se = math.sqrt(float(a.var() + b.var()) / n_seeds)
    assert float(diff.mean()) > 3 * se, (float(a.mean()), float(b.mean()), se)


@pytest.mark.slow
def test_fastfoodl_kernel_fit_lowers_train_and_not_held_out_error():
    d, H = 16, 2
    lam = torch.logspace(0, -2, d, dtype=F64) * 2.0
    q, k, v = _gaussian(lam, 512, 1, H), _gaussian(lam, 512, 2, H), torch.randn(H, 512, d, generator=_gen(5))
    qt, kt = _gaussian(lam, 512, 3, H), _gaussian(lam, 512, 4, H)
    scale = d**-0.5
    cfg = FitConfig(objective="kernel", steps=150, lr=0.01, eval_every=10, patience=0)
    for seed in range(3):
        est = rb.make_estimator("oprf-fastfoodl", dim=d, num_features=16, seed=seed)
        est.fit(q, k, scale=scale)
        before = float(_Objective(est, "kernel", scale)(qt, kt, None))
        res = fit_estimator(est, q, k, v, cfg, scale=scale, progress=False)
        train = res.curve["train_loss"].dropna().to_numpy()
        assert train[-20:].mean() < train[:20].mean()  # minibatch losses, averaged over 20 steps
        after = float(_Objective(est, "kernel", scale)(qt, kt, None))
        assert after <= before, (seed, before, after)


def test_estimator_fit_trains_when_asked():
    """``est.fit(q, k, v, train=config)`` is ``fit_estimator``; a plain fit gives the start only."""
    q, k, v = _qkv()
    direct = rb.make_estimator("darkl-iid", dim=8, num_features=8, seed=1)
    res = fit_estimator(direct, q, k, v, QUICK, scale=0.5, progress=False)
    est = rb.make_estimator("darkl-iid", dim=8, num_features=8, seed=1).fit(
        q, k, v, scale=0.5, train=QUICK, progress=False
    )
    assert est.fit_result_.curve.equals(res.curve) and est.fit_result_.best_step == res.best_step > 0
    assert all(torch.equal(est.params_[key], direct.params_[key]) for key in direct.params_)
    assert est.target == direct.target != "softmax"
    plain = rb.make_estimator("darkl-iid", dim=8, num_features=8, seed=1).fit(q, k, scale=0.5)
    assert plain.fit_result_ is None and plain.trained_ is None
    assert not all(torch.equal(plain.params_[key], direct.params_[key]) for key in direct.params_)
    assert rb.fit_estimator is fit_estimator and rb.FitConfig is FitConfig


# --------------------------------------------------------------------------- layout and protocol
def test_config_imports_neither_the_trainer_nor_pandas():
    """A suite parser imports rfbench.learning.config: it adds nothing beyond itself to what
    ``import rfbench`` already loads (no trainer, pandas, metrics, suite or report)."""
    import subprocess
    import sys

    code = (
        "import sys, rfbench; before = set(sys.modules); import rfbench.learning.config; "
        "new = sorted(set(sys.modules) - before); print(new); "
        "assert new == ['rfbench.learning', 'rfbench.learning.config'], new; "
        "assert not any(m in sys.modules for m in "
        "('pandas', 'rfbench.learning.training', 'rfbench.learning.objectives', 'rfbench.metrics', "
        "'rfbench.suite', 'rfbench.report')), sorted(sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_learning_never_imports_the_estimator():
    """The estimator imports learning lazily (fit(train=)); the edge runs one way only."""
    import ast
    from pathlib import Path

    import rfbench.learning

    for path in Path(rfbench.learning.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "rfbench.estimator" or n.startswith("rfbench.estimator.") for n in names), (
                path.name,
                names,
            )


def _reference_split(L, frac, split, n_blocks):
    """The contiguous-block split written out with tensors, as the docstring states it."""
    if split == "tail":
        is_val = torch.arange(L) >= L - round(L * frac)
    else:
        n_vb = max(1, round(n_blocks * frac))
        val_blocks = {int((i + 0.5) * n_blocks / n_vb) for i in range(n_vb)}
        is_val = torch.tensor([int(b) in val_blocks for b in torch.arange(L) * n_blocks // L])
    idx = torch.arange(L)
    return idx[~is_val], idx[is_val]


@pytest.mark.parametrize("split", ["tail", "blocks"])
def test_split_ranges_are_the_contiguous_block_split(split):
    from rfbench.learning import split_ranges

    for L in (8, 9, 31, 100, 257):
        for frac in (0.1, 0.2, 0.25, 0.5):
            for n_blocks in (2, 5, 8):
                if L < n_blocks:
                    continue
                try:
                    got = split_ranges(L, frac, split=split, n_blocks=n_blocks)
                except SpecError:
                    tr, va = _reference_split(L, frac, split, n_blocks)
                    no_block_left = split == "blocks" and max(1, round(n_blocks * frac)) >= n_blocks
                    assert tr.numel() == 0 or va.numel() == 0 or no_block_left
                    continue
                want = _reference_split(L, frac, split, n_blocks)
                a, b = got.indices()
                assert torch.equal(a, want[0]) and torch.equal(b, want[1]), (L, frac, n_blocks)
                assert got.n_first == a.numel() and got.n_second == b.numel()
                assert all(s < e for s, e in got.first + got.second)  # ranges, not single tokens


def test_a_cell_split_is_computed_once_and_reused():
    spec = parse_fit_section({"holdout": 0.25, "n_blocks": 4})
    held = spec.holdout_ranges(96)
    assert held.second == ((72, 96),) and held.n_first == 72
    val = spec.validation_ranges(held.n_first, "darkl-iid")
    q, k, v = _qkv(L=72)
    a = fit_estimator(
        rb.make_estimator("darkl-iid", 8, 8, seed=1),
        q,
        k,
        v,
        spec.config_for("darkl-iid"),
        scale=0.5,
        progress=False,
    )
    b = fit_estimator(
        rb.make_estimator("darkl-iid", 8, 8, seed=1),
        q,
        k,
        v,
        spec.config_for("darkl-iid"),
        scale=0.5,
        progress=False,
        split=val,
    )
    assert a.curve.equals(b.curve) and (a.n_train, a.n_val) == (val.n_first, val.n_second)
    with pytest.raises(DataError, match="TokenSplit"):
        fit_estimator(
            rb.make_estimator("darkl-iid", 8, 8),
            q,
            k,
            v,
            QUICK,
            scale=0.5,
            split=spec.validation_ranges(50, "darkl-iid"),
        )


def test_the_trainer_trains_whatever_a_component_declares_learnable():
    """Not FastFood-L by name: a weight matrix that declares ``learnable`` and the protocol
    (here its whole W trains) is trained, and only the estimator's state changes."""
    from rfbench.estimator import Estimator
    from rfbench.features.positive import PosRF
    from rfbench.features.target import TargetKernel
    from rfbench.weights.iid import IID

    class FreeW(IID):
        name = "freew"
        learnable = True
        unbiased = False

        def learnable_draw(self, m, d, *, generator, device=None, dtype=torch.float32):
            W = self.sample(m, d, generator=generator, device=device, dtype=dtype).W
            return {"W": W}, lambda t: t["W"]

        def trained_target(self, params=None):
            return TargetKernel("free W", None)

    q, k, v = _qkv()
    est = Estimator(PosRF(), FreeW(), dim=8, num_features=8, seed=2)
    W0 = est.draw_.W.clone()
    res = fit_estimator(
        est, q, k, v, dataclasses.replace(QUICK, steps=6, eval_every=1, lr=0.05), scale=0.5, progress=False
    )
    assert res.trained and res.best_step > 0 and not res.seed_independent
    assert (
        est.trained_.parts == ("weights",) and est.target == "free W" and est.target_kernel.log_kernel is None
    )
    assert not torch.equal(est.draw_.W, W0) and "freew: W trained" in est.draw_.notes[-1]
    assert vars(est.weight_matrix) == vars(FreeW())  # the component is as constructed
