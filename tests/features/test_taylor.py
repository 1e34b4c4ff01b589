"""Taylor-2 (rfbench/features/taylor.py; Based, Arora et al., ICML 2024, Sec. 3.1): deterministic, with
an exactly known error, so the tests are exact (to rounding), not statistical."""

from __future__ import annotations

import math

import pytest
import torch

import rfbench as rb
from rfbench.errors import UnsupportedError
from rfbench.features.taylor import taylor2_error, taylor2_kernel, taylor2_size

F64 = torch.float64


def test_kernel_is_the_second_order_polynomial_and_error_is_exact():
    d = 5
    est = rb.make_estimator("taylor2-iid", dim=d, num_features=taylor2_size(d), dtype=F64)
    g = torch.Generator().manual_seed(0)
    q, k = (0.6 * torch.randn(7, d, generator=g, dtype=F64) for _ in range(2))
    t = q @ k.T
    torch.testing.assert_close(est.kernel(q, k), 1 + t + t * t / 2, rtol=1e-12, atol=1e-12)
    err = torch.exp(t) - est.kernel(q, k)
    torch.testing.assert_close(taylor2_error(q[:, None], k[None]), err, rtol=1e-9, atol=1e-13)
    # the map is deterministic: another seed, the same numbers
    torch.testing.assert_close(est.redraw(3).kernel(q, k), 1 + t + t * t / 2, rtol=1e-12, atol=1e-12)


def test_error_closed_form_values():
    """exp(t) - 1 - t - t^2/2 at hand-computed points, its sign, and accuracy near t = 0."""
    for t in (1.0, -1.0, 2.5, 1e-4, -3e-3):
        x = torch.tensor([t], dtype=F64)
        want = math.fsum(t**n / math.factorial(n) for n in range(3, 40))
        assert float(taylor2_error(x, torch.ones(1, dtype=F64))) == pytest.approx(want, rel=1e-12)
    assert float(taylor2_error(torch.tensor([2.0]), torch.tensor([1.0]))) > 0  # t > 0: underestimates
    assert float(taylor2_error(torch.tensor([-2.0]), torch.tensor([1.0]))) < 0  # t < 0: overestimates
    ts = torch.linspace(-10, 10, 2001, dtype=F64)
    assert float(taylor2_kernel(ts[:, None], torch.ones(1, 1, dtype=F64)).min()) == pytest.approx(0.5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_the_polynomial_kernel_attention(causal):
    d, L = 4, 9
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, L, n, generator=g, dtype=F64) for n in (d, d, 3))
    est = rb.make_estimator("taylor2-iid", dim=d, num_features=taylor2_size(d), dtype=F64)
    s = d**-0.25
    A = taylor2_kernel((q * s)[..., :, None, :], (k * s)[..., None, :, :])
    if causal:
        A = A.tril()
    want = (A @ v) / A.sum(-1, keepdim=True)
    torch.testing.assert_close(est.attention(q, k, v, causal=causal), want, rtol=1e-10, atol=1e-12)


def test_one_size_only_and_declared_biased():
    with pytest.raises(UnsupportedError, match="num_features=21"):
        rb.make_estimator("taylor2-iid", dim=5, num_features=20)
    est = rb.make_estimator("taylor2-iid", dim=2, num_features=6)
    assert not est.unbiased and est.feature_dim == 6
    assert "taylor2-iid" in rb.estimators() and "taylor2-orf" not in rb.estimators()
