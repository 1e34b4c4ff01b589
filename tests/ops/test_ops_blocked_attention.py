"""``blocked_rf_attention`` (the CPU/torch fast path, rfbench/ops/rf_attention/naive.py) on its own.

The oracle is computed in log space, in float64, from the form alone: the RF score of query t
and key s is A_ts = sum_f sign_f exp(lq_tf + lk_sf), so for unsigned forms
log A_ts = logsumexp_f(lq_tf + lk_sf) and the output is softmax_s(log A_ts) v, exact at any norm
(no stabiliser to get wrong). Signed forms are checked against ``naive_rf_attention`` in float64.
Every case uses blocks and chunks that do not divide L, so the ragged last block, the carried
state across blocks and the rescaling of the running key constant are all exercised.
"""

from __future__ import annotations

import pytest
import torch

from rfbench.ops.form import ExpForm
from rfbench.ops.rf_attention.naive import blocked_rf_attention, naive_rf_attention, torch_rf_attention

F64 = torch.float64


def _form(lead, F, d, *, uniform_bias=True, P=False, sign=False, seed=0) -> ExpForm:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*lead, F, d, generator=g, dtype=F64)
    bias = torch.full((*lead, F), -0.7, dtype=F64)
    if not uniform_bias:  # e.g. quadrature row weights: log w_f differs per feature
        bias = bias + 0.5 * torch.randn(*lead, F, generator=g, dtype=F64)
    Pm = (
        torch.eye(d, dtype=F64) + 0.3 * torch.randn(*lead, d, d, generator=g, dtype=F64) / d**0.5
        if P
        else None
    )
    sg = torch.where(torch.rand(F, generator=g) < 0.3, -1.0, 1.0).to(F64) if sign else None
    return ExpForm(W, bias, -0.5, Pm, sg)


def _log_features(x, form):
    y = x if form.P is None else x @ form.P.transpose(-1, -2)
    return x @ form.W.transpose(-1, -2) + form.bias.unsqueeze(-2) + form.coef * (y * y).sum(-1, keepdim=True)


def _oracle(q, k, v, form, causal):
    """softmax_s(logsumexp_f(lq_tf + lk_sf)) v in float64: exact for unsigned forms at any norm."""
    lq, lk = _log_features(q, form), _log_features(k, form)
    logA = torch.logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1)  # [..., Lq, Lk]
    if causal:
        L = q.shape[-2]
        logA = logA.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logA, dim=-1) @ v


def _qkv(lead, L, d, dv, norm, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(*lead, L, d, generator=g, dtype=F64), torch.randn(*lead, L, d, generator=g, dtype=F64)
    q, k = norm * q / q.norm(dim=-1, keepdim=True), norm * k / k.norm(dim=-1, keepdim=True)
    return q, k, torch.randn(*lead, L, dv, generator=g, dtype=F64)


# (lead of data, lead of form, L, d, dv, F, block, chunk, options)
CASES = [
    ((2,), (), 37, 8, 5, 16, 16, 8, {}),
    ((1, 3), (3,), 50, 16, 7, 24, 16, 8, {"uniform_bias": False}),  # per-head form, per-feature bias
    ((2,), (), 41, 8, 3, 12, 24, 8, {"P": True}),  # DARK's norm projection
    ((1,), (), 29, 8, 4, 20, 10, 4, {"uniform_bias": False, "P": True}),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("norm", [1.0, 6.0])
def test_blocked_matches_log_space_oracle(case, causal, norm):
    lead, flead, L, d, dv, F, block, chunk, opts = CASES[case]
    form = _form(flead, F, d, **opts)
    q, k, v = _qkv(lead, L, d, dv, norm)
    out = blocked_rf_attention(q, k, v, form, causal, chunk=chunk, block=block)
    ref = _oracle(q, k, v, form, causal)
    assert out.shape == ref.shape
    # float64 throughout: only rounding separates the two (largest |logit| here ~ 40)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_signed_form_matches_naive(causal):
    """Signed query features (sparse-grid row weights): no log-space oracle, the quadratic reference."""
    form = _form((), 16, 8, uniform_bias=False, sign=True, seed=3)
    q, k, v = _qkv((2,), 45, 8, 6, 1.0, seed=4)
    out = blocked_rf_attention(q, k, v, form, causal, chunk=8, block=16)
    ref = naive_rf_attention(q, k, v, form, causal, dtype=F64)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_blocked_is_exact_where_unstabilised_features_overflow():
    """Key norms of 60 at d = 8: exp(w.k) overflows float64 unless the running key constant is
    rescaled exactly across blocks (keys with ever larger norms arrive block after block)."""
    form = _form((), 16, 8)
    q, k, v = _qkv((1,), 48, 8, 4, 1.0, seed=5)
    k = k * torch.linspace(1, 60, 48, dtype=F64).unsqueeze(-1)  # growing norms: c rises per block
    out = blocked_rf_attention(q, k, v, form, False, block=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _oracle(q, k, v, form, False), rtol=1e-8, atol=1e-10)


def test_blocked_float32_agrees_with_torch_path():
    """float32, as the Estimator runs it: blocked equals the unblocked torch reference to rounding."""
    form = _form((), 64, 16, uniform_bias=False).to(dtype=torch.float32)
    q, k, v = (t.float() for t in _qkv((2,), 300, 16, 8, 2.0, seed=6))
    for causal in (False, True):
        out = blocked_rf_attention(q, k, v, form, causal, chunk=32, block=96)
        ref = torch_rf_attention(q, k, v, form, causal, chunk=32)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


def test_causal_blocked_output_ignores_later_tokens():
    """Output t must not move when keys/values after t change, not even through rounding of a
    stabiliser (the prefix max never looks ahead)."""
    form = _form((), 16, 8)
    q, k, v = _qkv((1,), 40, 8, 4, 3.0, seed=7)
    out = blocked_rf_attention(q, k, v, form, True, chunk=8, block=16)
    k2, v2 = k.clone(), v.clone()
    # later keys on the longest feature vector: l_s = max_f w_f.k - |k|^2/2 peaks at k = w_f, so their
    # log-features exceed every earlier key's and a look-ahead stabiliser would rescale earlier rows
    w = form.W[form.W.norm(dim=-1).argmax()]
    k2[..., 25:, :] = w
    v2[..., 25:, :] += 100.0
    out2 = blocked_rf_attention(q, k2, v2, form, True, chunk=8, block=16)
    assert torch.equal(out[..., :25, :], out2[..., :25, :])
