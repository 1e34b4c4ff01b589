"""Adding an exponential map is one class and one registry line: the torch path, the stabilisers,
``est.form``, the fused kernels (Triton interpreter on CPU) and the metrics all consume its
``exp_form``; nothing else is edited. The map below is PosRF written anew, so every path must give
PosRF's own numbers for the same seed."""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench import metrics, ops, registry
from rfbench.features.base import FeatureMap
from rfbench.ops.form import ExpForm

F64 = torch.float64


class PosRFAgain(FeatureMap):
    """exp(omega . x - |x|^2 / 2) (Choromanski et al., ICLR 2021, Lemma 1), stated only as a form."""

    name = "posrfagain"
    description = "PosRF restated through exp_form only (test)"

    def exp_form(self, draw, params, d):
        W = draw.W
        return ExpForm(W, torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), coef=-0.5)


@pytest.fixture
def registered(monkeypatch):
    # the one registry line (a "module:Class" entry pointing at this test module)
    monkeypatch.setitem(registry.FEATURE_MAPS, "posrfagain", f"{__name__}:PosRFAgain")
    yield


def _qkv(seed=0, L=20, d=8):
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(2, L, d, generator=g, dtype=F64) for _ in range(3)]


def test_every_path_consumes_the_form(registered):
    assert "posrfagain-orf" in rb.estimators()
    q, k, v = _qkv()
    new = rb.make_estimator("posrfagain-orf", dim=8, num_features=16, seed=3, dtype=F64)
    ref = rb.make_estimator("posrf-orf", dim=8, num_features=16, seed=3, dtype=F64)
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.kernel(q, k), ref.kernel(q, k), **close)
    for causal in (False, True):
        torch.testing.assert_close(new.attention(q, k, v, causal), ref.attention(q, k, v, causal), **close)
    form = new.form({}, scale=8**-0.5)
    torch_path = ops.torch_rf_attention(q, k, v, form, dtype=F64)
    torch.testing.assert_close(torch_path, new.attention(q, k, v), **close)
    ke_new = metrics.kernel_errors([new], q, k, scale=8**-0.5, causal=True)
    ke_ref = metrics.kernel_errors([ref], q, k, scale=8**-0.5, causal=True)
    assert ke_new.kernel_mse == pytest.approx(ke_ref.kernel_mse, rel=1e-12)
    assert ke_new.attn_mse == pytest.approx(ke_ref.attn_mse, rel=1e-12)


@pytest.mark.triton
def test_the_fused_kernels_serve_the_new_map(registered):
    pytest.importorskip("triton")
    q, k, v = (t.float() for t in _qkv(seed=1, L=24, d=16))
    est = rb.make_estimator("posrfagain-iid", dim=16, num_features=16, seed=0)
    form = est.form({}, scale=16**-0.5)
    fused = ops.rf_attention(q, k, v, form, causal=True, backend="triton")
    torch.testing.assert_close(fused, est.attention(q, k, v, causal=True), rtol=2e-4, atol=2e-5)
