"""The attention-weight cross-entropy objective (rfbench/learning/objectives.py; Hedgehog's
distillation loss, Zhang et al., ICLR 2024, arXiv 2402.04347, Sec. 4.1), against closed forms:
a constant kernel scores log Lk, any estimate scores at least the mean entropy of the softmax
weights (Gibbs), and the loss equals the cross-entropy computed from ``kernel()`` directly."""

from __future__ import annotations

import math

import pytest
import torch

import rfbench as rb
from rfbench.errors import EstimatorError, SpecError
from rfbench.features.hedgehog import Hedgehog
from rfbench.learning import FitConfig, fit_estimator
from rfbench.learning.objectives import Objective

F64 = torch.float64


def _qkv(L=12, d=5, heads=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(0.8 * torch.randn(heads, L, d, generator=g, dtype=F64) for _ in range(3))


def _entropy(q, k, scale):
    a = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return float(-(a * a.log()).sum(-1).mean())


def test_a_constant_kernel_scores_log_lk():
    q, k, v = _qkv()
    est = rb.make_estimator("hedgehog-iid", dim=5, num_features=4, dtype=F64).fit(q, k, scale=0.5)
    est.params_ = {**est.params_, "W": torch.zeros(3, 4, 5, dtype=F64), "b": torch.zeros(3, 4, dtype=F64)}
    loss = float(Objective(est, "crossentropy", 0.5)(q, k, v))
    assert loss == pytest.approx(math.log(12), rel=1e-12)


def test_crossentropy_equals_the_direct_formula_and_bounds_the_entropy():
    q, k, v = _qkv(seed=1)
    scale = 0.5
    for name in ("posrf-iid", "hedgehog-iid"):
        est = rb.make_estimator(name, dim=5, num_features=16, seed=2, dtype=F64)
        if est.feature_map.data_dependent:
            est.fit(q, k, scale=scale)
        loss = float(Objective(est, "crossentropy", scale)(q, k, v))
        s = math.sqrt(scale)
        K = est.kernel(q * s, k * s) if not est.feature_map.data_dependent else None
        if K is None:  # fitted at scale 0.5: its features of the scaled inputs
            phq, phk = est.features(q * s), est.features(k * s, is_query=False)
            K = phq @ phk.transpose(-1, -2)
        a = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        direct = float(-(a * torch.log(K / K.sum(-1, keepdim=True))).sum(-1).mean())
        assert loss == pytest.approx(direct, rel=1e-10), name
        assert loss > _entropy(q, k, scale), name  # Gibbs: equality only for the exact weights


def test_the_objective_is_known_and_refused_for_signed_learners():
    assert FitConfig(objective="crossentropy").objective == "crossentropy"
    with pytest.raises(SpecError, match="crossentropy"):
        FitConfig(objective="xent")

    class Signed(Hedgehog):
        positive = False

    from rfbench.estimator import Estimator
    from rfbench.weights.iid import IID

    q, k, v = (x.float() for x in _qkv(L=40))
    est = Estimator(Signed(), IID(), dim=5, num_features=4)
    with pytest.raises(EstimatorError, match="positive features"):
        fit_estimator(est, q, k, v, FitConfig(objective="crossentropy"), scale=0.5)
