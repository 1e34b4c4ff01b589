"""rfbench's CPU attention path as it was before issue 16 (commit 55ee806), kept as a timing reference.

Frozen copy, not used by the package: the benchmark times it beside the current path ("before"),
and the speed gate's self-check shows the gate's bound fails on it. Same numbers as the current
path up to float rounding.
"""

from __future__ import annotations

import math

import torch

from rfbench._checks import check_positive_int, check_tensor
from rfbench.ops.features.naive import stabiliser_constant


def _check_tensor_isfinite(x, name, dim=None):
    check_tensor(x, name, dim=dim)
    if not bool(torch.isfinite(x).all()):  # the old full isfinite pass, one bool tensor per input
        raise ValueError(f"{name} has NaN/Inf")


def legacy_attention(est, q, k, v, causal=False, *, scale=None, chunk=128):
    """``est.attention(q, k, v, causal)`` on the torch path as of commit 55ee806 (data-independent maps)."""
    _check_tensor_isfinite(q, "q", est.dim)
    _check_tensor_isfinite(k, "k", est.dim)
    _check_tensor_isfinite(v, "v")
    check_positive_int(chunk, "chunk")
    scale = 1.0 / math.sqrt(est.dim) if scale is None else float(scale)
    s = math.sqrt(scale)
    params = est._fitted(scale)
    qs, ks = est._cast(q) * s, est._cast(k) * s
    if params is None:
        params = est._params(qs, ks, scale, causal=causal)
    lq, fq = est.log_features(qs, params, is_query=True)
    lk, fk = est.log_features(ks, params, is_query=False)
    mq = stabiliser_constant(lq, "row")
    mk = stabiliser_constant(lk, "prefix" if causal else "shared")
    Q = torch.exp(lq - mq)
    K = torch.exp(lk - mk)
    if fq is not None:
        Q = Q * fq
    if fk is not None:
        K = K * fk
    return legacy_linear_attention(Q, K, mk, est._cast(v), causal, chunk).to(v.dtype)


def legacy_linear_attention(Q, K, mk, v, causal, chunk=128):
    if causal:
        return _legacy_causal(Q, K, mk.squeeze(-1), v, chunk)
    kv = K.transpose(-1, -2) @ v
    z = K.sum(dim=-2)
    return (Q @ kv) / (Q @ z.unsqueeze(-1))


def _legacy_causal(Q, K, mk, v, chunk):
    L = Q.shape[-2]
    lead = torch.broadcast_shapes(Q.shape[:-2], K.shape[:-2], v.shape[:-2])
    F, dv = Q.shape[-1], v.shape[-1]
    out = torch.empty(*lead, L, dv, dtype=Q.dtype, device=Q.device)
    S = torch.zeros(*lead, F, dv, dtype=Q.dtype, device=Q.device)
    z = torch.zeros(*lead, F, dtype=Q.dtype, device=Q.device)
    c = torch.full(lead, -math.inf, dtype=Q.dtype, device=Q.device)
    future_full = torch.ones(chunk, chunk, dtype=torch.bool, device=Q.device).triu(1)
    for i in range(0, L, chunk):
        sl = slice(i, min(i + chunk, L))
        Qc, Kc, vc, mc = Q[..., sl, :], K[..., sl, :], v[..., sl, :], mk[..., sl]
        n = mc.shape[-1]
        decay = torch.exp((c.unsqueeze(-1) - mc).clamp(max=0))
        num = (Qc @ S) * decay.unsqueeze(-1)
        den = (Qc @ z.unsqueeze(-1)).squeeze(-1) * decay
        diff = (mc.unsqueeze(-2) - mc.unsqueeze(-1)).clamp(max=0)
        future = future_full[:n, :n]
        A = (Qc @ Kc.transpose(-1, -2)) * torch.exp(diff.masked_fill(future, -math.inf))
        num = num + A @ vc
        den = den + A.sum(dim=-1)
        out[..., sl, :] = num / den.unsqueeze(-1)
        c_new = mc[..., -1]
        Kr = Kc * torch.exp((mc - c_new.unsqueeze(-1)).clamp(max=0)).unsqueeze(-1)
        carry = torch.exp((c - c_new).clamp(max=0))
        S = S * carry[..., None, None] + Kr.transpose(-1, -2) @ vc
        z = z * carry.unsqueeze(-1) + Kr.sum(dim=-2)
        c = c_new
    return out
