"""rfbench.ops parameters and dispatch: the PositiveFeatures read off an Estimator reproduce its
log-features exactly (every positive family, shared and per-head parameters, row weights, the
attention scale), unsupported cases say why, and CPU behaviour of the Estimator is unchanged.

No Triton here: these are plain torch checks (float64 where exactness is asserted).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rfbench as rb
from rfbench import ops
from rfbench.errors import UnsupportedError
from rfbench.estimator import Estimator
from rfbench.ops.features.naive import naive_features, naive_log_features
from rfbench.ops.params import ADAPTERS, PositiveFeatures, from_estimator, not_supported_reasons
from rfbench.registry import get_feature_map
from rfbench.weights.base import WeightDraw, WeightMatrix

F64 = torch.float64
D = 8


def _x(*shape, seed=0, scale=0.5):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _spd(d, seed):
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return A @ A.T / d + 0.5 * torch.eye(d, dtype=F64)


# (estimator name, feature params, needs fit): every adapter, with fixed and fitted parameters.
CASES = [
    ("posrf-iid", {}, False),
    ("posrf-orf", {}, False),
    ("hyprf-iid", {}, False),
    ("gerf-iid", {"A": -0.1}, False),
    ("oprf-orf", {}, True),  # A* fitted per (batch, head)
    ("dark-iid", {"sigma": _spd(D, 1)}, False),
    ("dark-iid", {}, True),  # whitening M fitted per (batch, head)
    ("darkis-iid", {}, True),
    ("darkis-iid", {"M": _spd(D, 2)}, True),
    ("darkl-iid", {"mode": "aligned"}, True),
    ("darkl-iid", {"mode": "is", "param": "diag", "init": "proposal"}, True),
]


@pytest.mark.parametrize("name,fparams,fit", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("scale", [1.0, D**-0.5])
def test_params_reproduce_estimator_log_features(name, fparams, fit, scale):
    est = rb.make_estimator(name, dim=D, num_features=12, seed=3, dtype=F64, feature_params=fparams)
    q, k = _x(2, 3, 9, D, seed=1), _x(2, 3, 7, D, seed=2)
    s = math.sqrt(scale)
    params = {}
    if fit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # whitening a tiny sample: floor warning
            params = est.feature_map.fit_params(q * s, k * s)
    fp = from_estimator(est, params, scale)
    assert fp.feature_dim == est.feature_dim
    for x, is_query in ((q, True), (k, False)):
        ref, factor = est.log_features(x * s, params, is_query)
        assert factor is None
        out = naive_log_features(x, fp, dtype=F64)
        torch.testing.assert_close(out, ref.expand_as(out), rtol=1e-10, atol=1e-10)


def test_every_positive_family_has_an_adapter():
    for name in rb.feature_maps():
        exponential = name in {"posrf", "hyprf", "gerf", "oprf", "dark", "darkis", "darkl"}
        assert (name in ADAPTERS) == exponential, name


class _Weighted(WeightMatrix):
    """Test sampler with fixed quadrature row weights."""

    name = "weighted"
    defaults = {"weights": None}

    def _sample(self, m, d, generator):
        W = torch.randn(m, d, generator=generator, dtype=F64)
        return WeightDraw(W, row_weights=torch.as_tensor(self.params["weights"], dtype=F64))


def test_positive_row_weights_fold_into_the_bias():
    w = [0.1, 0.3, 0.2, 0.4]
    est = Estimator(get_feature_map("hyprf"), _Weighted(weights=w), dim=D, num_features=4, seed=0, dtype=F64)
    x = _x(5, D)
    fp = from_estimator(est)
    ref, _ = est.log_features(x, {}, True)
    torch.testing.assert_close(naive_log_features(x, fp, dtype=F64), ref, rtol=1e-12, atol=1e-12)


def test_negative_row_weights_are_refused_with_a_reason():
    weights = _Weighted(weights=[0.6, -0.1, 0.5])
    est = Estimator(get_feature_map("posrf"), weights, dim=D, num_features=3, seed=0)
    reasons = not_supported_reasons(est)
    assert any("negative quadrature weights" in r for r in reasons)
    with pytest.raises(UnsupportedError, match="signed"):
        from_estimator(est)


@pytest.mark.parametrize("name", ["trigrf-iid", "saderf-iid", "gerftrig-iid"])
def test_maps_outside_the_family_say_why(name):
    est = rb.make_estimator(name, dim=D, num_features=4)
    assert any("positive exponential family" in r for r in not_supported_reasons(est))


def test_scaled_params_are_the_map_of_scaled_inputs():
    fp = PositiveFeatures(_x(6, D, seed=4, scale=1.0), _x(6, seed=5), -0.5, _spd(D, 6))
    x = _x(3, D, seed=7)
    torch.testing.assert_close(
        naive_log_features(x, fp.scaled(0.3), dtype=F64), naive_log_features(0.3 * x, fp, dtype=F64)
    )


@pytest.mark.parametrize("stabiliser", ["row", "shared", "prefix", "none"])
def test_stabilisers_match_the_estimator_constants(stabiliser):
    """Feature reference vs rfbench/estimator.py's own stabilised features (the same constants)."""
    est = rb.make_estimator("posrf-iid", dim=D, num_features=10, dtype=F64)
    q, k = _x(2, 11, D, seed=1), _x(2, 11, D, seed=2)
    fp = from_estimator(est)
    phi, c = naive_features(k, fp, stabiliser, dtype=F64)
    lk, _ = est.log_features(k, {}, False)
    torch.testing.assert_close(phi * torch.exp(c), torch.exp(lk))  # the true scale, whatever c is
    if stabiliser in ("shared", "prefix"):
        _, _, K, mk = est._stable_features(q, k, {}, causal=stabiliser == "prefix")
        torch.testing.assert_close(c, mk.expand_as(c))
        torch.testing.assert_close(phi, K)
    if stabiliser == "prefix":  # nothing depends on later rows
        k2 = k.clone()
        k2[:, 6:] *= 50
        phi2, c2 = naive_features(k2, fp, "prefix", dtype=F64)
        assert torch.equal(c2[:, :6], c[:, :6]) and torch.equal(phi2[:, :6], phi[:, :6])


@pytest.mark.parametrize("causal", [False, True])
def test_reference_paths_agree_with_the_estimator(causal):
    """naive (L x L) == torch (linear) == Estimator.attention, in float64 (reference vs reference)."""
    est = rb.make_estimator("hyprf-orf", dim=D, num_features=16, seed=1, dtype=F64)
    q, k, v = _x(2, 40, D, seed=1), _x(2, 40, D, seed=2), _x(2, 40, 5, seed=3)
    fp = from_estimator(est, {}, D**-0.5)
    ref = est.attention(q, k, v, causal)
    torch.testing.assert_close(ops.naive_rf_attention(q, k, v, fp, causal, dtype=F64), ref)
    torch.testing.assert_close(ops.torch_rf_attention(q, k, v, fp, causal, chunk=16, dtype=F64), ref)


def test_cpu_estimator_keeps_its_torch_path():
    est = rb.make_estimator("posrf-iid", dim=D, num_features=16)
    q, k, v = (t.float() for t in (_x(2, 9, D, seed=1), _x(2, 9, D, seed=2), _x(2, 9, 4, seed=3)))
    reasons = ops.attention_reasons(est, q, k, v)
    assert any("CUDA" in r for r in reasons)
    fp = from_estimator(est, {}, D**-0.5)
    ref = ops.torch_rf_attention(q, k, v, fp)
    torch.testing.assert_close(est.attention(q, k, v), ref, rtol=1e-6, atol=1e-6)


def test_attention_needing_gradients_keeps_the_torch_path():
    """Training (rfbench.learning) differentiates through attention: the kernels have no backward."""
    est = rb.make_estimator("posrf-iid", dim=D, num_features=8)
    q, k, v = (t.float() for t in (_x(9, D, seed=1), _x(9, D, seed=2), _x(9, 4, seed=3)))
    grad = "gradients are needed: the fused kernels have no backward pass (the torch path has)"
    assert grad not in ops.attention_reasons(est, q, k, v)
    assert grad in ops.attention_reasons(est, q.requires_grad_(True), k, v)
    with torch.no_grad():
        assert grad not in ops.attention_reasons(est, q, k, v)


def test_backend_auto_uses_torch_on_cpu_and_triton_can_be_disabled(monkeypatch):
    fp = from_estimator(rb.make_estimator("posrf-iid", dim=D, num_features=8))
    q, k, v = (t.float() for t in (_x(9, D, seed=1), _x(9, D, seed=2), _x(9, 4, seed=3)))
    assert torch.equal(ops.rf_attention(q, k, v, fp), ops.torch_rf_attention(q, k, v, fp))
    monkeypatch.setenv("RFBENCH_DISABLE_TRITON", "1")
    assert "disabled by RFBENCH_DISABLE_TRITON=1" in ops.not_supported_reasons(q, k, v, d=D, dv=4)
    with pytest.raises(UnsupportedError, match="RFBENCH_DISABLE_TRITON"):
        ops.rf_attention(q, k, v, fp, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.rf_attention(q, k, v, fp, backend="cuda")


def test_capability_reasons_name_dtype_and_size():
    x = torch.zeros(2, 3, dtype=F64)
    reasons = ops.not_supported_reasons(x, d=256, dv=300)
    assert any("float64" in r for r in reasons)
    assert any("d=256" in r for r in reasons) and any("dv=300" in r for r in reasons)
    mixed = ops.not_supported_reasons(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16), d=3)
    assert any("different dtypes" in r for r in mixed)
