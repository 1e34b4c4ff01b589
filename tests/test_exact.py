"""Exact references: attention under a given log-kernel against the dense formula written out."""

from __future__ import annotations

import pytest
import torch

import rfbench as rb
from rfbench.errors import DataError

F64 = torch.float64


def _x(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dense(logits, v, causal):
    if causal:
        L = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_attention_under_a_log_kernel_equals_the_dense_formula(causal):
    q, k, v = _x(2, 13, 4, seed=0), _x(2, 13, 4, seed=1), _x(2, 13, 3, seed=2)
    M = torch.eye(4, dtype=F64) + 0.2 * _x(4, 4, seed=3)

    def log_kernel(a, b):  # exp((Ma) . (Mb)), written out here
        return (a @ M.T) @ (b @ M.T).transpose(-1, -2)

    out = rb.exact.attention(q, k, v, causal, dtype=F64, tile=5, log_kernel=log_kernel)
    torch.testing.assert_close(out, _dense(log_kernel(q, k), v, causal), rtol=1e-12, atol=1e-12)
    # the softmax logits as a log-kernel give the ordinary exact attention
    plain = rb.exact.attention(q, k, v, causal, scale=1.0, dtype=F64, tile=5)
    same = rb.exact.attention(
        q, k, v, causal, dtype=F64, tile=5, log_kernel=lambda a, b: a @ b.transpose(-1, -2)
    )
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-12)


def test_arc_cosine_target_attention_is_its_normalised_kernel():
    """relu's declared target k_1 (Cho & Saul 2009, eq. 6), normalised per query row, by hand."""
    q, k, v = _x(9, 5, seed=4), _x(9, 5, seed=5), _x(9, 2, seed=6)
    target = rb.make_estimator("relu-iid", dim=5, num_features=8, dtype=F64).target_kernel
    nq, nk = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    cos = ((q @ k.T) / (nq * nk.T)).clamp(-1, 1)
    t = torch.arccos(cos)
    K = (nq * nk.T) / torch.pi * (torch.sin(t) + (torch.pi - t) * cos)
    out = rb.exact.attention(q, k, v, dtype=F64, log_kernel=target.log_kernel)
    torch.testing.assert_close(out, (K @ v) / K.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_scale_and_log_kernel_together_are_refused():
    q = _x(3, 2, seed=0)
    with pytest.raises(DataError, match="either scale"):
        rb.exact.attention(q, q, q, scale=0.5, log_kernel=lambda a, b: a @ b.T)
